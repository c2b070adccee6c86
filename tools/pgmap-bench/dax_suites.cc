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
// Every strategy of one page size (and, for gup, every thread count) forms one interleaved
// comparison (compare.h), each row's baseline `none`; gup/floor_batched (gup_floor.h, when it is
// in the tree) is the floor of the 4 KiB gup rows, measured in the same rounds.
//
// Each case ends with DevDax::unbind() (the address spaces still mapped, so unbind zaps them);
// an unbind failure, a failed pin/unpin or a signal on a touch fails the case.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench.h"
#include "compare.h"
// Set by CMakeLists.txt when gup_floor.cc is in the tree (a compile definition rather than
// __has_include, so that a build cache sees the change).
#if PGMAP_BENCH_HAVE_GUP_FLOOR
#include "gup_floor.h"
#endif
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

std::string gup_name(unsigned order) {
  return fmt::format("gup pin_unpin @{}", format_page_size(order_bytes(order)));
}

// One strategy's device of a gup comparison: a DevDax and, per thread, an address space mapping
// its own pre-faulted 2 MiB of it.
struct GupDevice {
  Strategy strategy;
  std::shared_ptr<dax::DevDax> dev;
  std::vector<std::unique_ptr<mm::AddressSpace>> spaces;
  std::vector<std::uint64_t> addrs;
  std::vector<std::uint64_t> errors;
  mm::GupStats stats;  // of one call, outside the measurement
};

Result<std::unique_ptr<GupDevice>> make_gup_device(const Config& cfg, Strategy strategy,
                                                   unsigned order) {
  const std::string label = fmt::format("{} {}", gup_name(order), strategy_name(strategy));
  // Sized for the largest thread count of the run, so every row of a page size has one size.
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  const std::uint64_t wanted = cfg.quick ? 0 : order == 0 ? 64 * kMiB : 256 * kMiB;
  const std::uint64_t bytes = std::max(wanted, most_threads * kGupRegion);
  auto made = make_devdax(strategy, order, bytes, "pgmap-bench gup");
  if (!made) return made.error();
  auto g = std::make_unique<GupDevice>();
  g->strategy = strategy;
  g->dev = std::move(made).value();
  for (unsigned t = 0; t < most_threads; ++t) {
    g->spaces.push_back(std::make_unique<mm::AddressSpace>());
    auto addr = g->spaces.back()->mmap(0, kGupRegion, kRW, mm::kMapShared, g->dev, t * kGupRegion);
    if (!addr) return addr.error();
    g->addrs.push_back(*addr);
    const std::uint8_t one = 1;
    for (std::uint64_t off = 0; off < kGupRegion; off += kPageSize) {
      if (mm::SignalInfo sig = g->spaces.back()->write(*addr + off, &one, 1)) {
        return Error(Errc::dead,
                     fmt::format("{}: pre-fault at {:#x}: {}", label, sig.addr, sig.why));
      }
    }
  }
  g->errors.assign(most_threads, 0);
  auto pages = mm::pin_user_pages(*g->spaces[0], g->addrs[0], kGupPages, mm::kFollWrite, &g->stats);
  if (!pages) return pages.error();
  if (Errc e = mm::unpin_user_pages(*pages); e != Errc::ok) {
    return Error(e, fmt::format("{}: unpin_user_pages failed", label));
  }
  return g;
}

ThreadBody gup_body(GupDevice& g, std::uint64_t pages_per_call) {
  return [&g, pages_per_call](unsigned t, std::uint64_t ops) {
    mm::AddressSpace& as = *g.spaces[t];
    const std::uint64_t addr = g.addrs[t];
    std::uint64_t bad = 0;
    mm::PinnedPages pages;  // reused: its storage is allocated by the first call only
    for (std::uint64_t i = 0; i < ops; ++i) {
      if (mm::pin_user_pages_into(pages, as, addr, pages_per_call, mm::kFollWrite) != Errc::ok)
          [[unlikely]] {
        ++bad;
      } else if (mm::unpin_user_pages(pages) != Errc::ok) [[unlikely]] {
        ++bad;
      }
      clobber_memory();
    }
    g.errors[t] += bad;
  };
}

