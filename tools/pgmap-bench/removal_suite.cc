// Suite `removal`: how long memunmap takes under each strategy, on an idle device and with 16
// busy folios that another thread releases 5 ms into the memunmap.
//
// A case is (strategy, page size, device bytes, busy folios[, scan threads]). Its backing is an
// anonymous MAP_NORESERVE mapping, so a 1 TiB device costs only the metadata pages it touches;
// every repetition memremaps it afresh (timed, as memremap_seconds), takes the busy references,
// starts the releaser, times memunmap, and joins the releaser.
//
// The busy folios are spread evenly over the device: one in each of 16 equal slots, at an offset
// inside its slot drawn from --seed. Under alloc_event the bench also holds an Allocation over
// the whole device, which the releaser drops after the folios, as the upper layer would.
//
// `none` waits for nothing, so its releaser drops references on torn-down metadata. That case
// runs with quarantined metadata and reports late_accesses: the demonstration of the bug, not a
// failure. (On large devices some puts land while memunmap is still retiring the metadata and
// are not counted: they are no less late.) Any other failure — memunmap returning an error, a
// put failing under a safe strategy — fails the case.
//
// The cases run one after the other (not interleaved: each is an absolute figure, with no ratio
// target); a case is marked `disturbed` when other processes took more than kMaxOtherCpuShare of
// the CPUs over its repetitions (compare.h).
//
// Case `memremap` (one per page size and device size, default strategy): the time of memremap
// alone and the growth of the process's resident set it causes (`rss_bytes`, before any page is
// used), then what the resident set kept after memunmap and destroying the pagemap
// (`rss_retained_bytes`). A free page's metadata is all-zero, so neither should depend on size.

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench.h"
#include "compare.h"
#include "memory/testing/resident_bytes.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kBusyFolios = 16;
constexpr auto kReleaseDelay = std::chrono::milliseconds(5);
// A bounded wait turns a library hang into a failed case instead of a hung bench.
constexpr auto kMemunmapTimeout = std::chrono::seconds(120);

struct RemovalSpec {
  Strategy strategy;
  unsigned base_order;
  std::uint64_t bytes;
  std::uint64_t busy;
  unsigned scan_threads;
};

std::string label_of(const RemovalSpec& s) {
  std::string label =
      fmt::format("removal memunmap {} {} @{} busy={}", strategy_name(s.strategy),
                  format_bytes(s.bytes), format_page_size(order_bytes(s.base_order)), s.busy);
  if (s.scan_threads > 1) label += fmt::format(" scan_threads={}", s.scan_threads);
  return label;
}

struct RepSamples {
  std::vector<double> total, memremap, kill, drain, sweep, teardown;
  std::vector<double> late;
};

