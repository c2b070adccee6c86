#include "stress.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/dax/devdax.h"
#include "pgmap/debug/invariants.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::stress {
namespace {

using Clock = std::chrono::steady_clock;
using Rng = std::mt19937_64;

// ---- the yield hook ----------------------------------------------------------------------------

std::atomic<std::uint64_t> g_hook_seed{0};
std::atomic<std::uint64_t> g_hook_threads{0};

struct HitSlot {
  std::atomic<const char*> name{nullptr};
  std::atomic<std::uint64_t> hits{0};
};
std::array<HitSlot, 64> g_hits;

void count_hit(const char* name) noexcept {
  const auto h = reinterpret_cast<std::uintptr_t>(name);
  for (std::size_t i = 0; i < g_hits.size(); ++i) {
    HitSlot& s = g_hits[(h / 8 + i) % g_hits.size()];
    const char* cur = s.name.load(std::memory_order_acquire);
    if (cur == nullptr && s.name.compare_exchange_strong(cur, name, std::memory_order_acq_rel)) {
      cur = name;
    }
    if (cur == name) {
      s.hits.fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
}

// Per thread, seeded from the run's seed and the order in which threads first reach a point.
void yield_hook(const char* name) noexcept {
  thread_local std::optional<std::minstd_rand> rng;
  if (!rng) {
    rng.emplace(static_cast<std::uint32_t>(
        g_hook_seed.load(std::memory_order_relaxed) * 0x9E3779B97F4A7C15ull +
        g_hook_threads.fetch_add(1, std::memory_order_relaxed) + 1));
  }
  count_hit(name);
  const std::uint32_t r = static_cast<std::uint32_t>((*rng)());
  switch (r % 64) {
    case 0:
    case 1:
    case 2:
    case 3:
      std::this_thread::yield();
      break;
    case 4:
    case 5: {
      const std::uint32_t spins = (r >> 8) % 4000;
      for (std::uint32_t i = 0; i < spins; ++i)
        sanitizer::full_fence();
      break;
    }
    case 6:
      // Long enough to span a grace period or a teardown on the other CPU.
      std::this_thread::sleep_for(std::chrono::microseconds((r >> 8) % 2000));
      break;
    default:
      break;
  }
}

// ---- data records ------------------------------------------------------------------------------

constexpr std::uint64_t kSlotBytes = 64;
constexpr std::uint64_t kMaxThreads = kPageSize / kSlotBytes - 1;  // slot 63: raw-device touches
constexpr std::uint64_t kMagic = 0x70676d6170737472ull;            // "pgmapstr"

struct Record {
  std::uint64_t magic;
  std::uint64_t gen;
  std::uint64_t pgoff;
  std::uint64_t thread;
  std::uint64_t seq;
  std::uint64_t pad[2];
  std::uint64_t sum;
};
static_assert(sizeof(Record) == kSlotBytes);

std::uint64_t checksum(const Record& r) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::uint64_t v : {r.magic, r.gen, r.pgoff, r.thread, r.seq, r.pad[0], r.pad[1]}) {
    h = (h ^ v) * 0x100000001b3ull;
  }
  return h;
}

Record make_record(std::uint64_t gen, std::uint64_t pgoff, std::uint64_t thread,
                   std::uint64_t seq) {
  Record r{kMagic, gen, pgoff, thread, seq, {gen ^ seq, ~pgoff}, 0};
  r.sum = checksum(r);
  return r;
}

bool all_zero(const Record& r) {
  static const Record zero{};
  return std::memcmp(&r, &zero, sizeof r) == 0;
}

// Generations are unique across all devices of the process.
std::atomic<std::uint64_t> g_next_gen{1};

// ---- the world ---------------------------------------------------------------------------------

// One device-dax device over the shared backing (one per generation).
struct Device {
  std::uint64_t gen = 0;
  std::shared_ptr<DevPagemap> pgmap;
  std::shared_ptr<dax::DevDax> dax;
  std::uint64_t pages = 0;
  std::uint64_t align_pages = 1;
  std::atomic<bool> unbound{false};  // an unbind completed
  std::atomic<bool> killed{false};   // an unbind was attempted (the device is disabled)
};

// The raw pagemap whose folios workers hold through PageRef / Pin (memunmap is its teardown).
struct RawDevice {
  std::uint64_t gen = 0;
  std::shared_ptr<DevPagemap> pgmap;
  std::atomic<bool> dead{false};
};

struct Mapping {
  std::uint64_t id = 0;
  std::uint64_t addr = 0;
  std::uint64_t len = 0;
  std::uint64_t pgoff = 0;
  bool writable = true;
  std::shared_ptr<Device> dev;
  std::shared_mutex mu;  // shared: accesses and pins through it; exclusive: changing it
};

struct Proc {
  std::unique_ptr<mm::AddressSpace> as = std::make_unique<mm::AddressSpace>();
  std::mutex mu;  // serializes VMA changes (mmap, munmap, mprotect, mremap, fork) of this process
  std::vector<std::shared_ptr<Mapping>> maps;  // guarded by mu
};

struct PinSet {
  mm::PinnedPages pages;
};

struct RawHold {
  std::shared_ptr<RawDevice> dev;
  Pfn pfn = 0;
  bool pin = false;
  PageRef ref;
  Pin pinned;
  DevPagemap::Allocation alloc;
};

struct Violations {
  std::mutex mu;
  std::map<std::string, std::uint64_t> counts;
  std::vector<std::string> first;
  std::map<std::string, std::uint64_t> known_counts;  // known defects: reported, not failures
  std::vector<std::string> known_first;
  void known(const std::string& kind, std::string what) {
    std::lock_guard<std::mutex> lock(mu);
    if (known_counts[kind]++ == 0) known_first.push_back(fmt::format("[{}] {}", kind, what));
  }
  void add(const std::string& kind, std::string what) {
    std::lock_guard<std::mutex> lock(mu);
    ++counts[kind];
    if (first.size() < 12) first.push_back(fmt::format("[{}] {}", kind, std::move(what)));
  }
};

std::atomic<std::uint64_t> g_misuse{0};
void counting_misuse(Errc, const char*) {
  g_misuse.fetch_add(1, std::memory_order_relaxed);
}

class World {
 public:
  World(Strategy s, const Options& o) : s_(s), o_(o), rng_(o.seed ^ static_cast<unsigned>(s)) {
    dev_bytes_ = o.quick ? 4 * kPmdSize : 8 * kPmdSize;
    raw_bytes_ = kPmdSize;
    BackingOptions b;
    b.size = dev_bytes_;
    b.align = kPmdSize;
    b.name = "pgmap-stress";
    auto back = make_anonymous_backing(b);
    if (!back) throw std::runtime_error(back.error().to_string());
    backing_ = std::shared_ptr<Backing>(std::move(back).value());
    b.size = raw_bytes_;
    auto raw = make_anonymous_backing(b);
    if (!raw) throw std::runtime_error(raw.error().to_string());
    raw_backing_ = std::shared_ptr<Backing>(std::move(raw).value());
    procs_.push_back(std::make_shared<Proc>());
    procs_.push_back(std::make_shared<Proc>());
  }

