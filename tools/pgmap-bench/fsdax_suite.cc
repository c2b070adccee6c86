// Suite `fsdax`: the file-DAX paths of issue 10 §5, per strategy, on 1 and 2 threads. Every case
// runs on a DaxFs mounted on a DaxDevice over an FS_DAX pagemap (anonymous backing, base order 0)
// of the strategy under test; each thread uses its own file and its own address space, so the
// threads share the filesystem, the block allocator and the pagemap, not an inode.
//
//   fault_unmap  a file page mapped MAP_SHARED read-write: a 1-byte write faults it in (the
//                file's entry already exists after the warm-up, as in a page cache: the fault
//                locks the entry, takes the folio reference under the strategy and installs the
//                PTE or PMD), then the page is zapped (unmap_mapping_range of that page: the
//                mapping's reference is dropped). ns_per_op per fault + zap. page_size 4096: a
//                4 KiB file; 2097152: a 2 MiB file fallocated as one 2 MiB-aligned extent, so
//                every fault is a PMD fault (checked: pmd_faults counts them).
//   truncate     truncate to 0 of a file with N pages mapped (N = 1, 16, 256, 4096): break
//                layout (zap every PTE, scan the entries for busy pages), delete the entries
//                (disassociate, drop the entry's pagemap references) and free the blocks. Between
//                two truncates, untimed: fallocate N pages again and write-fault each of them.
//                ns_per_op per truncate; ns_per_page beside it. With 2 threads both truncate at
//                once (a barrier before each timed truncate).
//   entry_cycle  the seed patch's path on its own (dax_insert_entry + dax_delete_mapping_entry):
//                EntryMap::grab of a placeholder, the entry's pagemap association by strategy
//                (get_entry_refs per page under per_lookup/transition: pagemap_refs true; the
//                DevPagemap::Allocation of direct_access under alloc_event: allocation true;
//                nothing under sweep/none), unlock with the block entry; then lock_next,
//                put_entry_refs / release of the allocation, erase. For per_lookup and transition
//                a second row runs the same path with the references skipped (pagemap_refs false):
//                the difference of the two is what the seed patch costs. Folio metadata
//                association (mapping/index, order) is not included. ns_per_op per
//                insert + delete; page_size 4096 (one page) or 2097152 (a PMD entry: 512 refs).
//
// Each comparison (fault_unmap per page size, truncate per N, entry_cycle per page size) runs its
// members interleaved (compare.h) with `lock_pair` as its stability floor; every row's baseline
// is `none` at the same thread count. Each case ends with unmount, kill_dax and a bounded
// memunmap; a failure there, a signal on a touch or a failed filesystem call fails the case.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench.h"
#include "compare.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/entry_map.h"
#include "pgmap/fs/entry_refs.h"
#include "pgmap/fs/inode.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/address_space.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;
constexpr auto kTeardownTimeout = std::chrono::seconds(120);
constexpr std::uint64_t kTruncatePages[] = {1, 16, 256, 4096};
constexpr std::uint64_t kThreadSpacing = 64;  // entry_cycle: folios between two threads' pfns
// fault_unmap and entry_cycle are measured in slices (compare.h kSliceSeconds); truncate (up to
// 4096 pages per operation) keeps one repetition per round.

template <typename T>
struct alignas(128) Isolated {
  T value{};
};

Result<std::shared_ptr<DevPagemap>> make_fsdax_pagemap(Strategy strategy, std::uint64_t bytes) {
  BackingOptions bo;
  bo.size = align_up(bytes, kPmdSize);
  bo.align = kPmdSize;
  bo.name = "pgmap-bench fsdax";
  auto backing = make_anonymous_backing(bo);
  if (!backing) return backing.error();
  MemremapParams params;
  params.type = PagemapType::fs_dax;
  params.strategy = strategy;
  params.base_order = 0;
  params.ranges.push_back(PagemapRangeSpec{std::shared_ptr<Backing>(std::move(backing).value())});
  params.name = "pgmap-bench fsdax";
  return memremap(std::move(params));
}

Status memunmap_bounded(DevPagemap& pg, const std::string& label) {
  MemunmapOptions opts;
  opts.timeout = kTeardownTimeout;
  auto r = pg.memunmap(opts);
  if (!r) return Error(r.code(), fmt::format("{}: memunmap: {}", label, r.error().to_string()));
  return {};
}

