// Suite `hotpath`: what a folio reference costs under each strategy, on a live pagemap.
//
//   page_cycle  get_folio + put_folio on an idle 4 KiB folio: refcount 0 -> 1 -> 0 every op, so
//               the strategies' transition work (pagemap reference, liveness check) is included
//   pin_cycle   pin_folio + unpin_folio on a 4 KiB folio (pin bias) and on a 2 MiB folio (exact
//               pincount; the pagemap has base order 9 so every folio is 2 MiB)
//
// The pagemap is of type generic (device-dax). fs_dax would wake waiters on every free, a
// different cost that belongs to the DAX layer, not to the liveness strategy.
// With several threads each uses its own folio, 64 entries apart, so the 4-byte refcounts are on
// different cache lines: the figures show the strategy's shared state, not refcount sharing.
// Under alloc_event the bench holds an Allocation over the whole device for the run, as the
// upper layer (dax direct_access) would.
#include <algorithm>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "bench.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kMinDeviceBytes = std::uint64_t{64} << 20;
constexpr std::uint64_t kThreadSpacing = 64;  // metadata entries between two threads' folios

enum class HotOp { page_cycle, pin_cycle };

struct Variant {
  HotOp op;
  unsigned base_order;
};

constexpr Variant kVariants[] = {
    {HotOp::page_cycle, 0}, {HotOp::pin_cycle, 0}, {HotOp::pin_cycle, kPmdOrder}};

const char* op_name(HotOp op) {
  return op == HotOp::page_cycle ? "page_cycle" : "pin_cycle";
}

Result<Row> run_hotpath(const Config& cfg, Strategy strategy, Variant v, unsigned threads) {
  const std::uint64_t folio_bytes = order_bytes(v.base_order);
  // Sized for the largest thread count of the run, so every row of a variant has one device size.
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  BackingOptions bo;
  bo.size =
      align_up(std::max(kMinDeviceBytes, most_threads * kThreadSpacing * folio_bytes), kPmdSize);
  bo.align = kPmdSize;
  bo.name = "pgmap-bench hotpath";
  auto backing = make_anonymous_backing(bo);
  if (!backing) return backing.error();

  MemremapParams params;
  params.type = PagemapType::generic;
  params.strategy = strategy;
  params.base_order = v.base_order;
  params.ranges.push_back(PagemapRangeSpec{std::shared_ptr<Backing>(std::move(backing).value())});
  params.name = "pgmap-bench hotpath";
  auto mapped = memremap(std::move(params));
  if (!mapped) return mapped.error();
  const std::shared_ptr<DevPagemap> pgmap = std::move(mapped).value();
  const PfnRange range = pgmap->range(0);

  DevPagemap::Allocation allocation;
  if (strategy == Strategy::alloc_event) {
    auto req = pgmap->request(range.start, range.count);
    if (!req) return req.error();
    allocation = std::move(req).value();
  }

  std::vector<Pfn> pfns(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pfns[t] = range.start + ((t * kThreadSpacing) << v.base_order);
  }
  std::vector<std::uint64_t> errors(threads, 0);
  DevPagemap& pm = *pgmap;
  ThreadBody body;
  if (v.op == HotOp::page_cycle) {
    body = [&](unsigned t, std::uint64_t ops) {
      const Pfn pfn = pfns[t];
      std::uint64_t bad = 0;
      for (std::uint64_t i = 0; i < ops; ++i) {
        if (pm.get_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        if (pm.put_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        clobber_memory();
      }
      errors[t] += bad;
    };
  } else {
    body = [&](unsigned t, std::uint64_t ops) {
      const Pfn pfn = pfns[t];
      std::uint64_t bad = 0;
      for (std::uint64_t i = 0; i < ops; ++i) {
        if (pm.pin_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        if (pm.unpin_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        clobber_memory();
      }
      errors[t] += bad;
    };
  }
  std::vector<double> ns = measure_ns_per_op({threads, cfg.reps, cfg.min_rep_seconds}, body);

  std::uint64_t failed = 0;
  for (std::uint64_t e : errors)
    failed += e;
  for (Pfn p : pfns) {
    if (pm.folio_ref_count(p) != 0) ++failed;
  }
  allocation.reset();
  auto unmapped = pm.memunmap();
  if (failed != 0) {
    return Error(Errc::busy, fmt::format("{} {}: {} failed folio operations or busy folios",
                                         op_name(v.op), strategy_name(strategy), failed));
  }
  if (!unmapped) return unmapped.error();

  Row row;
  row.suite = "hotpath";
  row.name = op_name(v.op);
  row.strategy = std::string(strategy_name(strategy));
  row.threads = threads;
  row.page_size = folio_bytes;
  row.bytes = range.bytes();
  row.metric = Metric::ns_per_op;
  row.summary = summarize(std::move(ns));
  if (strategy == Strategy::alloc_event) row.note = "allocation held";
  return row;
}

}  // namespace

std::vector<Case> hotpath_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (Strategy s : cfg.strategies) {
    for (Variant v : kVariants) {
      for (unsigned threads : cfg.threads) {
        cases.push_back(
            {fmt::format("hotpath {} {} @{} threads={}", op_name(v.op), strategy_name(s),
                         format_page_size(order_bytes(v.base_order)), threads),
             [&cfg, s, v, threads] { return run_hotpath(cfg, s, v, threads); }});
      }
    }
  }
  return cases;
}

}  // namespace pgmap::bench