  Figures run();

 private:
  // ---- devices ----
  MemremapParams params(std::shared_ptr<Backing> b, PagemapType type, unsigned order) const {
    MemremapParams p;
    p.type = type;
    p.strategy = s_;
    p.base_order = order;
    p.ranges.push_back(PagemapRangeSpec{std::move(b), 0, 0});
    p.name = fmt::format("stress-{}-{}", pagemap_type_name(type), g_next_gen.load());
    // `none` really frees under its users: keep the metadata mapped (quarantine) so its late
    // accesses are counted rather than crashing the run.
    if (s_ == Strategy::none) p.quarantine = true;
    return p;
  }

  bool create_device(Rng& rng) {
    const unsigned order = (rng() % 3 == 0) ? kPmdOrder : 0;
    auto pg = memremap(params(backing_, PagemapType::generic, order));
    if (!pg) {
      v_.add("unexpected", "memremap of the device: " + pg.error().to_string());
      return false;
    }
    // Reuse: whatever the previous owner wrote is gone before the new owner can see the memory.
    std::memset(backing_->data(), 0, backing_->size());
    auto dd = dax::DevDax::create(*pg);
    if (!dd) {
      v_.add("unexpected", "DevDax::create: " + dd.error().to_string());
      return false;
    }
    auto d = std::make_shared<Device>();
    d->gen = g_next_gen.fetch_add(1);
    d->pgmap = std::move(pg).value();
    d->dax = std::move(dd).value();
    d->pages = dev_bytes_ / kPageSize;
    d->align_pages = order_pages(order);
    all_pagemaps_.push_back(d->pgmap);
    all_devices_.push_back(d);
    std::lock_guard<std::mutex> lock(slot_mu_);
    dev_ = std::move(d);
    return true;
  }

  bool create_raw() {
    auto pg = memremap(params(raw_backing_, PagemapType::fs_dax, 0));
    if (!pg) {
      v_.add("unexpected", "memremap of the raw pagemap: " + pg.error().to_string());
      return false;
    }
    std::memset(raw_backing_->data(), 0, raw_backing_->size());
    auto d = std::make_shared<RawDevice>();
    d->gen = g_next_gen.fetch_add(1);
    d->pgmap = std::move(pg).value();
    all_pagemaps_.push_back(d->pgmap);
    std::lock_guard<std::mutex> lock(slot_mu_);
    raw_ = std::move(d);
    return true;
  }

