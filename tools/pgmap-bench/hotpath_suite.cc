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
//
// The strategies of one variant (page_cycle @4K, pin_cycle @4K, pin_cycle @2M), at every thread
// count, plus `lock_pair` (a lock add + lock sub on a counter private to the thread: the floor of
// one refcount 0->1->0) form one interleaved comparison (compare.h): every row's baseline is
// `none` at the same thread count and its floor lock_pair on 1 thread, both ratios taken per
// round. Every strategy's pagemap lives for the whole comparison. The comparison is measured in
// 1 ms slices (compare.h Comparison::slice_seconds, timing.h run_sliced): many short rounds, so
// every case sees the same mix of this machine's speed modes (docs/results-format.md).
#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench.h"
#include "compare.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kMinDeviceBytes = std::uint64_t{64} << 20;
constexpr std::uint64_t kThreadSpacing = 64;  // metadata entries between two threads' folios

// A counter alone on its cache lines (and off the adjacent-line prefetch pair).
template <typename T>
struct alignas(128) Isolated {
  T value{};
};

enum class HotOp { page_cycle, pin_cycle };

struct HotVariant {
  HotOp op;
  unsigned base_order;
};

constexpr HotVariant kVariants[] = {
    {HotOp::page_cycle, 0}, {HotOp::pin_cycle, 0}, {HotOp::pin_cycle, kPmdOrder}};

const char* op_name(HotOp op) {
  return op == HotOp::page_cycle ? "page_cycle" : "pin_cycle";
}

// One strategy's pagemap of a comparison, with what its threads use.
struct StrategyDevice {
  Strategy strategy;
  std::shared_ptr<DevPagemap> pgmap;
  DevPagemap::Allocation allocation;
  std::vector<Pfn> pfns;              // per thread
  std::vector<std::uint64_t> errors;  // per thread
  std::uint64_t bytes = 0;
  double hot_bytes_per_page = 0;  // hot metadata (PageArray::hot_bytes) per 4 KiB page
};

Result<std::unique_ptr<StrategyDevice>> make_device(const Config& cfg, Strategy strategy,
                                                    HotVariant v) {
  const std::uint64_t folio_bytes = order_bytes(v.base_order);
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
  auto dev = std::make_unique<StrategyDevice>();
  dev->strategy = strategy;
  dev->pgmap = std::move(mapped).value();
  const PfnRange range = dev->pgmap->range(0);
  dev->bytes = range.bytes();
  if (const PageArray* array = dev->pgmap->array_for(range.start)) {
    dev->hot_bytes_per_page =
        static_cast<double>(array->hot_bytes()) / static_cast<double>(range.bytes() / kPageSize);
  }
  if (strategy == Strategy::alloc_event) {
    auto req = dev->pgmap->request(range.start, range.count);
    if (!req) return req.error();
    dev->allocation = std::move(req).value();
  }
  for (unsigned t = 0; t < most_threads; ++t)
    dev->pfns.push_back(range.start + ((t * kThreadSpacing) << v.base_order));
  dev->errors.assign(most_threads, 0);
  return dev;
}