Result<Row> run_removal(const Config& cfg, const RemovalSpec& spec) {
  BackingOptions bo;
  bo.size = spec.bytes;
  bo.align = kPmdSize;
  bo.name = "pgmap-bench removal";
  auto made = make_anonymous_backing(bo);
  if (!made) return made.error();
  const std::shared_ptr<Backing> backing = std::move(made).value();

  const bool quarantine = spec.strategy == Strategy::none && spec.busy > 0;
  std::mt19937_64 rng(cfg.seed);
  RepSamples samples;
  const CpuShare cpu_share;  // over the whole case: the removal suite is not interleaved
  for (unsigned rep = 0; rep < cfg.removal_reps; ++rep) {
    MemremapParams params;
    params.type = PagemapType::generic;
    params.strategy = spec.strategy;
    params.base_order = spec.base_order;
    params.ranges.push_back(PagemapRangeSpec{backing});
    params.name = "pgmap-bench removal";
    if (quarantine) params.quarantine = true;
    const auto t_map = SteadyClock::now();
    auto mapped = memremap(std::move(params));
    const double memremap_seconds = seconds_since(t_map);
    if (!mapped) return mapped.error();
    const std::shared_ptr<DevPagemap> pgmap = std::move(mapped).value();
    const PfnRange range = pgmap->range(0);

    // Busy folios: one per slot, at a seeded offset inside it.
    const std::uint64_t entries = range.count >> spec.base_order;
    const std::uint64_t busy = std::min(spec.busy, entries);
    std::vector<Pfn> held;
    // On a setup failure, drop what was taken so that destroying the pagemap does not wait.
    auto drop_held = [&] {
      for (Pfn p : held)
        (void)pgmap->put_folio(p);
    };
    for (std::uint64_t i = 0; i < busy; ++i) {
      const std::uint64_t slot = entries / busy;
      const std::uint64_t e = i * slot + rng() % slot;
      const Pfn pfn = range.start + (e << spec.base_order);
      if (Errc err = pgmap->get_folio(pfn); err != Errc::ok) {
        drop_held();
        return Error(err, fmt::format("{}: get_folio({:#x}) failed", label_of(spec), pfn));
      }
      held.push_back(pfn);
    }
    DevPagemap::Allocation allocation;
    if (spec.strategy == Strategy::alloc_event && busy > 0) {
      auto req = pgmap->request(range.start, range.count);
      if (!req) {
        drop_held();
        return req.error();
      }
      allocation = std::move(req).value();
    }

    std::uint64_t failed_puts = 0;
    std::thread releaser;
    if (busy > 0) {
      releaser = std::thread([&] {
        std::this_thread::sleep_for(kReleaseDelay);
        for (Pfn p : held) {
          if (pgmap->put_folio(p) != Errc::ok) ++failed_puts;
        }
        allocation.reset();
      });
    }
    MemunmapOptions opts;
    opts.scan_threads = spec.scan_threads;
    opts.timeout = kMemunmapTimeout;
    const auto t0 = SteadyClock::now();
    auto stats = pgmap->memunmap(opts);
    const double seconds = seconds_since(t0);
    if (releaser.joinable()) releaser.join();

    if (!stats) {
      return Error(stats.code(), fmt::format("{}: memunmap failed: {}", label_of(spec),
                                             stats.error().to_string()));
    }
    if (!quarantine && failed_puts != 0) {
      return Error(Errc::use_after_teardown, fmt::format("{}: {} of {} releasing puts failed",
                                                         label_of(spec), failed_puts, held.size()));
    }
    samples.total.push_back(seconds);
    samples.memremap.push_back(memremap_seconds);
    samples.kill.push_back(stats->kill_seconds);
    samples.drain.push_back(stats->drain_seconds);
    samples.sweep.push_back(stats->sweep_seconds);
    samples.teardown.push_back(stats->teardown_seconds);
    samples.late.push_back(static_cast<double>(pgmap->late_accesses()));
  }

  Row row;
  row.suite = "removal";
  row.name = "memunmap";
  row.strategy = std::string(strategy_name(spec.strategy));
  row.threads = 1;
  row.page_size = order_bytes(spec.base_order);
  row.bytes = spec.bytes;
  row.busy_pages = spec.busy;
  row.metric = Metric::seconds;
  row.summary = summarize(samples.total);
  row.extra["scan_threads"] = spec.scan_threads;
  row.extra["memremap_seconds"] = summarize(samples.memremap).median;
  row.extra["kill_seconds"] = summarize(samples.kill).median;
  row.extra["drain_seconds"] = summarize(samples.drain).median;
  row.extra["sweep_seconds"] = summarize(samples.sweep).median;
  row.extra["teardown_seconds"] = summarize(samples.teardown).median;
  const double other_cpu = cpu_share.other();
  row.extra["other_cpu_share"] = other_cpu;
  row.extra["disturbed"] = other_cpu > kMaxOtherCpuShare;
  if (quarantine) {
    const auto late = static_cast<std::uint64_t>(summarize(samples.late).median);
    row.extra["late_accesses"] = late;
    row.note = fmt::format("late_accesses={} (the bug)", late);
  }
  if (spec.scan_threads > 1) row.note = fmt::format("scan_threads={}", spec.scan_threads);
  return row;
}

// ---- case memremap -------------------------------------------------------------------------