  std::shared_ptr<Device> device() {
    std::lock_guard<std::mutex> lock(slot_mu_);
    return dev_;
  }
  std::shared_ptr<RawDevice> raw() {
    std::lock_guard<std::mutex> lock(slot_mu_);
    return raw_;
  }

  // ---- phases ----
  void phase(std::uint64_t index);
  void worker(unsigned t, Rng rng);
  void controller(Rng rng, double seconds);
  void teardown_device(Rng& rng);
  void teardown_raw(Rng& rng);
  void quiescent_checks(std::uint64_t index);

  // ---- worker operations ----
  std::shared_ptr<Proc> pick_proc(Rng& rng) {
    std::lock_guard<std::mutex> lock(procs_mu_);
    return procs_[rng() % procs_.size()];
  }
  std::shared_ptr<Mapping> pick_map(Proc& p, Rng& rng) {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.maps.empty()) return nullptr;
    return p.maps[rng() % p.maps.size()];
  }
  void op_mmap(Rng& rng);
  void op_access(unsigned t, Rng& rng, bool write);
  void op_pin(Rng& rng, std::vector<PinSet>& pins);
  void op_unpin(Rng& rng, std::vector<PinSet>& pins);
  void op_fork(Rng& rng);
  void op_exit(Rng& rng);
  void op_mprotect(Rng& rng);
  void op_mremap(Rng& rng);
  void op_munmap(Rng& rng);
  void op_raw_get(unsigned t, Rng& rng, std::vector<RawHold>& holds);
  void op_raw_put(Rng& rng, std::vector<RawHold>& holds);

  // An unexpected signal. A refused 4 KiB fault of a 2 MiB devdax ("alignment > fault size") is
  // named apart: it came from two mm defects, both fixed, so it is a failure now like any other
  // signal: emptied PTE tables left in place by munmap (munmap frees them), and a fault that read
  // a PMD slot locked or just filled by a concurrent fault as taken by smaller entries
  // (PageTable::probe waits for a locked slot; a mapped one sends the fault back to its lookup).
  void signal(const mm::SignalInfo& sig, std::string what) {
    if (sig.signal == mm::Signal::sigbus && sig.why.find("> fault size") != std::string::npos) {
      v_.add("signal.pte_table_blocks_pmd", std::move(what));
    } else {
      v_.add("signal", std::move(what));
    }
  }

  void count(const char* op) {
    std::lock_guard<std::mutex> lock(ops_mu_);
    ++op_counts_[op];
  }
  bool safe() const { return s_ != Strategy::none; }

  const Strategy s_;
  const Options o_;
  Rng rng_;
  std::uint64_t dev_bytes_ = 0;
  std::uint64_t raw_bytes_ = 0;
  std::shared_ptr<Backing> backing_;
  std::shared_ptr<Backing> raw_backing_;

  std::mutex slot_mu_;
  std::shared_ptr<Device> dev_;
  std::shared_ptr<RawDevice> raw_;
  std::vector<std::shared_ptr<DevPagemap>> all_pagemaps_;  // every pagemap of the run (checker)
  std::vector<std::shared_ptr<Device>> all_devices_;

  std::mutex procs_mu_;
  std::vector<std::shared_ptr<Proc>> procs_;
  std::atomic<std::uint64_t> next_map_id_{1};

  std::atomic<bool> stop_{false};
  std::mutex held_mu_;  // what workers still hold when the phase stops (checked, then released)
  std::vector<PinSet> left_pins_;
  std::vector<RawHold> left_raw_;

  // Per thread: the sequence last written to (gen, pgoff) — a later read must see it.
  std::vector<std::unordered_map<std::uint64_t, std::uint64_t>> last_seq_;

  std::mutex ops_mu_;
  std::map<std::string, std::uint64_t> op_counts_;
  Violations v_;
  Figures f_;
};

// ---- worker operations --------------------------------------------------------------------------

