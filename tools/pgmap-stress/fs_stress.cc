// pgmap-stress --fs: the DAX filesystem under random operations (see stress.h).
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fs_oracle.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/debug/fs_invariants.h"
#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/inode.h"
#include "pgmap/fs/pipe.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/address_space.h"
#include "stress.h"

namespace pgmap::stress {
namespace {

using Clock = std::chrono::steady_clock;
using Rng = std::mt19937_64;

constexpr std::uint64_t kMaxPages = 1024;  // files stay below 4 MiB
constexpr unsigned kNames = 10;

struct Map {
  std::shared_ptr<fs::Inode> inode;
  std::uint64_t addr = 0;
  std::uint64_t len = 0;
};

struct WorkerState {
  std::unique_ptr<mm::AddressSpace> as = std::make_unique<mm::AddressSpace>();
  std::vector<fs::File> files;
  std::vector<Map> maps;
};

struct Pipe {
  std::unique_ptr<fs::PipeBuffer> buf;
  std::uint64_t ino = 0;
  std::shared_ptr<fs::Inode> inode;  // the file it was spliced from
};
struct Dio {
  std::unique_ptr<fs::DioRequest> req;
  std::uint64_t ino = 0;
  bool async = false;
  std::shared_ptr<fs::Inode> inode;
};

class FsWorld {
 public:
  FsWorld(Strategy s, const Options& o)
      : s_(s), o_(o), rng_(o.seed ^ (0xf5ull << 8) ^ unsigned(s)) {
    BackingOptions b;
    b.size = o.quick ? 8 * kPmdSize : 16 * kPmdSize;
    b.align = kPmdSize;
    b.name = "pgmap-stress-fs";
    auto back = make_anonymous_backing(b);
    if (!back) throw std::runtime_error(back.error().to_string());
    backing_ = std::shared_ptr<Backing>(std::move(back).value());
    workers_.resize(o.threads);
  }

  Figures run();

 private:
  bool create_stack();
  void destroy_stack(std::uint64_t index);
  bool phase(std::uint64_t index);  // false: the stack could not be re-created (reported)
  void worker(unsigned t, Rng rng);
  void op(unsigned t, Rng& rng);
  void drain(bool all);
  void settle();
  void quiescent_checks(std::uint64_t index);

  void add(const std::string& kind, std::string what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (f_.violations[kind]++ < 1 && f_.first_reports.size() < 8)
      f_.first_reports.push_back(fmt::format("[{}] {}", kind, what));
  }
  void count(const char* op) {
    std::lock_guard<std::mutex> lock(mu_);
    ++f_.op_counts[op];
  }
  // Expected failures of an operation racing others or a removed device.
  void check_errc(Errc e, const char* what) {
    switch (e) {
      case Errc::ok:
      case Errc::dead:
      case Errc::no_memory:
      case Errc::busy:
      case Errc::not_found:
      case Errc::overlap:
      case Errc::invalid_argument:
      case Errc::out_of_range:
      case Errc::timed_out:
        return;
      default:
        add("unexpected", fmt::format("{}: {}", what, errc_name(e)));
    }
  }
  void check_signal(const mm::SignalInfo& sig, const char* what) {
    if (!sig) return;
    // SIGBUS: a page past EOF (a racing truncate), a write to a reflinked block, a shut-down
    // filesystem. SIGSEGV would be a mapping the worker does not know about.
    if (sig.signal != mm::Signal::sigbus || sig.code != mm::SigCode::bus_adrerr) {
      add("signal", fmt::format("{}: {} {}", what, mm::sig_code_name(sig.code), sig.why));
    }
  }
  // The data oracle (fs_oracle.h): a page of file `ino` holds zeros, a record written through
  // `ino` or a file it was reflinked from, or the DIO mark of one of those, word by word.
  void check_page(const std::byte* p, std::uint64_t ino, const std::string& where) {
    std::optional<std::string> bad;
    {
      std::lock_guard<std::mutex> lock(mu_);
      bad = stress::check_page(std::span<const std::byte>(p, kPageSize), ino, gen_, lineage_);
    }
    if (bad) add("data", where + ": " + *bad);
  }