// Resident set of this process in bytes (/proc/self/statm), 0 if unreadable: the memory layer's
// test helper (src/ is an include directory of every in-tree binary, through pgmap::internal).
using testutil::resident_bytes;

std::string memremap_label(unsigned base_order, std::uint64_t bytes) {
  return fmt::format("removal memremap {} @{}", format_bytes(bytes),
                     format_page_size(order_bytes(base_order)));
}

Result<Row> run_memremap(const Config& cfg, unsigned base_order, std::uint64_t bytes) {
  BackingOptions bo;
  bo.size = bytes;
  bo.align = kPmdSize;
  bo.name = "pgmap-bench memremap";
  auto made = make_anonymous_backing(bo);
  if (!made) return made.error();
  const std::shared_ptr<Backing> backing = std::move(made).value();
  std::vector<double> seconds, rss, retained;
  Strategy strategy = Strategy::transition;
  const CpuShare cpu_share;  // over the whole case, as for memunmap
  for (unsigned rep = 0; rep < cfg.removal_reps; ++rep) {
    MemremapParams params;
    params.type = PagemapType::generic;
    params.base_order = base_order;
    params.ranges.push_back(PagemapRangeSpec{backing});
    params.name = "pgmap-bench memremap";
    strategy = params.strategy;
    const std::uint64_t rss0 = resident_bytes();
    const auto t0 = SteadyClock::now();
    auto mapped = memremap(std::move(params));
    const double s = seconds_since(t0);
    if (!mapped) return mapped.error();
    const std::uint64_t rss1 = resident_bytes();
    std::shared_ptr<DevPagemap> pgmap = std::move(mapped).value();
    auto stats = pgmap->memunmap();
    if (!stats) {
      return Error(stats.code(),
                   fmt::format("{}: memunmap failed: {}", memremap_label(base_order, bytes),
                               stats.error().to_string()));
    }
    pgmap.reset();
    const std::uint64_t rss2 = resident_bytes();
    seconds.push_back(s);
    rss.push_back(static_cast<double>(rss1 > rss0 ? rss1 - rss0 : 0));
    retained.push_back(static_cast<double>(rss2 > rss0 ? rss2 - rss0 : 0));
  }
  Row row;
  row.suite = "removal";
  row.name = "memremap";
  row.strategy = std::string(strategy_name(strategy));
  row.page_size = order_bytes(base_order);
  row.bytes = bytes;
  row.metric = Metric::seconds;
  row.summary = summarize(seconds);
  row.extra["rss_bytes"] = static_cast<std::uint64_t>(summarize(rss).median);
  row.extra["rss_retained_bytes"] = static_cast<std::uint64_t>(summarize(retained).median);
  const double other_cpu = cpu_share.other();
  row.extra["other_cpu_share"] = other_cpu;
  row.extra["disturbed"] = other_cpu > kMaxOtherCpuShare;
  row.note =
      fmt::format("rss +{}", format_bytes(static_cast<std::uint64_t>(summarize(rss).median)));
  return row;
}

}  // namespace

std::vector<Case> removal_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (unsigned order : {0u, kPmdOrder}) {
    for (std::uint64_t bytes : cfg.removal_bytes) {
      cases.push_back({memremap_label(order, bytes),
                       [&cfg, order, bytes] { return run_memremap(cfg, order, bytes); }});
    }
  }
  for (unsigned order : {0u, kPmdOrder}) {
    for (std::uint64_t bytes : cfg.removal_bytes) {
      for (Strategy s : cfg.strategies) {
        for (std::uint64_t busy : {std::uint64_t{0}, kBusyFolios}) {
          std::vector<unsigned> scans = {1};
          if (s == Strategy::sweep) scans.push_back(2);
          for (unsigned scan : scans) {
            RemovalSpec spec{s, order, bytes, busy, scan};
            cases.push_back({label_of(spec), [&cfg, spec] { return run_removal(cfg, spec); }});
          }
        }
      }
    }
  }
  return cases;
}

}  // namespace pgmap::bench