void World::op_mmap(Rng& rng) {
  std::shared_ptr<Device> d = device();
  if (!d || d->killed.load()) return;
  auto p = pick_proc(rng);
  const std::uint64_t units = d->pages / d->align_pages;
  const std::uint64_t first = rng() % units;
  const std::uint64_t n = 1 + rng() % std::min<std::uint64_t>(units - first, 4);
  auto m = std::make_shared<Mapping>();
  m->id = next_map_id_.fetch_add(1);
  m->len = n * d->align_pages * kPageSize;
  m->pgoff = first * d->align_pages;
  m->writable = rng() % 5 != 0;
  m->dev = d;
  std::lock_guard<std::mutex> lock(p->mu);
  auto r = p->as->mmap(0, m->len, mm::kProtRead | (m->writable ? mm::kProtWrite : 0u),
                       mm::kMapShared, d->dax, m->pgoff * kPageSize);
  if (!r) {
    // The device was disabled meanwhile: dax_mmap refuses (ENXIO).
    if (r.code() != Errc::dead) v_.add("unexpected", "mmap: " + r.error().to_string());
    return;
  }
  m->addr = *r;
  p->maps.push_back(std::move(m));
}

void World::op_access(unsigned t, Rng& rng, bool write) {
  auto p = pick_proc(rng);
  auto m = pick_map(*p, rng);
  if (!m) return;
  std::shared_lock<std::shared_mutex> lock(m->mu);
  if (m->len == 0) return;  // unmapped meanwhile
  if (write && !m->writable) write = false;
  const std::uint64_t page = rng() % (m->len / kPageSize);
  const std::uint64_t addr = m->addr + page * kPageSize + t * kSlotBytes;
  const std::uint64_t pgoff = m->pgoff + page;
  const std::uint64_t key = (m->dev->gen << 32) | pgoff;
  auto& seqs = last_seq_[t];
  if (write) {
    const std::uint64_t seq = seqs[key] + 1;
    Record r = make_record(m->dev->gen, pgoff, t, seq);
    mm::SignalInfo sig = p->as->write(addr, &r, sizeof r);
    if (!sig) {
      seqs[key] = seq;
    } else if (sig.signal != mm::Signal::sigbus || !m->dev->killed.load()) {
      signal(sig, fmt::format("write at {:#x} of gen {}: {}", addr, m->dev->gen, sig.why));
    }
    return;
  }
  Record r{};
  mm::SignalInfo sig = p->as->read(addr, &r, sizeof r);
  if (sig) {
    if (sig.signal != mm::Signal::sigbus || !m->dev->killed.load()) {
      signal(sig, fmt::format("read at {:#x} of gen {}: {}", addr, m->dev->gen, sig.why));
    }
    return;
  }
  auto it = seqs.find(key);
  const std::uint64_t want = it == seqs.end() ? 0 : it->second;
  if (all_zero(r)) {
    if (want != 0) {
      v_.add("data", fmt::format("gen {} page {} slot {}: zeros, but sequence {} was written",
                                 m->dev->gen, pgoff, t, want));
    }
    return;
  }
  if (r.magic != kMagic || r.sum != checksum(r) || r.thread != t) {
    v_.add("data", fmt::format("gen {} page {} slot {}: corrupt record", m->dev->gen, pgoff, t));
  } else if (r.gen != m->dev->gen) {
    v_.add("data", fmt::format("gen {} page {} slot {}: a record written through gen {} (a "
                               "previous owner of the memory)",
                               m->dev->gen, pgoff, t, r.gen));
  } else if (r.pgoff != pgoff || r.seq != want) {
    v_.add("data", fmt::format("gen {} page {} slot {}: record of page {} seq {}, expected seq {}",
                               m->dev->gen, pgoff, t, r.pgoff, r.seq, want));
  }
}

void World::op_pin(Rng& rng, std::vector<PinSet>& pins) {
  if (pins.size() >= 8) return;
  auto p = pick_proc(rng);
  auto m = pick_map(*p, rng);
  if (!m) return;
  std::shared_lock<std::shared_mutex> lock(m->mu);
  if (m->len == 0) return;
  const std::uint64_t pages = m->len / kPageSize;
  const std::uint64_t first = rng() % pages;
  const std::uint64_t n = 1 + rng() % std::min<std::uint64_t>(pages - first, 8);
  const std::uint32_t flags = m->writable && rng() % 2 == 0 ? mm::kFollWrite : 0u;
  auto r = mm::pin_user_pages(*p->as, m->addr + first * kPageSize, n,
                              flags | (rng() % 4 == 0 ? mm::kFollLongterm : 0u));
  if (!r) {
    if (r.code() != Errc::dead || !m->dev->killed.load()) {
      v_.add("unexpected", "pin_user_pages: " + r.error().to_string());
    }
    return;
  }
  pins.push_back(PinSet{std::move(r).value()});
}

void World::op_unpin(Rng& rng, std::vector<PinSet>& pins) {
  if (pins.empty()) return;
  const std::size_t i = rng() % pins.size();
  if (Errc e = mm::unpin_user_pages(pins[i].pages); e != Errc::ok) {
    v_.add(safe() ? "unexpected" : "late_access", fmt::format("unpin: {}", errc_name(e)));
  }
  pins.erase(pins.begin() + static_cast<std::ptrdiff_t>(i));
}