ThreadBody body_of(StrategyDevice& dev, HotOp op) {
  DevPagemap& pm = *dev.pgmap;
  if (op == HotOp::page_cycle) {
    return [&dev, &pm](unsigned t, std::uint64_t ops) {
      const Pfn pfn = dev.pfns[t];
      std::uint64_t bad = 0;
      for (std::uint64_t i = 0; i < ops; ++i) {
        if (pm.get_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        if (pm.put_folio(pfn) != Errc::ok) [[unlikely]]
          ++bad;
        clobber_memory();
      }
      dev.errors[t] += bad;
    };
  }
  return [&dev, &pm](unsigned t, std::uint64_t ops) {
    const Pfn pfn = dev.pfns[t];
    std::uint64_t bad = 0;
    for (std::uint64_t i = 0; i < ops; ++i) {
      if (pm.pin_folio(pfn) != Errc::ok) [[unlikely]]
        ++bad;
      if (pm.unpin_folio(pfn) != Errc::ok) [[unlikely]]
        ++bad;
      clobber_memory();
    }
    dev.errors[t] += bad;
  };
}

std::string variant_name(HotVariant v) {
  return fmt::format("hotpath {} @{}", op_name(v.op), format_page_size(order_bytes(v.base_order)));
}

Result<std::vector<Row>> run_hotpath(const Config& cfg, HotVariant v) {
  std::vector<std::unique_ptr<StrategyDevice>> devices;
  for (Strategy s : cfg.strategies) {
    auto dev = make_device(cfg, s, v);
    if (!dev) return dev.error();
    devices.push_back(std::move(dev).value());
  }
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  std::vector<Isolated<std::atomic<std::int64_t>>> floor_counters(most_threads);

  Comparison c;
  c.name = variant_name(v);
  for (auto& dev : devices) {
    for (unsigned threads : cfg.threads) {
      Member m;
      m.row.suite = "hotpath";
      m.row.name = op_name(v.op);
      m.row.strategy = std::string(strategy_name(dev->strategy));
      m.row.threads = threads;
      m.row.page_size = order_bytes(v.base_order);
      m.row.bytes = dev->bytes;
      if (dev->strategy == Strategy::alloc_event) m.row.note = "allocation held";
      m.row.extra["hot_metadata_bytes_per_page"] = dev->hot_bytes_per_page;
      m.variant = loop_variant(fmt::format("{} {} threads={}", c.name, m.row.strategy, threads),
                               {threads, 1, cfg.min_rep_seconds}, body_of(*dev, v.op));
      c.members.push_back(std::move(m));
    }
  }
  {
    Member m;
    m.row.suite = "hotpath";
    m.row.name = "lock_pair";
    m.row.page_size = order_bytes(v.base_order);
    m.row.note = "floor: lock add + lock sub, thread-private line";
    m.variant = loop_variant(c.name + " lock_pair", {1, 1, cfg.min_rep_seconds},
                             [&floor_counters](unsigned t, std::uint64_t ops) {
                               std::atomic<std::int64_t>& x = floor_counters[t].value;
                               for (std::uint64_t i = 0; i < ops; ++i) {
                                 x.fetch_add(1);
                                 x.fetch_sub(1);
                                 clobber_memory();
                               }
                             });
    c.members.push_back(std::move(m));
  }
  const int floor = static_cast<int>(c.members.size()) - 1;
  for (Member& m : c.members) {
    if (m.row.name == "lock_pair") continue;
    m.baseline = find_member(c, m.row.name, "none", m.row.threads);
    if (m.row.strategy == "none") m.baseline = -1;
    m.floor = floor;
  }
  c.stability_floor = floor;
  c.slice_seconds = kSliceSeconds;
  std::vector<Row> rows = run_comparison(cfg, c);

  std::string failures;
  for (auto& dev : devices) {
    std::uint64_t failed = 0;
    for (std::uint64_t e : dev->errors)
      failed += e;
    for (Pfn p : dev->pfns) {
      if (dev->pgmap->folio_ref_count(p) != 0) ++failed;
    }
    dev->allocation.reset();
    auto unmapped = dev->pgmap->memunmap();
    if (failed != 0) {
      failures += fmt::format("{} {}: {} failed folio operations or busy folios; ", op_name(v.op),
                              strategy_name(dev->strategy), failed);
    } else if (!unmapped) {
      failures += fmt::format("{} {}: {}; ", op_name(v.op), strategy_name(dev->strategy),
                              unmapped.error().to_string());
    }
  }
  if (!failures.empty()) return Error(Errc::busy, failures);
  return rows;
}

}  // namespace

std::vector<Case> hotpath_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (HotVariant v : kVariants) {
    Case c;
    c.label = fmt::format("{}: {} strategies x threads {} interleaved", variant_name(v),
                          cfg.strategies.size(), fmt::join(cfg.threads, ","));
    c.run_rows = [&cfg, v] { return run_hotpath(cfg, v); };
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace pgmap::bench