// One strategy's mounted filesystem with, per thread, an open file mapped into the thread's own
// address space.
struct FsDevice {
  Strategy strategy;
  std::string label;
  std::shared_ptr<DevPagemap> pgmap;
  std::shared_ptr<dax::DaxDevice> dax;
  std::shared_ptr<fs::DaxFs> fs;
  std::vector<fs::File> files;                            // per thread
  std::vector<std::unique_ptr<mm::AddressSpace>> spaces;  // per thread
  std::vector<std::uint64_t> addrs;                       // per thread: the mapping's start
  std::vector<Isolated<std::uint64_t>> errors;            // per thread: failed operations
  std::string failure;                                    // the first failure, for the report
  std::mutex failure_mu;

  void fail(std::string why) {
    std::lock_guard<std::mutex> lock(failure_mu);
    if (failure.empty()) failure = std::move(why);
  }
  fs::Inode& inode(unsigned t) const { return files[t].inode(); }
};

// Mounts a filesystem of `bytes` and opens one file per thread, mapped `map_bytes` long.
Result<std::unique_ptr<FsDevice>> make_fs(const Config& cfg, Strategy strategy, std::uint64_t bytes,
                                          std::uint64_t map_bytes, std::string label) {
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  auto pg = make_fsdax_pagemap(strategy, bytes);
  if (!pg) return pg.error();
  auto d = std::make_unique<FsDevice>();
  d->strategy = strategy;
  d->label = std::move(label);
  d->pgmap = std::move(pg).value();
  auto dax = dax::DaxDevice::create(d->pgmap, "pgmap-bench-pmem");
  if (!dax) return dax.error();
  d->dax = std::move(dax).value();
  auto mounted = fs::DaxFs::mount(d->dax);
  if (!mounted) return mounted.error();
  d->fs = std::move(mounted).value();
  for (unsigned t = 0; t < most_threads; ++t) {
    auto f = d->fs->create(fmt::format("file{}", t));
    if (!f) return f.error();
    d->files.push_back(std::move(f).value());
    d->spaces.push_back(std::make_unique<mm::AddressSpace>());
    auto addr =
        d->spaces.back()->mmap(0, map_bytes, kRW, mm::kMapShared, d->files.back().mapping(), 0);
    if (!addr) return addr.error();
    d->addrs.push_back(*addr);
  }
  d->errors.resize(most_threads);
  return d;
}

// Unmaps, closes, unmounts, kills the device and tears the pagemap down; the first failure.
Status teardown(FsDevice& d) {
  d.spaces.clear();
  d.files.clear();
  Status st;
  if (Errc e = d.fs->unmount(); e != Errc::ok) {
    st = Error(e, fmt::format("{}: unmount failed", d.label));
  }
  d.fs.reset();
  if (Errc e = d.dax->kill(); e != Errc::ok && st.ok()) {
    st = Error(e, fmt::format("{}: kill_dax failed", d.label));
  }
  Status un = memunmap_bounded(*d.pgmap, d.label);
  if (st.ok()) st = un;
  std::uint64_t failed = 0;
  for (const auto& e : d.errors)
    failed += e.value;
  if (failed != 0) {
    return Error(Errc::busy,
                 fmt::format("{}: {} failed operations (first: {})", d.label, failed, d.failure));
  }
  return st;
}

// A strategy's member of an fsdax comparison: the row fields every case sets alike (the caller adds
// bytes, extra, note and the variant).
Member strategy_member(const char* case_name, Strategy s, unsigned threads,
                       std::uint64_t page_size) {
  Member m;
  m.row.suite = "fsdax";
  m.row.name = case_name;
  m.row.strategy = std::string(strategy_name(s));
  m.row.threads = threads;
  m.row.page_size = page_size;
  return m;
}

Member lock_pair_member(const std::string& suite_name, std::uint64_t page_size, const Config& cfg,
                        std::vector<Isolated<std::atomic<std::int64_t>>>& ctr) {
  Member m;
  m.row.suite = "fsdax";
  m.row.name = "lock_pair";
  m.row.page_size = page_size;
  m.row.note = "stability floor: lock add + lock sub, thread-private line";
  m.variant = loop_variant(suite_name + " lock_pair", {1, 1, cfg.min_rep_seconds},
                           [&ctr](unsigned, std::uint64_t ops) {
                             std::atomic<std::int64_t>& x = ctr[0].value;
                             for (std::uint64_t i = 0; i < ops; ++i) {
                               x.fetch_add(1);
                               x.fetch_sub(1);
                               clobber_memory();
                             }
                           });
  return m;
}