void World::op_fork(Rng& rng) {
  {
    std::lock_guard<std::mutex> lock(procs_mu_);
    if (procs_.size() >= 6) return;
  }
  auto p = pick_proc(rng);
  auto child = std::make_shared<Proc>();
  {
    std::lock_guard<std::mutex> lock(p->mu);
    child->as = p->as->fork();
    for (const auto& m : p->maps) {
      auto c = std::make_shared<Mapping>();
      std::shared_lock<std::shared_mutex> ml(m->mu);
      c->id = next_map_id_.fetch_add(1);
      c->addr = m->addr;
      c->len = m->len;
      c->pgoff = m->pgoff;
      c->writable = m->writable;
      c->dev = m->dev;
      child->maps.push_back(std::move(c));
    }
  }
  std::lock_guard<std::mutex> lock(procs_mu_);
  procs_.push_back(std::move(child));
}

void World::op_exit(Rng& rng) {
  std::shared_ptr<Proc> gone;
  {
    std::lock_guard<std::mutex> lock(procs_mu_);
    if (procs_.size() <= 2) return;
    const std::size_t i = rng() % procs_.size();
    gone = std::move(procs_[i]);
    procs_.erase(procs_.begin() + static_cast<std::ptrdiff_t>(i));
  }
  // The address space goes when the last worker using it lets go (exit_mmap).
}

void World::op_mprotect(Rng& rng) {
  auto p = pick_proc(rng);
  std::lock_guard<std::mutex> lock(p->mu);
  if (p->maps.empty()) return;
  auto m = p->maps[rng() % p->maps.size()];
  std::unique_lock<std::shared_mutex> ml(m->mu);
  const bool w = !m->writable;
  if (Errc e = p->as->mprotect(m->addr, m->len, mm::kProtRead | (w ? mm::kProtWrite : 0u));
      e != Errc::ok) {
    v_.add("unexpected", fmt::format("mprotect: {}", errc_name(e)));
    return;
  }
  m->writable = w;
}

void World::op_mremap(Rng& rng) {
  auto p = pick_proc(rng);
  std::lock_guard<std::mutex> lock(p->mu);
  if (p->maps.empty()) return;
  auto m = p->maps[rng() % p->maps.size()];
  std::unique_lock<std::shared_mutex> ml(m->mu);
  const std::uint64_t unit = m->dev->align_pages * kPageSize;
  const std::uint64_t max_len = (m->dev->pages - m->pgoff) * kPageSize;
  std::uint64_t new_len = m->len;
  switch (rng() % 3) {
    case 0:
      if (new_len > unit) new_len -= unit;
      break;
    case 1:
      if (new_len + unit <= max_len) new_len += unit;
      break;
    default:
      break;
  }
  auto r = p->as->mremap(m->addr, m->len, new_len, mm::kMremapMayMove);
  if (!r) {
    v_.add("unexpected", "mremap: " + r.error().to_string());
    return;
  }
  m->addr = *r;
  m->len = new_len;
}

void World::op_munmap(Rng& rng) {
  auto p = pick_proc(rng);
  std::lock_guard<std::mutex> lock(p->mu);
  if (p->maps.empty()) return;
  const std::size_t i = rng() % p->maps.size();
  auto m = p->maps[i];
  std::unique_lock<std::shared_mutex> ml(m->mu);
  const std::uint64_t unit = m->dev->align_pages * kPageSize;
  if (m->len > unit && rng() % 2 == 0) {
    // Cut the last unit off (splits the VMA).
    if (Errc e = p->as->munmap(m->addr + m->len - unit, unit); e != Errc::ok) {
      v_.add("unexpected", fmt::format("partial munmap: {}", errc_name(e)));
      return;
    }
    m->len -= unit;
    return;
  }
  if (Errc e = p->as->munmap(m->addr, m->len); e != Errc::ok) {
    v_.add("unexpected", fmt::format("munmap: {}", errc_name(e)));
    return;
  }
  m->len = 0;
  p->maps.erase(p->maps.begin() + static_cast<std::ptrdiff_t>(i));
}