// gup/floor_batched: the minimum work of a batched pin+unpin of kGupPages 4 KiB pages (one walk
// per page-table page; per entry: load the PTE, one locked add of the pin bias on the dense
// refcount, re-check the PTE, store the result; unpin one locked sub). Its kernel is the mm
// layer's GupFloor (tools/pgmap-bench/gup_floor.{h,cc}); when that file is absent from the tree
// the gup comparison has no floor row, floor_ratio is absent, and lock_pair is its stability floor.
struct GupFloorHook {
  ThreadBody body;                 // ns per call; the comparison divides by kGupPages
  std::function<bool()> balanced;  // after the run: every refcount back where it started
};

#if PGMAP_BENCH_HAVE_GUP_FLOOR
std::optional<GupFloorHook> gup_floor_batched() {
  struct State {
    GupFloor floor;
    std::uint64_t changed = 0;
  };
  auto st = std::make_shared<State>();
  GupFloorHook hook;
  hook.body = [st](unsigned, std::uint64_t ops) {
    for (std::uint64_t i = 0; i < ops; ++i) {
      st->changed += st->floor.pin_unpin(kGupPages);
      clobber_memory();
    }
  };
  hook.balanced = [st] { return st->changed == 0 && st->floor.balanced(); };
  return hook;
}
#else
std::optional<GupFloorHook> gup_floor_batched() {
  return std::nullopt;
}
#endif

template <typename T>
struct alignas(128) Isolated {
  T value{};
};

Result<std::vector<Row>> run_gup(const Config& cfg, unsigned order) {
  std::vector<std::unique_ptr<GupDevice>> devices;
  for (Strategy s : cfg.strategies) {
    auto g = make_gup_device(cfg, s, order);
    if (!g) return g.error();
    devices.push_back(std::move(g).value());
  }
  std::vector<Isolated<std::atomic<std::int64_t>>> lock_counters(1);

  Comparison c;
  c.name = gup_name(order);
  for (auto& g : devices) {
    for (unsigned threads : cfg.threads) {
      Member m;
      m.row.suite = "gup";
      m.row.name = "pin_unpin";
      m.row.strategy = std::string(strategy_name(g->strategy));
      m.row.threads = threads;
      m.row.page_size = order_bytes(order);
      m.row.bytes = g->dev->size();
      m.row.extra["pages_per_call"] = kGupPages;
      m.row.extra["folio_atomics"] = g->stats.folio_atomics;
      m.row.extra["pagemap_lookups"] = g->stats.pagemap_lookups;
      m.row.extra["gup_slow_pages"] = g->stats.slow;
      m.row.note = fmt::format("per 4K page; {} folio atomics/call", g->stats.folio_atomics);
      m.variant = loop_variant(fmt::format("{} {} threads={}", c.name, m.row.strategy, threads),
                               {threads, 1, cfg.min_rep_seconds}, gup_body(*g, kGupPages),
                               static_cast<double>(kGupPages));
      c.members.push_back(std::move(m));
    }
    if (order == 0) {
      // The fixed cost of a call: pin+unpin of one 4 KiB page, ns per call.
      Member m;
      m.row.suite = "gup";
      m.row.name = "pin_unpin_1page";
      m.row.strategy = std::string(strategy_name(g->strategy));
      m.row.page_size = kPageSize;
      m.row.bytes = g->dev->size();
      m.row.extra["pages_per_call"] = 1;
      m.row.note = "per call of 1 page";
      m.variant = loop_variant(fmt::format("{} 1-page {}", c.name, m.row.strategy),
                               {1, 1, cfg.min_rep_seconds}, gup_body(*g, 1));
      c.members.push_back(std::move(m));
    }
  }
  int floor = -1;
  std::optional<GupFloorHook> floor_hook;
  if (order == 0) floor_hook = gup_floor_batched();
  if (floor_hook) {
    Member m;
    m.row.suite = "gup";
    m.row.name = "floor_batched";
    m.row.page_size = kPageSize;
    m.row.extra["pages_per_call"] = kGupPages;
    m.row.note = "floor: minimum work of a batched pin+unpin, per 4K page";
    m.variant = loop_variant(c.name + " floor_batched", {1, 1, cfg.min_rep_seconds},
                             floor_hook->body, static_cast<double>(kGupPages));
    c.members.push_back(std::move(m));
    floor = static_cast<int>(c.members.size()) - 1;
  }
  {
    Member m;
    m.row.suite = "gup";
    m.row.name = "lock_pair";
    m.row.page_size = order_bytes(order);
    m.row.note = "stability floor: lock add + lock sub, thread-private line";
    m.variant = loop_variant(c.name + " lock_pair", {1, 1, cfg.min_rep_seconds},
                             [&lock_counters](unsigned, std::uint64_t ops) {
                               std::atomic<std::int64_t>& x = lock_counters[0].value;
                               for (std::uint64_t i = 0; i < ops; ++i) {
                                 x.fetch_add(1);
                                 x.fetch_sub(1);
                                 clobber_memory();
                               }
                             });
    c.members.push_back(std::move(m));
  }
  c.stability_floor = floor >= 0 ? floor : static_cast<int>(c.members.size()) - 1;
  for (Member& m : c.members) {
    if (m.row.name != "pin_unpin" && m.row.name != "pin_unpin_1page") continue;
    if (m.row.strategy != "none") m.baseline = find_member(c, m.row.name, "none", m.row.threads);
    if (m.row.name == "pin_unpin") m.floor = floor;
  }
  c.slice_seconds = kSliceSeconds;
  std::vector<Row> rows = run_comparison(cfg, c);

  std::string failures;
  for (auto& g : devices) {
    std::uint64_t failed = 0;
    for (std::uint64_t e : g->errors)
      failed += e;
    const std::string label = fmt::format("{} {}", c.name, strategy_name(g->strategy));
    Status unbound = unbind(*g->dev, label);
    g->spaces.clear();
    if (failed != 0) {
      failures += fmt::format("{}: {} failed pin/unpin calls; ", label, failed);
    } else if (!unbound.ok()) {
      failures += unbound.to_string() + "; ";
    }
  }
  if (floor_hook && !floor_hook->balanced()) failures += "gup floor_batched: unbalanced refcounts";
  if (!failures.empty()) return Error(Errc::busy, failures);
  return rows;
}