// Every row but the floor: baseline `none` at the same thread count (and page size: one
// comparison has one page size).
// The last member is the comparison's lock_pair.
void finish_comparison(Comparison& c) {
  const int floor = static_cast<int>(c.members.size()) - 1;
  for (Member& m : c.members) {
    if (m.row.name == "lock_pair" || m.row.strategy == "none") continue;
    m.baseline = find_member(c, m.row.name, "none", m.row.threads);
  }
  c.stability_floor = floor;
}

// ---- fault_unmap ------------------------------------------------------------------------------

std::string fault_unmap_name(std::uint64_t page_size) {
  return fmt::format("fsdax fault_unmap @{}", format_page_size(page_size));
}

ThreadBody fault_unmap_body(FsDevice& d, std::uint64_t page_size) {
  return [&d, page_size](unsigned t, std::uint64_t ops) {
    mm::AddressSpace& as = *d.spaces[t];
    fs::Inode& inode = d.inode(t);
    const std::uint64_t addr = d.addrs[t];
    const std::uint64_t pages = page_size / kPageSize;
    const std::uint8_t one = 1;
    std::uint64_t bad = 0;
    for (std::uint64_t i = 0; i < ops; ++i) {
      if (mm::SignalInfo sig = as.write(addr, &one, 1)) [[unlikely]] {
        if (bad++ == 0) d.fail(fmt::format("{}: touch: {}", d.label, sig.why));
      }
      if (inode.unmap_mapping_range(0, pages) != 1) [[unlikely]] {
        if (bad++ == 0) d.fail(fmt::format("{}: the zap found no entry", d.label));
      }
      clobber_memory();
    }
    d.errors[t].value += bad;
  };
}

Result<std::vector<Row>> run_fault_unmap(const Config& cfg, std::uint64_t page_size) {
  const std::string name = fault_unmap_name(page_size);
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  std::vector<std::unique_ptr<FsDevice>> devices;
  for (Strategy s : cfg.strategies) {
    const std::string label = fmt::format("{} {}", name, strategy_name(s));
    auto made = make_fs(cfg, s, 8 * kMiB + most_threads * 2 * page_size, page_size, label);
    if (!made) return made.error();
    FsDevice& d = **made;
    for (unsigned t = 0; t < most_threads; ++t) {
      fs::FallocOptions fo;
      fo.pmd_aligned = page_size == kPmdSize;
      if (Status st = d.inode(t).fallocate(fs::FallocMode::allocate, 0, page_size, fo); !st) {
        return Error(st.code(), fmt::format("{}: fallocate: {}", label, st.error().to_string()));
      }
      // The first fault inserts the entry; check that it is of the page size asked for.
      const std::uint8_t one = 1;
      if (mm::SignalInfo sig = d.spaces[t]->write(d.addrs[t], &one, 1)) {
        return Error(Errc::dead, fmt::format("{}: first touch: {}", label, sig.why));
      }
      auto pte = d.spaces[t]->lookup(d.addrs[t]);
      const mm::Level want = page_size == kPmdSize ? mm::Level::pmd : mm::Level::pte;
      if (!pte || pte->level != want) {
        return Error(Errc::invalid_argument,
                     fmt::format("{}: the first fault did not map a {} entry", label,
                                 format_page_size(page_size)));
      }
    }
    devices.push_back(std::move(made).value());
  }
  std::vector<Isolated<std::atomic<std::int64_t>>> ctr(1);
  Comparison c;
  c.name = name;
  for (auto& d : devices) {
    for (unsigned threads : cfg.threads) {
      Member m = strategy_member("fault_unmap", d->strategy, threads, page_size);
      m.row.bytes = page_size;
      m.row.extra["unmap"] = "zap";
      m.row.note = fmt::format("per {} fault + zap", page_size == kPmdSize ? "PMD" : "PTE");
      m.variant = loop_variant(fmt::format("{} {} threads={}", name, m.row.strategy, threads),
                               {threads, 1, cfg.min_rep_seconds}, fault_unmap_body(*d, page_size));
      c.members.push_back(std::move(m));
    }
  }
  c.members.push_back(lock_pair_member(name, page_size, cfg, ctr));
  finish_comparison(c);
  c.slice_seconds = kSliceSeconds;
  std::vector<Row> rows = run_comparison(cfg, c);
  std::string failures;
  for (auto& d : devices) {
    std::uint64_t pmd = 0;
    std::uint64_t pte = 0;
    for (unsigned t = 0; t < d->files.size(); ++t) {
      const fs::FaultStats s = d->inode(t).fault_stats();
      pmd += s.pmd(fs::FaultStats::kBlock);
      pte += s.pte(fs::FaultStats::kBlock);
    }
    for (Row& r : rows) {
      if (r.strategy != strategy_name(d->strategy) || r.name != "fault_unmap") continue;
      r.extra["pmd_faults"] = pmd;  // over the whole comparison, all threads
      r.extra["pte_faults"] = pte;
    }
    if (page_size == kPmdSize && pte != 0) {
      failures += fmt::format("{}: {} PTE faults in the PMD case; ", d->label, pte);
    }
    if (Status st = teardown(*d); !st) failures += st.to_string() + "; ";
  }
  if (!failures.empty()) return Error(Errc::busy, failures);
  return rows;
}