void World::op_raw_get(unsigned t, Rng& rng, std::vector<RawHold>& holds) {
  if (holds.size() >= 8) return;
  std::shared_ptr<RawDevice> d = raw();
  if (!d || d->dead.load()) return;
  RawHold h;
  h.dev = d;
  h.pfn = d->pgmap->range(0).start + rng() % d->pgmap->total_pages();
  h.pin = rng() % 2 == 0;
  // Nothing may look at an idle folio's metadata without something keeping the pagemap alive
  // (I1): an allocation under alloc_event, else a pagemap reference for the duration of the get
  // (the folio reference keeps it alive from then on). A concurrent memunmap makes either fail.
  PagemapRef lookup;
  if (s_ == Strategy::alloc_event) {
    auto a = d->pgmap->request(h.pfn, 1);
    if (!a) return;  // dying
    h.alloc = std::move(a).value();
  } else {
    lookup = get_dev_pagemap(h.pfn);
    if (lookup.get() != d->pgmap.get()) return;  // dying, or already replaced
  }
  if (h.pin) {
    auto r = Pin::pin(*d->pgmap, h.pfn);
    if (!r) return;
    h.pinned = std::move(r).value();
  } else {
    auto r = PageRef::get(*d->pgmap, h.pfn);
    if (!r) return;
    h.ref = std::move(r).value();
  }
  if (safe()) {
    // Touch the bytes of what we hold (ASan reports it if they were revoked under us).
    Record rec = make_record(d->gen, h.pfn, t, 1);
    std::memcpy(d->pgmap->address_of(h.pfn) + kMaxThreads * kSlotBytes, &rec, sizeof rec);
  }
  holds.push_back(std::move(h));
}

void World::op_raw_put(Rng& rng, std::vector<RawHold>& holds) {
  if (holds.empty()) return;
  const std::size_t i = rng() % holds.size();
  RawHold& h = holds[i];
  Errc e = h.pin ? h.pinned.release() : h.ref.release();
  if (e != Errc::ok) {
    v_.add(safe() ? "unexpected" : "late_access", fmt::format("raw put: {}", errc_name(e)));
  }
  h.alloc.reset();
  holds.erase(holds.begin() + static_cast<std::ptrdiff_t>(i));
}

void World::worker(unsigned t, Rng rng) {
  std::vector<PinSet> pins;
  std::vector<RawHold> holds;
  std::uint64_t n = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    const unsigned r = static_cast<unsigned>(rng() % 100);
    if (r < 8) {
      op_mmap(rng);
      count("mmap");
    } else if (r < 30) {
      op_access(t, rng, true);
      count("write");
    } else if (r < 50) {
      op_access(t, rng, false);
      count("read");
    } else if (r < 58) {
      op_pin(rng, pins);
      count("pin");
    } else if (r < 66) {
      op_unpin(rng, pins);
      count("unpin");
    } else if (r < 69) {
      op_fork(rng);
      count("fork");
    } else if (r < 71) {
      op_exit(rng);
      count("exit");
    } else if (r < 75) {
      op_mprotect(rng);
      count("mprotect");
    } else if (r < 79) {
      op_mremap(rng);
      count("mremap");
    } else if (r < 85) {
      op_munmap(rng);
      count("munmap");
    } else if (r < 93) {
      op_raw_get(t, rng, holds);
      count("raw_get");
    } else {
      op_raw_put(rng, holds);
      count("raw_put");
    }
    ++n;
  }
  std::lock_guard<std::mutex> lock(held_mu_);
  for (auto& p : pins)
    left_pins_.push_back(std::move(p));
  for (auto& h : holds)
    left_raw_.push_back(std::move(h));
}

// ---- teardown ---------------------------------------------------------------------------------

MemunmapOptions pick_policy(Rng& rng, const char** name) {
  MemunmapOptions o;
  switch (rng() % 3) {
    case 0:
      *name = "wait";
      o.policy = UnmapPolicy::wait;
      o.timeout = std::chrono::seconds(30);  // the bound that makes a hang a reported failure
      break;
    case 1:
      *name = "refuse";
      o.policy = UnmapPolicy::refuse;
      break;
    default:
      *name = "timeout";
      o.policy = UnmapPolicy::wait;
      o.timeout = std::chrono::microseconds(100 + rng() % 20000);
      break;
  }
  return o;
}

void World::teardown_device(Rng& rng) {
  std::shared_ptr<Device> d = device();
  if (!d) return;
  const char* policy = "";
  MemunmapOptions o = pick_policy(rng, &policy);
  d->killed.store(true);
  auto r = d->dax->unbind(o);
  if (!r && (r.code() == Errc::busy || r.code() == Errc::timed_out) &&
      std::string_view(policy) != "wait") {
    ++f_.refused;
    // Complete it the way an administrator would: wait for the holders (bounded).
    MemunmapOptions w;
    w.timeout = std::chrono::seconds(30);
    r = d->dax->unbind(w);
  }
  if (!r) {
    v_.add("hang", fmt::format("unbind of gen {} ({}): {}", d->gen, policy, r.error().to_string()));
    return;
  }
  d->unbound.store(true);
  ++f_.unbinds;
  if (safe() && d->pgmap->late_accesses() != 0) {
    v_.add("late_access",
           fmt::format("gen {}: {} late accesses", d->gen, d->pgmap->late_accesses()));
  }
  if (create_device(rng)) ++f_.recreated;
}