// ---- fault ------------------------------------------------------------------------------------

std::string fault_name(unsigned order) {
  return fmt::format("fault first_touch @{}", format_page_size(order_bytes(order)));
}

struct FaultDevice {
  Strategy strategy;
  std::shared_ptr<dax::DevDax> dev;
  std::unique_ptr<mm::AddressSpace> as = std::make_unique<mm::AddressSpace>();
  std::uint64_t region = 0;
  std::uint64_t step = 0;
  unsigned cycles = 1;  // per repetition, calibrated by prepare
  std::string failure;  // the first failure of a cycle
};

// One mmap / touch / munmap cycle; the seconds spent touching, or a negative value on failure.
double fault_cycle(FaultDevice& f, const std::string& label) {
  auto addr = f.as->mmap(0, f.region, kRW, mm::kMapShared, f.dev, 0);
  if (!addr) {
    if (f.failure.empty()) f.failure = fmt::format("{}: mmap: {}", label, addr.error().to_string());
    return -1;
  }
  const std::uint8_t one = 1;
  const auto t0 = SteadyClock::now();
  for (std::uint64_t off = 0; off < f.region; off += f.step) {
    if (mm::SignalInfo sig = f.as->write(*addr + off, &one, 1)) [[unlikely]] {
      // The touch already failed; a munmap error would add nothing to the report.
      (void)f.as->munmap(*addr, f.region);
      if (f.failure.empty()) {
        f.failure = fmt::format("{}: touch at {:#x}: {}", label, sig.addr, sig.why);
      }
      return -1;
    }
  }
  const double seconds = seconds_since(t0);
  if (Errc e = f.as->munmap(*addr, f.region); e != Errc::ok) {
    if (f.failure.empty()) f.failure = fmt::format("{}: munmap failed", label);
    return -1;
  }
  return seconds;
}