  const Strategy s_;
  const Options o_;
  Rng rng_;
  std::shared_ptr<Backing> backing_;
  std::shared_ptr<DevPagemap> pgmap_;
  std::shared_ptr<dax::DaxDevice> dax_;
  std::shared_ptr<fs::DaxFs> fs_;
  std::uint64_t gen_ = 0;
  std::vector<WorkerState> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> killed_{false};
  std::atomic<unsigned> done_{0};  // workers finished in this phase

  std::mutex mu_;  // f_, lineage_, pipes_, dios_
  Figures f_;
  Lineage lineage_;
  std::vector<Pipe> pipes_;
  std::vector<Dio> dios_;
};

bool FsWorld::create_stack() {
  MemremapParams p;
  p.type = PagemapType::fs_dax;
  p.strategy = s_;
  p.ranges.push_back(PagemapRangeSpec{backing_, 0, 0});
  p.name = fmt::format("stress-fs-{}", gen_ + 1);
  if (s_ == Strategy::none) p.quarantine = true;
  auto pg = memremap(std::move(p));
  if (!pg) {
    add("unexpected", "memremap: " + pg.error().to_string());
    return false;
  }
  std::memset(backing_->data(), 0, backing_->size());  // reuse: the old owner's bytes go
  pgmap_ = std::move(pg).value();
  auto d = dax::DaxDevice::create(pgmap_, "stress-pmem");
  if (!d) {
    add("unexpected", "DaxDevice::create: " + d.error().to_string());
    return false;
  }
  dax_ = std::move(d).value();
  fs::MountOptions mo;
  mo.pre_remove_wait = std::chrono::milliseconds(200);
  mo.evict_report_every = std::chrono::seconds(10);
  auto m = fs::DaxFs::mount(dax_, mo);
  if (!m) {
    add("unexpected", "mount: " + m.error().to_string());
    return false;
  }
  fs_ = std::move(m).value();
  ++gen_;
  killed_.store(false);
  std::lock_guard<std::mutex> lock(mu_);
  lineage_.clear();
  ++f_.recreated;
  return true;
}

// Drops the holders (pipes consumed and checked, DIO completed); `all` false keeps about half of
// them, to be held across the next phase.
void FsWorld::drain(bool all) {
  std::vector<Pipe> pipes;
  std::vector<Dio> dios;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Pipe> keep_p;
    for (Pipe& p : pipes_)
      (all || (rng_() & 1) ? pipes : keep_p).push_back(std::move(p));
    pipes_ = std::move(keep_p);
    std::vector<Dio> keep_d;
    for (Dio& d : dios_)
      (all || (rng_() & 1) || d.async ? dios : keep_d).push_back(std::move(d));
    dios_ = std::move(keep_d);
  }
  for (Pipe& p : pipes) {
    auto bytes = p.buf->consume();
    if (!bytes) {
      add("unexpected", "pipe consume: " + bytes.error().to_string());
      continue;
    }
    for (std::size_t i = 0; i + kPageSize <= bytes->size(); i += kPageSize)
      check_page(bytes->data() + i, p.ino, fmt::format("pipe of ino {}", p.ino));
  }
  for (Dio& d : dios) {
    Errc e = d.async ? d.req->wait() : d.req->complete(dio_fill(d.ino));
    if (e != Errc::ok) add("unexpected", fmt::format("dio completion: {}", errc_name(e)));
  }
}

// Waits for the queued evictions. An eviction waits without bound for its pages' holders, which
// only this thread releases now: those of files that are no longer live go (then all of them).
void FsWorld::settle() {
  std::atomic<bool> flushed{false};
  std::thread t([&] {
    fs_->flush_evictions();
    flushed.store(true);
  });
  const auto t0 = Clock::now();
  while (!flushed.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::vector<Pipe> pipes;
    std::vector<Dio> dios;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto dying = [](const std::shared_ptr<fs::Inode>& i) {
        return i->state() != fs::Inode::State::live || i->nlink() == 0;
      };
      for (auto it = pipes_.begin(); it != pipes_.end();) {
        if (dying(it->inode)) {
          pipes.push_back(std::move(*it));
          it = pipes_.erase(it);
        } else {
          ++it;
        }
      }
      for (auto it = dios_.begin(); it != dios_.end();) {
        if (dying(it->inode) || it->async) {
          dios.push_back(std::move(*it));
          it = dios_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (Pipe& p : pipes) {
      if (auto bytes = p.buf->consume()) {
        check_page(bytes->data(), p.ino, fmt::format("pipe of ino {}", p.ino));
      }
    }
    for (Dio& d : dios) {
      Errc e = d.async ? d.req->wait() : d.req->complete(dio_fill(d.ino));
      if (e != Errc::ok) add("unexpected", fmt::format("dio completion: {}", errc_name(e)));
    }
    if (Clock::now() - t0 > std::chrono::seconds(1)) drain(true);
  }
  t.join();
  // Join the asynchronous completions still running: a DioRequest is not thread-safe as an
  // object (dio.h), so the checker may read only requests no completion thread is touching.
  std::vector<Dio> async;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = dios_.begin(); it != dios_.end();) {
      if (it->async) {
        async.push_back(std::move(*it));
        it = dios_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (Dio& d : async) {
    if (Errc e = d.req->wait(); e != Errc::ok)
      add("unexpected", fmt::format("dio completion: {}", errc_name(e)));
  }
}

void FsWorld::op(unsigned t, Rng& rng) {
  WorkerState& w = workers_[t];
  fs::DaxFs& fs = *fs_;
  auto name = [&] { return fmt::format("f{}", rng() % kNames); };
  auto pick_file = [&]() -> fs::File* {
    if (w.files.empty()) return nullptr;
    return &w.files[rng() % w.files.size()];
  };
  auto pick_map = [&]() -> Map* {
    if (w.maps.empty()) return nullptr;
    return &w.maps[rng() % w.maps.size()];
  };
  fs::BreakOptions brk;
  if (rng() % 4 == 0) {
    brk.nowait = true;
  } else {
    brk.timeout = std::chrono::milliseconds(300);
  }
  const std::uint64_t page = rng() % kMaxPages / (rng() % 2 == 0 ? 16 : 1);
  switch (rng() % 20) {
    case 0: {  // create / open
      count("create_open");
      if (w.files.size() >= 4) break;
      auto f = rng() % 2 == 0 ? fs.create(name()) : fs.open(name());
      if (f) {
        w.files.push_back(std::move(f).value());
      } else {
        check_errc(f.code(), "create/open");
      }
      break;
    }
    case 1: {  // close (may evict an unlinked file: waits for its pins)
      count("close");
      if (w.files.empty()) break;
      const std::size_t i = rng() % w.files.size();
      w.files.erase(w.files.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
    case 2:
      count("unlink");
      check_errc(fs.unlink(name()), "unlink");
      break;
    case 3:
    case 4:
    case 5: {  // write a record
      count("write");
      fs::File* f = pick_file();
      if (f == nullptr) break;
      const std::uint64_t r = record_word(gen_, f->inode().ino(), page);
      auto n = f->inode().write(page * kPageSize, &r, sizeof r);
      if (!n) check_errc(n.code(), "write");
      break;
    }
    case 6: {  // read and check
      count("read");
      fs::File* f = pick_file();
      if (f == nullptr) break;
      std::vector<std::byte> buf(kPageSize);
      auto n = f->inode().read(page * kPageSize, buf.data(), buf.size());
      if (!n) {
        check_errc(n.code(), "read");
      } else if (*n == kPageSize) {
        check_page(buf.data(), f->inode().ino(),
                   fmt::format("read of ino {} page {}", f->inode().ino(), page));
      }
      break;
    }
    case 7: {  // mmap
      count("mmap");
      fs::File* f = pick_file();
      if (f == nullptr || w.maps.size() >= 4) break;
      const std::uint64_t len = rng() % 2 == 0 ? 2 * kPmdSize : 64 * kPageSize;
      auto a = w.as->mmap(0, len, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f->mapping(), 0);
      if (a) {
        w.maps.push_back(Map{f->mapping(), *a, len});
      } else {
        check_errc(a.code(), "mmap");
      }
      break;
    }
    case 8: {  // munmap (the last mapping of an unlinked, closed file evicts it on the worker)
      count("munmap");
      if (w.maps.empty()) break;
      const std::size_t i = rng() % w.maps.size();
      check_errc(w.as->munmap(w.maps[i].addr, w.maps[i].len), "munmap");
      w.maps.erase(w.maps.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
    case 9:
    case 10: {  // fault: read (and check) or write a record through a mapping
      count("fault");
      Map* m = pick_map();
      if (m == nullptr) break;
      const std::uint64_t pg = page % (m->len / kPageSize);
      const std::uint64_t ino = m->inode->ino();
      if (rng() % 2 == 0) {
        std::vector<std::byte> buf(kPageSize);
        mm::SignalInfo sig = w.as->read(m->addr + pg * kPageSize, buf.data(), buf.size());
        check_signal(sig, "mapped read");
        if (!sig)
          check_page(buf.data(), ino, fmt::format("mapped read of ino {} page {}", ino, pg));
      } else {
        const std::uint64_t r = record_word(gen_, ino, pg);
        check_signal(w.as->write(m->addr + pg * kPageSize, &r, sizeof r), "mapped write");
      }
      break;
    }
    case 11: {  // truncate (page aligned)
      count("truncate");
      fs::File* f = pick_file();
      if (f == nullptr) break;
      check_errc(f->inode().truncate(page * kPageSize, brk).code(), "truncate");
      break;
    }
    case 12: {  // punch / zero / collapse
      fs::File* f = pick_file();
      if (f == nullptr) break;
      const fs::FallocMode mode = std::array{fs::FallocMode::punch_hole, fs::FallocMode::zero_range,
                                             fs::FallocMode::collapse_range}[rng() % 3];
      count(mode == fs::FallocMode::punch_hole   ? "punch"
            : mode == fs::FallocMode::zero_range ? "zero"
                                                 : "collapse");
      fs::FallocOptions o;
      o.brk = brk;
      const std::uint64_t len = (1 + rng() % 8) * kPageSize;
      check_errc(f->inode().fallocate(mode, page * kPageSize, len, o).code(), "fallocate");
      break;
    }
    case 13: {  // fallocate (2 MiB-aligned extents sometimes: PMD faults)
      count("fallocate");
      fs::File* f = pick_file();
      if (f == nullptr) break;
      fs::FallocOptions o;
      o.pmd_aligned = rng() % 2 == 0;
      const std::uint64_t off = o.pmd_aligned ? (rng() % 2) * kPmdSize : page * kPageSize;
      const std::uint64_t len = o.pmd_aligned ? kPmdSize : (1 + rng() % 16) * kPageSize;
      check_errc(f->inode().fallocate(fs::FallocMode::allocate, off, len, o).code(), "fallocate");
      break;
    }
    case 14: {  // reflink
      count("reflink");
      if (w.files.size() < 2) break;
      fs::File& a = w.files[rng() % w.files.size()];
      fs::File& b = w.files[rng() % w.files.size()];
      if (&a.inode() == &b.inode()) break;
      {
        // Before the share exists: b's pages may hold a's bytes from now on.
        std::lock_guard<std::mutex> lock(mu_);
        lineage_.reflinked(a.inode().ino(), b.inode().ino());
      }
      check_errc(fs.reflink(a.inode(), b.inode()), "reflink");
      break;
    }
    case 15:
    case 16: {  // hold a page: a pipe (reference) or a DIO request (pin)
      Map* m = pick_map();
      if (m == nullptr) break;
      const std::uint64_t pg = page % (m->len / kPageSize);
      const std::uint64_t ino = m->inode->ino();
      if (rng() % 2 == 0) {
        count("pipe");
        auto p = fs::PipeBuffer::vmsplice(*w.as, m->addr + pg * kPageSize, 1);
        if (!p) break;  // a hole past EOF, a shut-down filesystem
        std::lock_guard<std::mutex> lock(mu_);
        pipes_.push_back(
            Pipe{std::make_unique<fs::PipeBuffer>(std::move(p).value()), ino, m->inode});
      } else {
        count("dio");
        auto d = fs::DioRequest::submit(*w.as, m->addr + pg * kPageSize, 1);
        if (!d) break;
        std::lock_guard<std::mutex> lock(mu_);
        dios_.push_back(Dio{std::move(d).value(), ino, false, m->inode});
      }
      break;
    }
    case 17: {  // release a holder: consume a pipe (checked) or complete a DIO
      count("release");
      std::optional<Pipe> p;
      std::optional<Dio> d;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!pipes_.empty() && rng() % 2 == 0) {
          const std::size_t i = rng() % pipes_.size();
          p.emplace(std::move(pipes_[i]));
          pipes_.erase(pipes_.begin() + static_cast<std::ptrdiff_t>(i));
        } else if (!dios_.empty()) {
          const std::size_t i = rng() % dios_.size();
          if (!dios_[i].async) {
            d.emplace(std::move(dios_[i]));
            dios_.erase(dios_.begin() + static_cast<std::ptrdiff_t>(i));
          }
        }
      }
      if (p) {
        auto bytes = p->buf->consume();
        if (!bytes) {
          add("unexpected", "pipe consume: " + bytes.error().to_string());
        } else {
          check_page(bytes->data(), p->ino, fmt::format("pipe of ino {}", p->ino));
        }
      }
      if (d) {
        if (rng() % 2 == 0) {
          if (Errc e = d->req->complete(dio_fill(d->ino)); e != Errc::ok)
            add("unexpected", fmt::format("dio completion: {}", errc_name(e)));
        } else {
          // Asynchronous completion; joined by a later drain.
          d->req->complete_async(dio_fill(d->ino));
          d->async = true;
          std::lock_guard<std::mutex> lock(mu_);
          dios_.push_back(std::move(*d));
        }
      }
      break;
    }
    case 18: {  // evict: unlink a name and close every handle this worker has to it
      count("evict");
      fs::File* f = pick_file();
      if (f == nullptr) break;
      const std::uint64_t ino = f->inode().ino();
      (void)fs.unlink(fmt::format("f{}", rng() % kNames));  // any outcome is fine
      std::erase_if(w.files, [&](const fs::File& x) { return x.inode().ino() == ino; });
      break;
    }
    default:
      count("noop");
      break;
  }
}

void FsWorld::worker(unsigned t, Rng rng) {
  while (!stop_.load(std::memory_order_relaxed))
    op(t, rng);
  done_.fetch_add(1);
}

void FsWorld::quiescent_checks(std::uint64_t index) {
  settle();
  debug::Universe u;
  for (const WorkerState& w : workers_)
    u.address_spaces.push_back(w.as.get());
  u.complete = true;
  debug::FsUniverse fu;
  fu.filesystems.push_back(fs_.get());
  std::lock_guard<std::mutex> lock(mu_);
  for (const Pipe& p : pipes_)
    fu.pipes.push_back(p.buf.get());
  for (const Dio& d : dios_)
    fu.dios.push_back(d.req.get());
  debug::Report r = debug::check_fs_invariants(u, fu);
  ++f_.checker_runs;
  for (const debug::Violation& v : r.violations) {
    if (f_.violations["checker." + std::string(debug::check_name(v.check))]++ == 0 &&
        f_.first_reports.size() < 8) {
      f_.first_reports.push_back(fmt::format("[checker.{}] phase {}: {} pfn {:#x}: {}",
                                             debug::check_name(v.check), index, v.pagemap, v.pfn,
                                             v.detail));
    }
  }
  // No held block belongs to a file whose lineage does not meet the holder's (generic/503: a
  // pinned block is never handed to another file; fs_oracle.h).
  if (pgmap_->state() == DevPagemap::State::dead) return;
  std::vector<HeldPage> held;
  for (const Pipe& p : pipes_) {
    for (const mm::GupPage& g : p.buf->pages())
      held.push_back(HeldPage{g.pfn, p.ino, "pipe"});
  }
  for (const Dio& d : dios_) {
    for (const mm::GupPage& g : d.req->pages())
      held.push_back(HeldPage{g.pfn, d.ino, "DIO pin"});
  }
  for (std::string& v : handed_over(*pgmap_, *fs_, held, lineage_)) {
    if (f_.violations["handed_over"]++ == 0 && f_.first_reports.size() < 8)
      f_.first_reports.push_back(fmt::format("[handed_over] phase {}: {}", index, v));
  }
}

void FsWorld::destroy_stack(std::uint64_t index) {
  drain(true);
  for (WorkerState& w : workers_) {
    for (const Map& m : w.maps)
      check_errc(w.as->munmap(m.addr, m.len), "final munmap");
    w.maps.clear();
    w.files.clear();
  }
  settle();
  if (Errc e = fs_->unmount(); e != Errc::ok) {
    add("unexpected", fmt::format("phase {}: unmount: {}", index, errc_name(e)));
  }
  fs_.reset();
  if (!dax_->killed()) check_errc(dax_->kill(), "kill");
  MemunmapOptions mo;
  mo.timeout = std::chrono::seconds(20);
  auto r = pgmap_->memunmap(mo);
  if (!r) add("hang", fmt::format("phase {}: memunmap: {}", index, r.error().to_string()));
  if (s_ != Strategy::none && pgmap_->late_accesses() != 0) {
    add("late_access", fmt::format("{} late accesses", pgmap_->late_accesses()));
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++f_.unbinds;
}

bool FsWorld::phase(std::uint64_t index) {
  const double secs = o_.phase_seconds > 0 ? o_.phase_seconds : (o_.quick ? 0.15 : 0.3);
  const bool unbind = index % 3 == 2;  // the device goes away under the mounted filesystem
  stop_.store(false);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < o_.threads; ++t)
    threads.emplace_back([this, t, seed = rng_()] { worker(t, Rng(seed)); });
  Rng crng(rng_());
  std::this_thread::sleep_for(std::chrono::duration<double>(secs * (unbind ? 0.6 : 1.0)));
  if (unbind) {
    // kill_dax under running workers: pre-remove shuts the filesystem down and zaps mappings.
    check_errc(dax_->kill(), "kill under a mounted filesystem");
    killed_.store(true);
    std::this_thread::sleep_for(std::chrono::duration<double>(secs * 0.4));
  }
  stop_.store(true);
  // Workers blocked on holders (an eviction waits without bound) are released by draining.
  const auto t0 = Clock::now();
  while (done_.load() < o_.threads) {
    if (Clock::now() - t0 > std::chrono::milliseconds(300)) drain(true);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (auto& th : threads)
    th.join();
  done_.store(0);
  quiescent_checks(index);
  drain(false);
  if (killed_.load()) {
    destroy_stack(index);
    return create_stack();
  }
  return true;
}

Figures FsWorld::run() {
  const auto t0 = Clock::now();
  if (!create_stack()) return f_;
  std::uint64_t index = 0;
  bool stack = true;
  while (stack && std::chrono::duration<double>(Clock::now() - t0).count() < o_.seconds)
    stack = phase(index++);
  if (stack) {
    quiescent_checks(index);
    destroy_stack(index);
  }
  f_.strategy = s_;
  f_.phases = index;
  f_.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (const auto& [k, n] : f_.op_counts)
    f_.ops += n;
  return f_;
}

}  // namespace

Figures run_fs_strategy(Strategy s, const Options& opts) {
  FsWorld w(s, opts);
  return w.run();
}

}  // namespace pgmap::stress