void World::teardown_raw(Rng& rng) {
  std::shared_ptr<RawDevice> d = raw();
  if (!d) return;
  const char* policy = "";
  MemunmapOptions o = pick_policy(rng, &policy);
  auto r = d->pgmap->memunmap(o);
  if (!r && (r.code() == Errc::busy || r.code() == Errc::timed_out) &&
      std::string_view(policy) != "wait") {
    ++f_.refused;
    return;  // live again, exactly as before (the next phase tries again)
  }
  if (!r) {
    v_.add("hang",
           fmt::format("memunmap of raw gen {} ({}): {}", d->gen, policy, r.error().to_string()));
    return;
  }
  d->dead.store(true);
  ++f_.memunmaps;
  if (create_raw()) ++f_.recreated;
}

void World::controller(Rng rng, double seconds) {
  auto sleep_some = [&](double frac) {
    std::this_thread::sleep_for(
        std::chrono::duration<double>(seconds * frac * static_cast<double>(rng() % 1000) / 1000.0));
  };
  sleep_some(0.6);
  if (rng() % 4 != 0) teardown_device(rng);
  sleep_some(0.3);
  if (rng() % 2 == 0) teardown_raw(rng);
  sleep_some(0.1);
  stop_.store(true);
}

// ---- between phases ---------------------------------------------------------------------------

void World::quiescent_checks(std::uint64_t index) {
  debug::Universe u;
  for (const auto& pg : all_pagemaps_)
    u.pagemaps.push_back(pg.get());
  std::vector<std::shared_ptr<Proc>> procs;
  {
    std::lock_guard<std::mutex> lock(procs_mu_);
    procs = procs_;
  }
  for (const auto& p : procs)
    u.address_spaces.push_back(p->as.get());
  for (const PinSet& ps : left_pins_) {
    for (const mm::GupPage& g : ps.pages)
      u.held.push_back(debug::HeldPage{g.pfn, g.pgmap, true});
  }
  std::unordered_map<const DevPagemap*, std::int64_t> allocs;
  for (const RawHold& h : left_raw_) {
    u.held.push_back(debug::HeldPage{h.pfn, h.dev->pgmap.get(), h.pin});
    if (h.alloc) ++allocs[h.dev->pgmap.get()];
  }
  for (const auto& d : all_devices_) {
    if (d->dax && d->pgmap->state() != DevPagemap::State::dead) {
      allocs[d->pgmap.get()] +=
          static_cast<std::int64_t>(d->dax->vma_allocations() + d->dax->lingering_allocations());
    }
  }
  u.extra_pagemap_refs = [&](const DevPagemap& pg) {
    auto it = allocs.find(&pg);
    return it == allocs.end() ? std::int64_t{0} : it->second;
  };
  // Address spaces dropped by op_exit are gone, so is everything they held: complete.
  u.complete = true;
  debug::Report r = debug::check_invariants(u);
  ++f_.checker_runs;
  for (const debug::Violation& v : r.violations) {
    v_.add(std::string("checker.") + std::string(debug::check_name(v.check)),
           fmt::format("phase {}: {} pfn {:#x}: {}", index, v.pagemap, v.pfn, v.detail));
  }
  // The bytes of the current device: zeros or records of this generation and page.
  std::shared_ptr<Device> d = device();
  if (d && d->pgmap->state() == DevPagemap::State::live) {
    for (std::uint64_t pg = 0; pg < d->pages; ++pg) {
      for (std::uint64_t slot = 0; slot < kMaxThreads; ++slot) {
        Record rec;
        std::memcpy(&rec, backing_->data() + pg * kPageSize + slot * kSlotBytes, sizeof rec);
        if (all_zero(rec)) continue;
        if (rec.magic != kMagic || rec.sum != checksum(rec)) {
          v_.add("data", fmt::format("phase {}: gen {} page {} slot {}: corrupt bytes", index,
                                     d->gen, pg, slot));
        } else if (rec.gen != d->gen || rec.pgoff != pg) {
          v_.add("data", fmt::format("phase {}: gen {} page {} slot {}: record of gen {} page {} "
                                     "(written through another owner)",
                                     index, d->gen, pg, slot, rec.gen, rec.pgoff));
        }
      }
    }
  }
  if (safe()) {
    for (const auto& pg : all_pagemaps_) {
      if (pg->late_accesses() != 0) {
        v_.add("late_access", fmt::format("{}: {} late accesses", pg->name(), pg->late_accesses()));
      }
    }
  }
}