// ---- truncate ---------------------------------------------------------------------------------

std::string truncate_name(std::uint64_t pages) {
  return fmt::format("fsdax truncate N={}", pages);
}

// Re-extends thread t's file to `pages` blocks and write-faults each page (untimed); false on a
// failure (recorded).
bool refill(FsDevice& d, unsigned t, std::uint64_t pages) {
  fs::Inode& inode = d.inode(t);
  if (Status st = inode.fallocate(fs::FallocMode::allocate, 0, pages * kPageSize); !st) {
    d.fail(fmt::format("{}: fallocate: {}", d.label, st.to_string()));
    return false;
  }
  const std::uint8_t one = 1;
  for (std::uint64_t p = 0; p < pages; ++p) {
    if (mm::SignalInfo sig = d.spaces[t]->write(d.addrs[t] + p * kPageSize, &one, 1)) {
      d.fail(fmt::format("{}: touch: {}", d.label, sig.why));
      return false;
    }
  }
  return true;
}

// One repetition: `cycles` refill + timed truncate per thread, all threads at once; the seconds
// each thread spent truncating (and its CPU time), summed.
struct TruncateTimes {
  std::vector<double> wall;
  std::vector<double> cpu;
};

TruncateTimes truncate_rep(FsDevice& d, unsigned threads, std::uint64_t pages, unsigned cycles) {
  TruncateTimes out;
  out.wall.assign(threads, 0);
  out.cpu.assign(threads, 0);
  std::barrier sync(static_cast<std::ptrdiff_t>(threads));
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      pin_to_cpu_index(t);
      for (unsigned c = 0; c < cycles; ++c) {
        const bool ok = refill(d, t, pages);
        sync.arrive_and_wait();
        const double c0 = thread_cpu_seconds();
        const auto t0 = SteadyClock::now();
        Status st = d.inode(t).truncate(0);
        out.wall[t] += seconds_since(t0);
        out.cpu[t] += thread_cpu_seconds() - c0;
        if (!ok || !st) {
          ++d.errors[t].value;
          if (!st) d.fail(fmt::format("{}: truncate: {}", d.label, st.to_string()));
        }
      }
    });
  }
  for (std::thread& w : workers)
    w.join();
  return out;
}

Variant truncate_variant(const Config& cfg, FsDevice& d, unsigned threads, std::uint64_t pages,
                         std::string name) {
  auto cycles = std::make_shared<unsigned>(1);
  Variant v;
  v.name = std::move(name);
  v.prepare = [&cfg, &d, threads, pages, cycles] {
    (void)truncate_rep(d, threads, pages, 1);  // warm-up; failures are recorded in d
    const auto t0 = SteadyClock::now();
    (void)truncate_rep(d, threads, pages, 2);
    // A repetition (refills included) lasts about min_rep_seconds, and has at least 2 truncates.
    const double per_cycle = seconds_since(t0) / 2;
    *cycles = static_cast<unsigned>(
        std::max(2.0, std::ceil(cfg.min_rep_seconds / std::max(per_cycle, 1e-9))));
  };
  v.run_rep = [&d, threads, pages, cycles] {
    const TruncateTimes tt = truncate_rep(d, threads, pages, *cycles);
    Sample s;
    for (unsigned t = 0; t < threads; ++t) {
      s.wall_ns += tt.wall[t];
      s.cpu_ns += tt.cpu[t];
    }
    const double ops = static_cast<double>(threads) * *cycles;
    s.wall_ns = s.wall_ns * 1e9 / ops;
    s.cpu_ns = s.cpu_ns * 1e9 / ops;
    return s;
  };
  return v;
}

