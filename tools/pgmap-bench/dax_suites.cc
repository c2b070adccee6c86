// Suites `gup` and `fault`: the user-facing paths of a device-dax device (DevDax over a generic
// pagemap on an anonymous backing, mapped MAP_SHARED RW into simulated address spaces).
//
//   gup/pin_unpin     pin_user_pages(kFollWrite) of 512 pages (2 MiB of address space) followed
//                     by unpin_user_pages, on a pre-faulted mapping. ns_per_op is the time of one
//                     pin+unpin call divided by 512: per 4 KiB page. With a 4 KiB device a call
//                     covers 512 folios, with a 2 MiB device one folio (one atomic: GUP batches
//                     a folio run). Each thread has its own AddressSpace mapping its own 2 MiB of
//                     the device, so the threads share no folio. folio_atomics and
//                     pagemap_lookups are the GupStats of one call.
//   fault/first_touch a fresh mmap of the device, then a 1-byte write to each page (4 KiB
//                     device) or each 2 MiB folio (2 MiB device): every write takes a fault that
//                     installs the entry. Only the writes are timed (mmap and munmap are not);
//                     ns_per_op is per fault. A repetition runs enough mmap/touch/munmap cycles to
//                     last at least min_rep_seconds, after one untimed warm-up cycle (which also
//                     faults in the host memory behind the backing).
//
// Each case ends with DevDax::unbind() (the address spaces still mapped, so unbind zaps them);
// an unbind failure, a failed pin/unpin or a signal on a touch fails the case.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench.h"
#include "pgmap/dax/devdax.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGupPages = 512;  // pages per pin_user_pages call: 2 MiB
constexpr std::uint64_t kGupRegion = kGupPages * kPageSize;
constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;
// A bounded unbind turns a library hang into a failed case instead of a hung bench.
constexpr auto kUnbindTimeout = std::chrono::seconds(120);

Result<std::shared_ptr<dax::DevDax>> make_devdax(Strategy strategy, unsigned base_order,
                                                 std::uint64_t bytes, const char* name) {
  BackingOptions bo;
  bo.size = align_up(bytes, kPmdSize);
  bo.align = kPmdSize;
  bo.name = name;
  auto backing = make_anonymous_backing(bo);
  if (!backing) return backing.error();
  MemremapParams params;
  params.type = PagemapType::generic;
  params.strategy = strategy;
  params.base_order = base_order;
  params.ranges.push_back(PagemapRangeSpec{std::shared_ptr<Backing>(std::move(backing).value())});
  params.name = name;
  auto mapped = memremap(std::move(params));
  if (!mapped) return mapped.error();
  return dax::DevDax::create(std::move(mapped).value(), name);
}

Status unbind(dax::DevDax& dev, const std::string& label) {
  MemunmapOptions opts;
  opts.timeout = kUnbindTimeout;
  auto st = dev.unbind(opts);
  if (!st) {
    return Error(st.code(), fmt::format("{}: unbind failed: {}", label, st.error().to_string()));
  }
  return {};
}

// ---- gup --------------------------------------------------------------------------------------

std::string gup_label(Strategy s, unsigned order, unsigned threads) {
  return fmt::format("gup pin_unpin {} @{} threads={}", strategy_name(s),
                     format_page_size(order_bytes(order)), threads);
}

Result<Row> run_gup(const Config& cfg, Strategy strategy, unsigned order, unsigned threads) {
  const std::string label = gup_label(strategy, order, threads);
  // Sized for the largest thread count of the run, so every row of a page size has one size.
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  const std::uint64_t wanted = cfg.quick ? 0 : order == 0 ? 64 * kMiB : 256 * kMiB;
  const std::uint64_t bytes = std::max(wanted, most_threads * kGupRegion);
  auto made = make_devdax(strategy, order, bytes, "pgmap-bench gup");
  if (!made) return made.error();
  const std::shared_ptr<dax::DevDax> dev = std::move(made).value();

  // One address space per thread, each mapping its own 2 MiB of the device, pre-faulted.
  std::vector<std::unique_ptr<mm::AddressSpace>> spaces;
  std::vector<std::uint64_t> addrs;
  for (unsigned t = 0; t < threads; ++t) {
    spaces.push_back(std::make_unique<mm::AddressSpace>());
    auto addr = spaces.back()->mmap(0, kGupRegion, kRW, mm::kMapShared, dev, t * kGupRegion);
    if (!addr) return addr.error();
    addrs.push_back(*addr);
    const std::uint8_t one = 1;
    for (std::uint64_t off = 0; off < kGupRegion; off += kPageSize) {
      if (mm::SignalInfo sig = spaces.back()->write(*addr + off, &one, 1)) {
        return Error(Errc::dead,
                     fmt::format("{}: pre-fault at {:#x}: {}", label, sig.addr, sig.why));
      }
    }
  }

  // GupStats of one call, outside the measurement.
  mm::GupStats stats;
  {
    auto pages = mm::pin_user_pages(*spaces[0], addrs[0], kGupPages, mm::kFollWrite, &stats);
    if (!pages) return pages.error();
    if (Errc e = mm::unpin_user_pages(*pages); e != Errc::ok) {
      return Error(e, fmt::format("{}: unpin_user_pages failed", label));
    }
  }

  std::vector<std::uint64_t> errors(threads, 0);
  const ThreadBody body = [&](unsigned t, std::uint64_t ops) {
    mm::AddressSpace& as = *spaces[t];
    const std::uint64_t addr = addrs[t];
    std::uint64_t bad = 0;
    for (std::uint64_t i = 0; i < ops; ++i) {
      auto pages = mm::pin_user_pages(as, addr, kGupPages, mm::kFollWrite);
      if (!pages) [[unlikely]] {
        ++bad;
      } else if (mm::unpin_user_pages(*pages) != Errc::ok) [[unlikely]] {
        ++bad;
      }
      clobber_memory();
    }
    errors[t] += bad;
  };
  std::vector<double> ns = measure_ns_per_op({threads, cfg.reps, cfg.min_rep_seconds}, body);
  for (double& v : ns)
    v /= static_cast<double>(kGupPages);

  std::uint64_t failed = 0;
  for (std::uint64_t e : errors)
    failed += e;
  Status unbound = unbind(*dev, label);
  spaces.clear();
  if (failed != 0) {
    return Error(Errc::busy, fmt::format("{}: {} failed pin/unpin calls", label, failed));
  }
  if (!unbound.ok()) return unbound.error();

  Row row;
  row.suite = "gup";
  row.name = "pin_unpin";
  row.strategy = std::string(strategy_name(strategy));
  row.threads = threads;
  row.page_size = order_bytes(order);
  row.bytes = dev->size();
  row.metric = Metric::ns_per_op;
  row.summary = summarize(std::move(ns));
  row.extra["pages_per_call"] = kGupPages;
  row.extra["folio_atomics"] = stats.folio_atomics;
  row.extra["pagemap_lookups"] = stats.pagemap_lookups;
  row.extra["gup_slow_pages"] = stats.slow;
  row.note = fmt::format("per 4K page; {} folio atomics/call", stats.folio_atomics);
  return row;
}