void World::phase(std::uint64_t index) {
  const double secs = o_.phase_seconds > 0 ? o_.phase_seconds : (o_.quick ? 0.15 : 0.4);
  stop_.store(false);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < o_.threads; ++t) {
    threads.emplace_back([this, t, seed = rng_()] { worker(t, Rng(seed)); });
  }
  std::thread ctl([this, secs, seed = rng_()] { controller(Rng(seed), secs); });
  ctl.join();
  for (auto& th : threads)
    th.join();
  quiescent_checks(index);
  // Release what the workers still held, then make sure every late access was counted.
  for (PinSet& ps : left_pins_) {
    if (Errc e = mm::unpin_user_pages(ps.pages); e != Errc::ok && safe()) {
      v_.add("unexpected", fmt::format("final unpin: {}", errc_name(e)));
    }
  }
  left_pins_.clear();
  for (RawHold& h : left_raw_) {
    Errc e = h.pin ? h.pinned.release() : h.ref.release();
    if (e != Errc::ok && safe()) v_.add("unexpected", fmt::format("final put: {}", errc_name(e)));
    h.alloc.reset();
  }
  left_raw_.clear();
  // Drop the devices nobody maps any more from the checker's list (dead, no VMA left).
  std::erase_if(all_devices_, [](const std::shared_ptr<Device>& d) {
    return d->unbound.load() && d.use_count() == 1;
  });
  // ... and the dead pagemaps no device refers to any more (an entry or pin still naming one is
  // then reported as a pagemap outside the universe: still a violation).
  std::erase_if(all_pagemaps_, [&](const std::shared_ptr<DevPagemap>& pg) {
    if (pg->state() != DevPagemap::State::dead) return false;
    return std::none_of(all_devices_.begin(), all_devices_.end(),
                        [&](const std::shared_ptr<Device>& d) { return d->pgmap == pg; });
  });
  // Sequences of generations that can no longer be read (their devices are gone).
  const std::uint64_t current = device() ? device()->gen : 0;
  for (auto& seqs : last_seq_) {
    std::erase_if(seqs, [&](const auto& kv) { return (kv.first >> 32) != current; });
  }
}

Figures World::run() {
  const auto t0 = Clock::now();
  const double budget = o_.seconds;
  last_seq_.resize(o_.threads);
  Rng rng(rng_());
  if (!create_device(rng) || !create_raw()) {
    f_.violations = v_.counts;
    return f_;
  }
  std::uint64_t index = 0;
  while (std::chrono::duration<double>(Clock::now() - t0).count() < budget) {
    phase(index++);
    if (o_.verbose) {
      std::lock_guard<std::mutex> lock(v_.mu);
      std::printf("  phase %llu: %zu kinds of violation so far\n",
                  static_cast<unsigned long long>(index), v_.counts.size());
    }
  }
  // Tear everything down: processes first (their mappings), then the devices.
  {
    std::lock_guard<std::mutex> lock(procs_mu_);
    procs_.clear();
  }
  for (const auto& d : all_devices_) {
    if (!d->unbound.load()) {
      MemunmapOptions w;
      w.timeout = std::chrono::seconds(30);
      auto r = d->dax->unbind(w);
      if (!r) v_.add("hang", "final unbind: " + r.error().to_string());
    }
  }
  if (raw_ && !raw_->dead.load()) {
    MemunmapOptions w;
    w.timeout = std::chrono::seconds(30);
    auto r = raw_->pgmap->memunmap(w);
    if (!r) v_.add("hang", "final memunmap: " + r.error().to_string());
  }
  f_.strategy = s_;
  f_.phases = index;
  f_.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  f_.op_counts = op_counts_;
  for (const auto& [k, n] : op_counts_)
    f_.ops += n;
  std::lock_guard<std::mutex> lock(v_.mu);
  f_.violations = v_.counts;
  f_.first_reports = v_.first;
  f_.known = v_.known_counts;
  f_.known_first = v_.known_first;
  if (g_misuse.load() != 0) f_.violations["misuse_reports"] += g_misuse.exchange(0);
  return f_;
}

}  // namespace

void install_yield_hook(std::uint64_t seed) {
  g_hook_seed.store(seed);
  (void)set_yield_hook(&yield_hook);  // no previous hook in this program
  (void)set_misuse_handler(&counting_misuse);
}

std::map<std::string, std::uint64_t> yield_point_hits() {
  std::map<std::string, std::uint64_t> out;
  for (const HitSlot& s : g_hits) {
    if (const char* n = s.name.load()) out[n] += s.hits.load();
  }
  return out;
}

Figures run_strategy(Strategy s, const Options& opts) {
  World w(s, opts);
  return w.run();
}

}  // namespace pgmap::stress