Result<std::vector<Row>> run_truncate(const Config& cfg, std::uint64_t pages) {
  const std::string name = truncate_name(pages);
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  const std::uint64_t file_bytes = pages * kPageSize;
  std::vector<std::unique_ptr<FsDevice>> devices;
  for (Strategy s : cfg.strategies) {
    auto made =
        make_fs(cfg, s, 8 * kMiB + most_threads * file_bytes, align_up(file_bytes, kPmdSize),
                fmt::format("{} {}", name, strategy_name(s)));
    if (!made) return made.error();
    devices.push_back(std::move(made).value());
  }
  std::vector<Isolated<std::atomic<std::int64_t>>> ctr(1);
  Comparison c;
  c.name = name;
  for (auto& d : devices) {
    for (unsigned threads : cfg.threads) {
      Member m = strategy_member("truncate", d->strategy, threads, kPageSize);
      m.row.bytes = file_bytes;
      m.row.extra["mapped_pages"] = pages;
      m.row.note = fmt::format("per truncate of {} mapped pages", pages);
      m.variant = truncate_variant(cfg, *d, threads, pages,
                                   fmt::format("{} {} threads={}", name, m.row.strategy, threads));
      c.members.push_back(std::move(m));
    }
  }
  c.members.push_back(lock_pair_member(name, kPageSize, cfg, ctr));
  finish_comparison(c);
  std::vector<Row> rows = run_comparison(cfg, c);
  for (Row& r : rows) {
    if (r.name == "truncate") {
      r.extra["ns_per_page"] = r.summary.median / static_cast<double>(pages);
    }
  }
  std::string failures;
  for (auto& d : devices) {
    if (Status st = teardown(*d); !st) failures += st.to_string() + "; ";
  }
  if (!failures.empty()) return Error(Errc::busy, failures);
  return rows;
}

// ---- entry_cycle ------------------------------------------------------------------------------

std::string entry_cycle_name(std::uint64_t page_size) {
  return fmt::format("fsdax entry_cycle @{}", format_page_size(page_size));
}

// One strategy's pagemap and, per thread, an entry map of its own and the pfn its entry maps.
struct EntryDevice {
  Strategy strategy;
  std::shared_ptr<DevPagemap> pgmap;
  std::vector<std::unique_ptr<fs::EntryMap>> maps;  // per thread
  std::vector<Pfn> pfns;                            // per thread
  std::vector<Isolated<std::uint64_t>> errors;      // per thread
};

// What the entry of this row holds for its pages.
enum class EntryHold { nothing, pagemap_refs, allocation };

EntryHold hold_of(Strategy s) {
  if (fs::entry_holds_pagemap_refs(s)) return EntryHold::pagemap_refs;
  return s == Strategy::alloc_event ? EntryHold::allocation : EntryHold::nothing;
}

ThreadBody entry_cycle_body(EntryDevice& d, unsigned order, EntryHold hold) {
  return [&d, order, hold](unsigned t, std::uint64_t ops) {
    fs::EntryMap& map = *d.maps[t];
    DevPagemap& pg = *d.pgmap;
    const Pfn pfn = d.pfns[t];
    const std::uint64_t pages = order_pages(order);
    const std::uint64_t index = 0;
    std::uint64_t bad = 0;
    for (std::uint64_t i = 0; i < ops; ++i) {
      // dax_insert_entry: a locked placeholder, the association, the block entry stored.
      auto slot = map.grab(index, order);
      if (!slot) [[unlikely]] {
        ++bad;
        continue;
      }
      DevPagemap::Allocation alloc;
      if (hold == EntryHold::pagemap_refs) {
        if (fs::get_entry_refs(pg, pages) != Errc::ok) [[unlikely]]
          ++bad;
      } else if (hold == EntryHold::allocation) {
        auto a = pg.request(pfn, pages);
        if (a) {
          alloc = std::move(a).value();
        } else {
          ++bad;
        }
      }
      map.unlock(slot->index, fs::Entry::block(pfn, order));
      clobber_memory();
      // dax_delete_mapping_entry: lock the entry, disassociate, erase.
      auto del = map.lock_next(index, index + 1);
      if (!del) [[unlikely]] {
        ++bad;
        continue;
      }
      if (hold == EntryHold::pagemap_refs) fs::put_entry_refs(pg, pages);
      alloc.reset();
      map.erase(del->index);
      clobber_memory();
    }
    d.errors[t].value += bad;
  };
}