// Runs `fn` on a thread pinned to the first usable CPU, so the main thread's affinity stays.
template <typename Fn>
void on_cpu0(Fn&& fn) {
  std::thread runner([&] {
    pin_to_cpu_index(0);
    fn();
  });
  runner.join();
}

Variant fault_variant(const Config& cfg, FaultDevice& f, const std::string& label) {
  Variant v;
  v.name = label;
  v.prepare = [&cfg, &f, label] {
    on_cpu0([&] {
      (void)fault_cycle(f, label);  // warm-up: host page faults, page tables; failures recorded
      const double probe = fault_cycle(f, label);
      f.cycles = static_cast<unsigned>(
          std::max(1.0, std::ceil(cfg.min_rep_seconds / std::max(probe, 1e-9))));
    });
  };
  v.run_rep = [&f, label] {
    Sample s;
    on_cpu0([&] {
      double seconds = 0;
      const double c0 = thread_cpu_seconds();
      for (unsigned c = 0; c < f.cycles; ++c)
        seconds += std::max(0.0, fault_cycle(f, label));
      const double cpu = thread_cpu_seconds() - c0;  // includes the untimed mmap/munmap
      const double faults = static_cast<double>(f.region / f.step * f.cycles);
      s.wall_ns = seconds * 1e9 / faults;
      s.cpu_ns = cpu * 1e9 / faults;
    });
    return s;
  };
  return v;
}

Result<std::vector<Row>> run_fault(const Config& cfg, unsigned order) {
  const std::uint64_t step = order_bytes(order);
  const std::uint64_t region =
      order == 0 ? (cfg.quick ? 2 * kMiB : 16 * kMiB) : (cfg.quick ? 16 * kMiB : 256 * kMiB);
  std::vector<std::unique_ptr<FaultDevice>> devices;
  for (Strategy s : cfg.strategies) {
    auto made = make_devdax(s, order, region, "pgmap-bench fault");
    if (!made) return made.error();
    auto f = std::make_unique<FaultDevice>();
    f->strategy = s;
    f->dev = std::move(made).value();
    f->region = region;
    f->step = step;
    devices.push_back(std::move(f));
  }
  Comparison c;
  c.name = fault_name(order);
  for (auto& f : devices) {
    Member m;
    m.row.suite = "fault";
    m.row.name = "first_touch";
    m.row.strategy = std::string(strategy_name(f->strategy));
    m.row.page_size = step;
    m.row.bytes = region;
    m.row.extra["faults_per_cycle"] = region / step;
    m.row.note = fmt::format("per fault; {} faults per mmap", region / step);
    m.variant = fault_variant(cfg, *f, c.name + " " + m.row.strategy);
    c.members.push_back(std::move(m));
  }
  for (Member& m : c.members) {
    if (m.row.strategy != "none") m.baseline = find_member(c, "first_touch", "none", 1);
  }
  std::vector<Row> rows = run_comparison(cfg, c);
  // The cpu_ns_per_op of a fault row includes the untimed mmap and munmap of each cycle.
  std::string failures;
  for (auto& f : devices) {
    Status unbound = unbind(*f->dev, c.name + " " + std::string(strategy_name(f->strategy)));
    if (!f->failure.empty()) {
      failures += f->failure + "; ";
    } else if (!unbound.ok()) {
      failures += unbound.to_string() + "; ";
    }
  }
  if (!failures.empty()) return Error(Errc::dead, failures);
  return rows;
}

}  // namespace

std::vector<Case> gup_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (unsigned order : {0u, kPmdOrder}) {
    Case c;
    c.label = fmt::format("{}: {} strategies x threads {} interleaved", gup_name(order),
                          cfg.strategies.size(), fmt::join(cfg.threads, ","));
    c.run_rows = [&cfg, order] { return run_gup(cfg, order); };
    cases.push_back(std::move(c));
  }
  return cases;
}

std::vector<Case> fault_cases(const Config& cfg) {
  std::vector<Case> cases;
  for (unsigned order : {0u, kPmdOrder}) {
    Case c;
    c.label =
        fmt::format("{}: {} strategies interleaved", fault_name(order), cfg.strategies.size());
    c.run_rows = [&cfg, order] { return run_fault(cfg, order); };
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace pgmap::bench