// ---- fault ------------------------------------------------------------------------------------

std::string fault_label(Strategy s, unsigned order) {
  return fmt::format("fault first_touch {} @{}", strategy_name(s),
                     format_page_size(order_bytes(order)));
}

Result<Row> run_fault(const Config& cfg, Strategy strategy, unsigned order) {
  const std::string label = fault_label(strategy, order);
  const std::uint64_t step = order_bytes(order);
  const std::uint64_t region =
      order == 0 ? (cfg.quick ? 2 * kMiB : 16 * kMiB) : (cfg.quick ? 16 * kMiB : 256 * kMiB);
  const std::uint64_t faults = region / step;
  auto made = make_devdax(strategy, order, region, "pgmap-bench fault");
  if (!made) return made.error();
  const std::shared_ptr<dax::DevDax> dev = std::move(made).value();
  mm::AddressSpace as;

  // One mmap / touch / munmap cycle; returns the seconds spent touching.
  auto cycle = [&]() -> Result<double> {
    auto addr = as.mmap(0, region, kRW, mm::kMapShared, dev, 0);
    if (!addr) return addr.error();
    const std::uint8_t one = 1;
    const auto t0 = SteadyClock::now();
    for (std::uint64_t off = 0; off < region; off += step) {
      if (mm::SignalInfo sig = as.write(*addr + off, &one, 1)) [[unlikely]] {
        (void)as.munmap(*addr, region);
        return Error(Errc::dead, fmt::format("{}: touch at {:#x}: {}", label, sig.addr, sig.why));
      }
    }
    const double seconds = seconds_since(t0);
    if (Errc e = as.munmap(*addr, region); e != Errc::ok) {
      return Error(e, fmt::format("{}: munmap failed", label));
    }
    return seconds;
  };

  auto run_all = [&]() -> Result<std::vector<double>> {
    auto warm = cycle();  // host page faults of the backing, page-table allocation
    if (!warm) return warm.error();
    auto probe = cycle();
    if (!probe) return probe.error();
    const auto cycles = static_cast<unsigned>(
        std::max(1.0, std::ceil(cfg.min_rep_seconds / std::max(*probe, 1e-9))));
    std::vector<double> ns;
    for (unsigned r = 0; r < cfg.reps; ++r) {
      double seconds = 0;
      for (unsigned c = 0; c < cycles; ++c) {
        auto s = cycle();
        if (!s) return s.error();
        seconds += *s;
      }
      ns.push_back(seconds * 1e9 / static_cast<double>(faults * cycles));
    }
    return ns;
  };
  // On a pinned thread of its own, so the main thread's affinity stays as it was.
  std::optional<Result<std::vector<double>>> ns;
  std::thread runner([&] {
    pin_to_cpu_index(0);
    ns.emplace(run_all());
  });
  runner.join();
  Status unbound = unbind(*dev, label);
  if (!*ns) return ns->error();
  if (!unbound.ok()) return unbound.error();

  Row row;
  row.suite = "fault";
  row.name = "first_touch";
  row.strategy = std::string(strategy_name(strategy));
  row.threads = 1;
  row.page_size = step;
  row.bytes = region;
  row.metric = Metric::ns_per_op;
  row.summary = summarize(std::move(*ns).value());
  row.extra["faults_per_cycle"] = faults;
  row.note = fmt::format("per fault; {} faults per mmap", faults);
  return row;
}

}  // namespace

std::vector<Case> gup_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (Strategy s : cfg.strategies) {
    for (unsigned order : {0u, kPmdOrder}) {
      for (unsigned threads : cfg.threads) {
        cases.push_back({gup_label(s, order, threads),
                         [&cfg, s, order, threads] { return run_gup(cfg, s, order, threads); }});
      }
    }
  }
  return cases;
}

std::vector<Case> fault_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (Strategy s : cfg.strategies) {
    for (unsigned order : {0u, kPmdOrder}) {
      cases.push_back(
          {fault_label(s, order), [&cfg, s, order] { return run_fault(cfg, s, order); }});
    }
  }
  return cases;
}

}  // namespace pgmap::bench