Result<std::vector<Row>> run_entry_cycle(const Config& cfg, unsigned order) {
  const std::uint64_t page_size = order_bytes(order);
  const std::string name = entry_cycle_name(page_size);
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  std::vector<std::unique_ptr<EntryDevice>> devices;
  for (Strategy s : cfg.strategies) {
    auto pg = make_fsdax_pagemap(
        s, std::max<std::uint64_t>(8 * kMiB, most_threads * kThreadSpacing * page_size));
    if (!pg) return pg.error();
    auto d = std::make_unique<EntryDevice>();
    d->strategy = s;
    d->pgmap = std::move(pg).value();
    const PfnRange range = d->pgmap->range(0);
    for (unsigned t = 0; t < most_threads; ++t) {
      d->maps.push_back(std::make_unique<fs::EntryMap>());
      d->pfns.push_back(range.start + ((t * kThreadSpacing) << order));
    }
    d->errors.resize(most_threads);
    devices.push_back(std::move(d));
  }
  std::vector<Isolated<std::atomic<std::int64_t>>> ctr(1);
  Comparison c;
  c.name = name;
  for (auto& d : devices) {
    const EntryHold own = hold_of(d->strategy);
    std::vector<EntryHold> holds = {own};
    if (own == EntryHold::pagemap_refs) holds.push_back(EntryHold::nothing);
    for (EntryHold hold : holds) {
      for (unsigned threads : cfg.threads) {
        Member m = strategy_member("entry_cycle", d->strategy, threads, page_size);
        m.row.extra["pagemap_refs"] = hold == EntryHold::pagemap_refs;
        m.row.extra["allocation"] = hold == EntryHold::allocation;
        m.row.note = hold == EntryHold::pagemap_refs
                         ? fmt::format("per insert+delete; {} pagemap refs", order_pages(order))
                     : hold == EntryHold::allocation ? "per insert+delete; an Allocation"
                     : own == EntryHold::pagemap_refs
                         ? "per insert+delete; refs skipped (the path without the seed patch)"
                         : "per insert+delete; no pagemap refs";
        m.variant =
            loop_variant(fmt::format("{} {} refs={} threads={}", name, m.row.strategy,
                                     hold == EntryHold::pagemap_refs, threads),
                         {threads, 1, cfg.min_rep_seconds}, entry_cycle_body(*d, order, hold));
        c.members.push_back(std::move(m));
      }
    }
  }
  c.members.push_back(lock_pair_member(name, page_size, cfg, ctr));
  finish_comparison(c);
  c.slice_seconds = kSliceSeconds;
  // The pagemap_refs:false rows of per_lookup/transition also compare with none (find_member
  // takes the first `none` row of that thread count, the only one).
  std::vector<Row> rows = run_comparison(cfg, c);
  std::string failures;
  for (auto& d : devices) {
    std::uint64_t failed = 0;
    for (const auto& e : d->errors)
      failed += e.value;
    for (auto& m : d->maps)
      failed += m->size();
    const std::string label = fmt::format("{} {}", name, strategy_name(d->strategy));
    Status un = memunmap_bounded(*d->pgmap, label);
    if (failed != 0) {
      failures += fmt::format("{}: {} failed entry operations or entries left; ", label, failed);
    } else if (!un) {
      failures += un.to_string() + "; ";
    }
  }
  if (!failures.empty()) return Error(Errc::busy, failures);
  return rows;
}

}  // namespace

std::vector<Case> fsdax_cases(const Config& cfg) {
  std::vector<Case> cases;
  const std::string shape = fmt::format("{} strategies x threads {} interleaved",
                                        cfg.strategies.size(), fmt::join(cfg.threads, ","));
  for (std::uint64_t page_size : {kPageSize, kPmdSize}) {
    Case c;
    c.label = fmt::format("{}: {}", fault_unmap_name(page_size), shape);
    c.run_rows = [&cfg, page_size] { return run_fault_unmap(cfg, page_size); };
    cases.push_back(std::move(c));
  }
  for (std::uint64_t pages : kTruncatePages) {
    Case c;
    c.label = fmt::format("{}: {}", truncate_name(pages), shape);
    c.run_rows = [&cfg, pages] { return run_truncate(cfg, pages); };
    cases.push_back(std::move(c));
  }
  for (unsigned order : {0u, kPmdOrder}) {
    Case c;
    c.label = fmt::format("{}: {}", entry_cycle_name(order_bytes(order)), shape);
    c.run_rows = [&cfg, order] { return run_entry_cycle(cfg, order); };
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace pgmap::bench
