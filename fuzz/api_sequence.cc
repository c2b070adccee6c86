// The API-sequence harness (api_sequence.h): decoder, world, oracles and watchdog.
#include "api_sequence.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/core/percpu_ref.h"
#include "pgmap/core/rcu.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/dax/devdax.h"
#include "pgmap/debug/fs_invariants.h"
#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/inode.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::fuzz {
namespace {

using mm::AddressSpace;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint64_t kDevBytes = 2 * kMiB;
constexpr std::size_t kSlots = kSafeStrategies.size();
constexpr std::size_t kMaxCalls = 200;
constexpr std::size_t kMaxHandles = 16;
// Where the harness maps: a fixed window at kMmapBase, plus the 1 GiB-aligned places that mmap
// without kMapFixed (and mremap with may-move) pick after it.
constexpr std::uint64_t kWindow = AddressSpace::kMmapBase;
constexpr std::uint64_t kWindowBytes = 8 * kMiB;
constexpr std::size_t kExtraWindows = 4;
constexpr std::uint64_t kExtraWindowBytes = 4 * kMiB;
// The fs invariant checker runs at most this many calls apart (and around every call that can
// break an fs invariant by itself, and at the end of the input: World::check_fs).
constexpr std::uint64_t kFsCheckEvery = 16;

std::atomic<bool> g_trace{false};

// The oracles' own loops are left out of libFuzzer's coverage (clang): their comparisons say
// nothing about the API sequence, and instrumenting them cost most of the run time.
#if defined(__clang__)
#define PGMAP_FUZZ_ORACLE __attribute__((no_sanitize("coverage")))
#else
#define PGMAP_FUZZ_ORACLE
#endif

// ---- watchdog ----------------------------------------------------------------------------------

struct Watchdog {
  std::atomic<std::int64_t> started_ns{0};
  std::atomic<const char*> what{nullptr};
  std::once_flag once;

  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void start_thread() {
    std::call_once(once, [this] {
      std::thread([this] {
        for (;;) {
          std::this_thread::sleep_for(std::chrono::milliseconds(250));
          const std::int64_t s = started_ns.load(std::memory_order_acquire);
          if (s != 0 && now_ns() - s > std::int64_t{kWatchdogSeconds} * 1'000'000'000) {
            const char* w = what.load(std::memory_order_acquire);
            std::fprintf(stderr, "pgmap-fuzz watchdog: call '%s' blocked for more than %d s\n",
                         w != nullptr ? w : "?", kWatchdogSeconds);
            std::abort();
          }
        }
      }).detach();
    });
  }
};

Watchdog& watchdog() {
  static auto* w = new Watchdog();  // never destroyed: the detached thread reads it
  return *w;
}

// Marks one API call for the watchdog.
class CallScope {
 public:
  explicit CallScope(const char* what) {
    watchdog().what.store(what, std::memory_order_release);
    watchdog().started_ns.store(Watchdog::now_ns(), std::memory_order_release);
    if (g_trace.load(std::memory_order_relaxed)) std::fprintf(stderr, "call %s\n", what);
  }
  ~CallScope() { watchdog().started_ns.store(0, std::memory_order_release); }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;
};

std::atomic<std::uint64_t> g_misuse{0};
void counting_handler(Errc, const char*) {
  g_misuse.fetch_add(1, std::memory_order_relaxed);
}

// ---- input decoding ----------------------------------------------------------------------------

class Input {
 public:
  Input(const std::uint8_t* d, std::size_t n) : d_(d), n_(n) {}
  bool empty() const { return i_ >= n_; }
  std::uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int k = 0; k < 8; ++k)
      v = (v << 8) | u8();
    return v;
  }
  bool flag() { return (u8() & 1) != 0; }

 private:
  const std::uint8_t* d_;
  std::size_t n_;
  std::size_t i_ = 0;
};

// ---- digest ------------------------------------------------------------------------------------

class Digest {
 public:
  // One word per step. Each step is a bijection of the running value for a fixed input and of the
  // input for a fixed running value (xor, multiply by an odd constant, xorshift), so a change of
  // any single value always changes the digest — as the byte-wise FNV it replaces, at an eighth
  // of the multiplies.
  PGMAP_FUZZ_ORACLE void add(std::uint64_t v) {
    h_ = (h_ ^ v) * 0x9e3779b97f4a7c15ull;
    h_ ^= h_ >> 29;
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 14695981039346656037ull;
};

// ---- address-space walks ------------------------------------------------------------------------

// Visits every VMA of the probe windows (at most as.nr_vmas()), in address order. One shared
// mmap_lock for the whole walk and find_vma_locked (no VMA copy per probe). There is no "next VMA"
// query, so the gaps are probed page by page until every VMA was found.
template <typename OnVma>
PGMAP_FUZZ_ORACLE void visit_vmas(const AddressSpace& as, OnVma&& on_vma) {
  std::shared_lock<std::shared_mutex> lock(as.mmap_lock());
  const std::size_t want = as.nr_vmas();
  std::size_t found = 0;
  auto scan = [&](std::uint64_t from, std::uint64_t bytes) {
    for (std::uint64_t addr = from; addr < from + bytes && found < want;) {
      const mm::Vma* v = as.find_vma_locked(addr);
      if (v == nullptr) {
        addr += kPageSize;
        continue;
      }
      ++found;
      on_vma(*v);
      addr = v->end;
    }
  };
  scan(kWindow, kWindowBytes);
  for (std::size_t k = 1; k <= kExtraWindows; ++k)
    scan(kWindow + k * kGiB, kExtraWindowBytes);
}

// Visits every present page-table entry, in address order: one walk of the page table
// (AddressSpace::for_each_entry), wherever the entry is, instead of a lookup per page of each VMA.
template <typename OnPte>
PGMAP_FUZZ_ORACLE void visit_entries(const AddressSpace& as, OnPte&& on_pte) {
  as.for_each_entry([&](const mm::PtEntry& pte, const mm::Vma*) { on_pte(pte); });
}

// ---- the world ---------------------------------------------------------------------------------

struct Dev {
  std::shared_ptr<Backing> backing;
  std::shared_ptr<DevPagemap> pg;
  std::shared_ptr<dax::DevDax> dax;
  unsigned order = 0;
};

// One GUP result: the typed set of whichever kind the call returned.
struct HeldGup {
  mm::ReferencedPages refs;
  mm::PinnedPages pins;
  bool pinned = false;
  std::span<const mm::GupPage> pages() const { return pinned ? pins.pages() : refs.pages(); }
  Errc release() { return pinned ? pins.release() : refs.release(); }
};

// The DAX filesystem of the sequence: one FS_DAX device (4 MiB) under a strategy the input picks.
struct FsWorld {
  std::shared_ptr<Backing> backing;
  std::shared_ptr<DevPagemap> pg;
  std::shared_ptr<dax::DaxDevice> dax;
  std::shared_ptr<fs::DaxFs> fs;
  std::vector<fs::File> files;
};
constexpr std::uint64_t kFsBytes = 4 * kMiB;
constexpr unsigned kFsNames = 4;

struct PercpuModel {
  std::unique_ptr<PercpuRef> ref;
  std::int64_t count = 0;  // the exact count the model predicts
  bool dead = false;
  bool released = false;
  bool exact = true;  // false after an undetectable stray put in percpu mode
  std::shared_ptr<std::atomic<int>> releases = std::make_shared<std::atomic<int>>(0);
};

std::string fmt_name(std::uint8_t v) {
  return "f" + std::to_string(v % kFsNames);
}

class World {
 public:
  World() = default;
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  SequenceResult run(Input& in);

 private:
  // Runs `fn` (one API call) under the watchdog and, if it reports an error, checks that the
  // digest did not change. `expect_error` makes success itself a failure.
  template <typename Fn>
  void call(const char* what, Fn&& fn, bool expect_error = false);
  // A call that returns no error (a destructor, a signal-returning access): nothing to compare,
  // so no digest.
  template <typename Fn>
  void call_infallible(const char* what, Fn&& fn);
  // Around each call: the fs checker before it if it may break an fs invariant by itself
  // (fs_breaking_, set by the op) and calls ran since the last check; after it, the counting.
  void before_call(const char* what);
  void after_call(const char* what);
  void fail(std::string why) {
    if (failure_.empty()) failure_ = std::move(why);
  }

  std::uint64_t digest();
  // The state changed outside a call (an op's own set-up): the last error's digest is stale.
  void state_changed() { unchanged_valid_ = false; }
  // Oracle (a) over the devices and the PercpuRef, after every op that issued a call.
  void check_consistency(const char* after);
  // The fs invariant checker (when a filesystem exists and its pagemap is not dead).
  void check_fs(const std::string& where);
  void teardown();

  // Ops.
  void op_memremap(Input& in);
  void op_memremap_bad(Input& in);
  void op_unbind(Input& in);
  void op_kill(Input& in);
  void op_memunmap(Input& in);
  void op_mmap(Input& in);
  void op_munmap(Input& in);
  void op_mprotect(Input& in);
  void op_mremap(Input& in);
  void op_access(Input& in);
  void op_fork(Input& in);
  void op_gup(Input& in);
  void op_gup_release(Input& in);
  void op_page_ref(Input& in);
  void op_pin(Input& in);
  void op_stray(Input& in);
  void op_alloc(Input& in);
  void op_percpu(Input& in);
  void op_rcu(Input& in);
  void op_lookup(Input& in);
  void op_fs(Input& in);
  void op_fs_file(Input& in);
  void fs_teardown();
  bool fs_pages_held() const;
  // True if an unlinked file is still alive: ending a mapping may evict it.
  bool fs_may_evict() const;

  Dev* live_dev(Input& in);
  std::uint64_t pick_addr(Input& in);
  std::uint64_t pick_len(Input& in);
  Pfn pick_pfn(Input& in, const Dev& d);
  AddressSpace* pick_as(Input& in) { return (child_ && in.flag()) ? child_.get() : as_.get(); }
  bool covered_by_alloc(const DevPagemap* pg) const;

  std::array<Dev, kSlots> devs_{};
  std::vector<std::shared_ptr<DevPagemap>> stray_pagemaps_;  // memremap that should have failed
  std::unique_ptr<AddressSpace> as_ = std::make_unique<AddressSpace>();
  std::unique_ptr<AddressSpace> child_;
  std::vector<PageRef> refs_;
  std::vector<Pin> pins_;
  std::vector<HeldGup> gups_;
  std::vector<DevPagemap::Allocation> allocs_;
  PercpuModel pc_;
  FsWorld fs_;
  int rcu_depth_ = 0;
  // Set for one call whose error is documented to change state (see op_percpu).
  bool exempt_next_error_ = false;
  bool faults_allowed_ = false;  // the digest of a GUP call ignores pages it faulted in
  // Set by an op before a call that can break an fs invariant by itself (removal, unmount,
  // memory failure, unlink, close, truncate, fallocate, reflink, the end of a mapping: each may
  // free blocks, delete entries or evict), so the fs checker runs before and after it.
  bool fs_breaking_ = false;
  bool fs_check_due_ = false;
  std::uint64_t fs_unchecked_calls_ = 0;  // calls since the fs checker last ran
  // The digest after the last call, when that call returned an error (and so, as oracle (b)
  // checked, changed nothing) and nothing changed since: the next call's "before" digest.
  bool unchanged_valid_ = false;
  bool unchanged_faults_ = false;  // the faults_allowed_ it was taken with
  std::uint64_t unchanged_digest_ = 0;
  const char* last_call_ = "start";
  std::string failure_;
  std::uint64_t calls_ = 0;
  std::uint64_t errors_ = 0;
};

bool World::covered_by_alloc(const DevPagemap* pg) const {
  for (const auto& a : allocs_) {
    if (a.pagemap() == pg) return true;
  }
  return false;
}

void World::before_call(const char* what) {
  // What a destructive call would erase (an entry, a block, an inode) is checked while it exists.
  if (fs_breaking_ && fs_unchecked_calls_ > 0) check_fs(std::string("before ") + what);
}

void World::after_call(const char* what) {
  ++calls_;
  ++fs_unchecked_calls_;
  if (fs_breaking_) fs_check_due_ = true;
  fs_breaking_ = false;
  last_call_ = what;
}

template <typename Fn>
void World::call_infallible(const char* what, Fn&& fn) {
  before_call(what);
  state_changed();
  {
    CallScope scope(what);
    fn();
  }
  if (g_trace.load(std::memory_order_relaxed)) std::fprintf(stderr, "  -> ok\n");
  exempt_next_error_ = false;
  after_call(what);
}

template <typename Fn>
void World::call(const char* what, Fn&& fn, bool expect_error) {
  before_call(what);
  const std::uint64_t before =
      unchanged_valid_ && unchanged_faults_ == faults_allowed_ ? unchanged_digest_ : digest();
  state_changed();
  Errc e = Errc::ok;
  {
    CallScope scope(what);
    e = fn();
  }
  if (g_trace.load(std::memory_order_relaxed)) std::fprintf(stderr, "  -> %s\n", errc_name(e));
  if (e != Errc::ok) {
    ++errors_;
    if (!exempt_next_error_) {
      const std::uint64_t after = digest();
      if (after != before) {
        fail(std::string(what) + " returned " + errc_name(e) + " but changed the observable state");
      }
      unchanged_valid_ = true;
      unchanged_faults_ = faults_allowed_;
      unchanged_digest_ = after;
    }
  } else if (expect_error) {
    fail(std::string(what) + " succeeded on input it must refuse");
  }
  exempt_next_error_ = false;
  after_call(what);
}

PGMAP_FUZZ_ORACLE std::uint64_t World::digest() {
  Digest h;
  h.add(pagemap_count());
  for (const Dev& d : devs_) {
    if (!d.pg) {
      h.add(0xfeed);
      continue;
    }
    const auto st = d.pg->state();
    h.add(static_cast<std::uint64_t>(st));
    if (d.dax) {
      h.add(d.dax->unbound() ? 1 : 2);
      h.add(d.dax->vma_allocations());
      h.add(d.dax->lingering_allocations());
    }
    if (st == DevPagemap::State::dead) continue;
    PageArray* a = d.pg->array_for(d.pg->range(0).start);
    for (std::uint64_t e = 0; e < a->entries(); ++e) {
      if (faults_allowed_) {
        // A failed GUP may leave pages faulted in (as in the kernel): only the references and
        // pins beyond the mappings' own must be unchanged.
        h.add(a->ref(e).load() - static_cast<std::uint32_t>(a->mapcount(e).load()));
      } else {
        h.add(a->ref(e).load());
        h.add(static_cast<std::uint64_t>(a->mapcount(e).load()));
      }
      h.add(a->pincount(e).load());
      h.add(a->order(e));
      h.add(a->flags(e).load());
    }
  }
  auto add_as = [&](AddressSpace& as) {
    h.add(as.nr_vmas());
    if (!faults_allowed_) h.add(as.nr_entries());
    visit_vmas(as, [&](const mm::Vma& v) {
      h.add(v.start);
      h.add(v.end);
      h.add(v.flags);
      h.add(v.pgoff);
      h.add(reinterpret_cast<std::uintptr_t>(v.owner.get()));
    });
    if (faults_allowed_) return;
    visit_entries(as, [&](const mm::PtEntry& pte) {
      h.add(pte.addr);
      h.add(pte.pfn);
      h.add(static_cast<std::uint64_t>(pte.level));
      h.add(pte.writable ? 1 : 0);
    });
  };
  add_as(*as_);
  if (child_) add_as(*child_);
  if (fs_.fs) {
    h.add(fs_.fs->mounted() ? 1 : 0);
    h.add(fs_.fs->shut_down() ? 1 : 0);
    h.add(fs_.fs->allocator().free_blocks());
    h.add(fs_.files.size());
    for (const auto& inode : fs_.fs->inodes()) {
      const fs::InodeSnapshot snap = inode->snapshot();
      h.add(snap.ino);
      h.add(snap.size);
      h.add(snap.nrpages);
      h.add(static_cast<std::uint64_t>(inode->state()));
      h.add(inode->nlink());
      for (const auto& [page, block] : snap.blocks) {
        h.add(page);
        h.add(block);
        h.add(fs_.fs->allocator().share_count(block));
      }
      if (!faults_allowed_) {
        for (const auto& e : snap.entries) {
          h.add(e.index);
          h.add(e.entry.raw());
        }
      }
    }
    if (fs_.pg->state() != DevPagemap::State::dead) {
      PageArray* a = fs_.pg->array_for(fs_.pg->range(0).start);
      for (std::uint64_t e = 0; e < a->entries(); ++e) {
        const std::uint32_t ref = a->ref(e).load();
        if (faults_allowed_) {
          h.add(ref - static_cast<std::uint32_t>(a->mapcount(e).load()));
        } else {
          h.add(ref);
          h.add(static_cast<std::uint64_t>(a->mapcount(e).load()));
          // An unmapped entry's association goes with the entry (a refaultable change).
          h.add(a->order(e));
          h.add(reinterpret_cast<std::uintptr_t>(a->mapping(e).load()));
          h.add(a->index_or_share(e).load());
        }
        h.add(a->flags(e).load());
      }
    }
  }
  if (pc_.ref) {
    h.add(pc_.ref->is_dying() ? 1 : 0);
    h.add(pc_.ref->is_percpu() ? 1 : 0);
    if (!pc_.ref->is_percpu()) h.add(static_cast<std::uint64_t>(pc_.ref->approx_count()));
    h.add(static_cast<std::uint64_t>(pc_.releases->load()));
  }
  return h.value();
}

PGMAP_FUZZ_ORACLE void World::check_consistency(const char* after) {
  if (!failure_.empty()) return;
  auto bad = [&](const std::string& why) { fail(std::string("after ") + after + ": " + why); };
  // Every entry of both address spaces, collected in one walk each (not one per device).
  std::vector<mm::PtEntry> ptes;
  for (AddressSpace* as : {as_.get(), child_.get()}) {
    if (as != nullptr) visit_entries(*as, [&](const mm::PtEntry& pte) { ptes.push_back(pte); });
  }
  for (const Dev& d : devs_) {
    if (!d.pg) continue;
    const bool dead = d.pg->state() == DevPagemap::State::dead;
    // What the harness holds on each entry: references and exact pins.
    PageArray* a = dead ? nullptr : d.pg->array_for(d.pg->range(0).start);
    std::vector<std::uint64_t> want_ref(a ? a->entries() : 0, 0);
    std::vector<std::uint64_t> want_pin(a ? a->entries() : 0, 0);
    std::vector<std::int64_t> entries_seen(a ? a->entries() : 0, 0);
    std::size_t held = 0;
    auto account = [&](Pfn pfn, bool pin, std::uint64_t n) {
      ++held;
      if (a == nullptr) return;
      const std::uint64_t head = a->head_of(a->index_of(pfn));
      if (!pin) {
        want_ref[head] += n;
      } else if (a->uses_pin_bias(head)) {
        want_ref[head] += n * PageArray::kPinBias;
      } else {
        want_ref[head] += n;
        want_pin[head] += n;
      }
    };
    for (const auto& r : refs_) {
      if (r.pagemap() == d.pg.get()) account(r.pfn(), false, r.refs());
    }
    for (const auto& p : pins_) {
      if (p.pagemap() == d.pg.get()) account(p.pfn(), true, 1);
    }
    for (const auto& g : gups_) {
      for (const auto& pg : g.pages()) {
        if (pg.pgmap == d.pg.get()) account(pg.pfn, g.pinned, 1);
      }
    }
    if (dead) {
      if (held != 0)
        bad(d.pg->name() + " is dead while the harness holds " + std::to_string(held) +
            " references or pins on it");
      continue;
    }
    // Entries mapping this pagemap, in both address spaces.
    for (const mm::PtEntry& pte : ptes) {
      if (pte.pgmap != d.pg.get()) continue;
      if (!d.pg->contains(pte.pfn)) {
        bad("entry maps a pfn outside its pagemap");
      } else {
        ++entries_seen[a->head_of(a->index_of(pte.pfn))];
      }
    }
    for (std::uint64_t e = 0; e < a->entries(); ++e) {
      const std::uint32_t ref = a->ref(e).load();
      const std::int32_t mc = a->mapcount(e).load();
      const std::uint32_t pins = a->pincount(e).load();
      if (a->head_of(e) != e) {
        if (ref != 0 || mc != 0 || pins != 0) bad("tail entry carries counts");
        continue;
      }
      if (mc < 0) bad("negative mapcount");
      if (ref >= PageArray::kRetiredRef) bad("retired refcount on a live pagemap");
      if (mc != entries_seen[e]) {
        bad("mapcount " + std::to_string(mc) + " but " + std::to_string(entries_seen[e]) +
            " entries map the folio");
      }
      const std::uint64_t expect = want_ref[e] + static_cast<std::uint64_t>(mc < 0 ? 0 : mc);
      if (ref != expect) {
        bad(d.pg->name() + " entry " + std::to_string(e) + ": refcount " + std::to_string(ref) +
            ", expected " + std::to_string(expect) + " (handles + mapcount)");
      }
      if (pins != want_pin[e]) bad("exact pincount differs from the pins held");
    }
  }
  // Every entry maps a pagemap the harness knows and that is not dead.
  if (pc_.ref && !pc_.ref->is_percpu() && pc_.exact && !pc_.released &&
      pc_.ref->approx_count() != pc_.count) {
    bad("PercpuRef count " + std::to_string(pc_.ref->approx_count()) + ", model " +
        std::to_string(pc_.count));
  }
  // Only while the model is exact: a put of the owner's initial reference while live (misuse that
  // neither mode can detect, issued on purpose) ends the life early, so in atomic mode the release
  // runs at that put and again when a later kill drops the count to zero once more.
  if (pc_.exact && pc_.releases->load() > 1)
    bad("PercpuRef release ran more than once in one life");
}

// The fs invariant checker over the filesystem's pagemaps, inodes and allocator (the address
// spaces are left out: they also map the devices, checked by check_consistency). Its state only
// changes through calls, so a violation a call leaves stays visible until a destructive call
// (checked before it runs) or the end of the input: running it every kFsCheckEvery calls, around
// destructive calls and at the end keeps what it catches, at a fraction of the cost.
void World::check_fs(const std::string& where) {
  fs_unchecked_calls_ = 0;
  fs_check_due_ = false;
  if (!failure_.empty() || !fs_.fs || fs_.pg->state() == DevPagemap::State::dead) return;
  fs_.fs->flush_evictions();
  debug::FsUniverse fu;
  fu.filesystems.push_back(fs_.fs.get());
  debug::Report r = debug::check_fs_invariants(debug::Universe{}, fu);
  if (!r.ok()) fail(where + ": " + r.to_string(4));
}

Dev* World::live_dev(Input& in) {
  Dev& d = devs_[in.u8() % kSlots];
  return d.pg ? &d : nullptr;
}

std::uint64_t World::pick_addr(Input& in) {
  const std::uint8_t k = in.u8();
  const std::uint64_t page = (in.u8() % (kWindowBytes / kPageSize / 8)) * 8 * kPageSize;
  switch (k % 8) {
    case 0:
    case 1:
    case 2:
      return kWindow + page;
    case 3:
      return kWindow + (in.u8() % 4) * kPmdSize;
    case 4:
      return kWindow + page + 1 + in.u8();  // unaligned
    case 5:
      return kWindow + kGiB * (1 + in.u8() % kExtraWindows) + page;
    case 6:
      return ~std::uint64_t{0} - kPageSize * (in.u8() % 4);  // near 2^64
    default:
      return AddressSpace::kTaskSize - kPageSize * (in.u8() % 4);
  }
}

std::uint64_t World::pick_len(Input& in) {
  const std::uint8_t k = in.u8();
  switch (k % 10) {
    case 0:
      return kPageSize * (1 + in.u8() % 16);
    case 1:
      return kPmdSize;
    case 2:
      return kPmdSize * 2;
    case 3:
      return 0;
    case 4:
      return kPageSize * (1 + in.u8() % 4) + 1 + in.u8();  // unaligned
    case 5:
      return ~std::uint64_t{0} - kPageSize * (in.u8() % 4);  // rounds up past 2^64
    case 6:
      return std::uint64_t{1} << 63;
    case 7:
      return ~std::uint64_t{0} - kWindow + 1;  // addr + len wraps to 0
    default:
      return kPageSize * (1 + in.u8() % 64);
  }
}

Pfn World::pick_pfn(Input& in, const Dev& d) {
  const PfnRange r = d.pg->range(0);
  switch (in.u8() % 6) {
    case 0:
      return r.start - 1;
    case 1:
      return r.end();
    case 2:
      return ~Pfn{0};
    default:
      return r.start + in.u8() % r.count;
  }
}

// ---- ops ---------------------------------------------------------------------------------------

void World::op_memremap(Input& in) {
  const std::size_t slot = in.u8() % kSlots;
  Dev& d = devs_[slot];
  if (d.pg) {
    // A pagemap over the same backing overlaps the live one (or reuses the pfns of a dead one:
    // backings are never reused, so this is always a new device).
    if (d.pg->state() != DevPagemap::State::dead) return;
    if (d.dax && !d.dax->unbound()) return;
  }
  const unsigned order = in.flag() ? kPmdOrder : 0;
  BackingOptions bo;
  bo.size = kDevBytes;
  bo.align = kPmdSize;
  bo.hugepage_advice = false;
  bo.name = "pgmap-fuzz";
  auto b = make_anonymous_backing(bo);
  if (!b) {
    fail("make_anonymous_backing: " + b.error().to_string());
    return;
  }
  MemremapParams p;
  p.type = PagemapType::generic;
  p.strategy = kSafeStrategies[slot];
  p.base_order = order;
  p.quarantine = true;
  std::shared_ptr<Backing> backing(std::move(b).value());
  p.ranges.push_back(PagemapRangeSpec{backing, 0, 0});
  std::shared_ptr<DevPagemap> pg;
  call("memremap", [&] {
    auto r = memremap(std::move(p));
    if (!r) return r.code();
    pg = std::move(r).value();
    return Errc::ok;
  });
  if (!pg) return;
  std::shared_ptr<dax::DevDax> dax;
  call("DevDax::create", [&] {
    auto r = dax::DevDax::create(pg, "fuzz" + std::to_string(slot));
    if (!r) return r.code();
    dax = std::move(r).value();
    return Errc::ok;
  });
  // The previous device of this slot is dead and unbound: dropping it frees nothing in use.
  d = Dev{std::move(backing), std::move(pg), std::move(dax), order};
  state_changed();
}

void World::op_memremap_bad(Input& in) {
  Dev* d = live_dev(in);
  MemremapParams p;
  p.type = PagemapType::generic;
  p.strategy = kSafeStrategies[in.u8() % kSlots];
  p.quarantine = true;
  BackingOptions bo;
  bo.size = kDevBytes;
  bo.align = kPmdSize;
  bo.hugepage_advice = false;
  auto b = make_anonymous_backing(bo);
  if (!b) return;
  std::shared_ptr<Backing> backing(std::move(b).value());
  const std::uint8_t v = in.u8();
  if (d != nullptr && d->pg->state() != DevPagemap::State::dead && (v & 0x80) != 0) {
    backing = d->backing;  // overlaps the live pagemap
    p.ranges.push_back({backing, (v % 2) * kPageSize, 0});
  } else
    switch (v % 7) {
      case 0:
        p.ranges.push_back({backing, kPageSize + 1, 0});  // unaligned offset
        break;
      case 1:
        p.ranges.push_back({backing, kPageSize, ~std::uint64_t{0} - kPageSize + 1});  // wraps
        break;
      case 2:
        p.ranges.push_back({backing, 0, kDevBytes + kPageSize});  // past the backing
        break;
      case 3:
        p.base_order = 3;
        p.ranges.push_back({backing, 0, 0});
        break;
      case 4:
        break;  // no ranges
      case 5:
        p.ranges.push_back({backing, 0, kPageSize});
        p.ranges.push_back({backing, 0, kPageSize});  // two ranges overlap
        break;
      default:
        p.ranges.push_back({nullptr, 0, 0});
        break;
    }
  call(
      "memremap(bad)",
      [&] {
        auto r = memremap(std::move(p));
        if (!r) return r.code();
        stray_pagemaps_.push_back(std::move(r).value());
        return Errc::ok;
      },
      /*expect_error=*/true);
}

void World::op_unbind(Input& in) {
  Dev* d = live_dev(in);
  if (d == nullptr || !d->dax) return;
  MemunmapOptions o;
  o.policy = in.flag() ? UnmapPolicy::refuse : UnmapPolicy::wait;
  o.timeout = std::chrono::milliseconds(1 + in.u8() % 50);
  bool partial = false;
  call("DevDax::unbind", [&] {
    Errc e = d->dax->unbind(o).code();
    // devdax.h: an unbind that is refused or times out leaves the device killed and the pagemap
    // killed (its documented partial effect), so oracle (b) checks that state instead.
    partial = e == Errc::busy || e == Errc::timed_out;
    if (partial) exempt_next_error_ = true;
    return e;
  });
  if (partial && (d->pg->state() == DevPagemap::State::live || d->dax->unbound())) {
    fail("DevDax::unbind gave up but did not leave the device and pagemap killed");
  }
}

void World::op_kill(Input& in) {
  Dev* d = live_dev(in);
  if (d == nullptr) return;
  call("DevPagemap::kill", [&] { return d->pg->kill(); });
}

void World::op_memunmap(Input& in) {
  Dev* d = live_dev(in);
  if (d == nullptr) return;
  MemunmapOptions o;
  o.policy = in.flag() ? UnmapPolicy::refuse : UnmapPolicy::wait;
  o.timeout = std::chrono::milliseconds(1 + in.u8() % 50);
  // Inside a read section the grace period cannot be waited for: memunmap must refuse.
  call(
      "DevPagemap::memunmap", [&] { return d->pg->memunmap(o).code(); }, rcu_depth_ > 0);
}

void World::op_mmap(Input& in) {
  Dev* d = live_dev(in);
  AddressSpace* as = pick_as(in);
  std::shared_ptr<mm::MappingOwner> owner = d != nullptr ? d->dax : nullptr;
  const std::uint64_t addr = pick_addr(in);
  std::uint64_t len = pick_len(in);
  if (in.flag()) len = kDevBytes;
  const std::uint32_t prot = in.u8() % 4;
  std::uint32_t flags = in.u8() % 8;
  if ((in.u8() % 4) != 0) flags = (flags & ~std::uint32_t{mm::kMapPrivate}) | mm::kMapShared;
  const std::uint64_t offset = in.flag() ? 0 : (in.u8() % 4) * kPmdSize + (in.flag() ? 1 : 0);
  call("AddressSpace::mmap",
       [&] { return as->mmap(addr, len, prot, flags, owner, offset).code(); });
}

void World::op_munmap(Input& in) {
  AddressSpace* as = pick_as(in);
  const std::uint64_t addr = pick_addr(in);
  const std::uint64_t len = pick_len(in);
  fs_breaking_ = fs_may_evict();  // the last mapping of an unlinked file: its eviction
  call("AddressSpace::munmap", [&] { return as->munmap(addr, len); });
}

void World::op_mprotect(Input& in) {
  AddressSpace* as = pick_as(in);
  const std::uint64_t addr = pick_addr(in);
  const std::uint64_t len = pick_len(in);
  const std::uint32_t prot = in.u8() % 5;
  call("AddressSpace::mprotect", [&] { return as->mprotect(addr, len, prot); });
}

void World::op_mremap(Input& in) {
  AddressSpace* as = pick_as(in);
  const std::uint64_t old_addr = pick_addr(in);
  const std::uint64_t old_len = pick_len(in);
  const std::uint64_t new_len = pick_len(in);
  const std::uint32_t flags = in.u8() % 4;
  const std::uint64_t new_addr = pick_addr(in);
  fs_breaking_ = fs_may_evict();  // as munmap
  call("AddressSpace::mremap",
       [&] { return as->mremap(old_addr, old_len, new_len, flags, new_addr).code(); });
}

void World::op_access(Input& in) {
  AddressSpace* as = pick_as(in);
  const std::uint64_t addr = pick_addr(in);
  const std::uint64_t len = (in.u8() % 3 == 0) ? kPageSize * 3 + in.u8() : 1 + in.u8();
  std::vector<std::uint8_t> buf(len, in.u8());
  switch (in.u8() % 3) {
    case 0:
      // A signal is not an error code: the bytes before the failing page were copied.
      call_infallible("AddressSpace::read", [&] {
        (void)as->read(addr, buf.data(), len);  // outcome checked by the consistency oracle
      });
      break;
    case 1:
      call_infallible("AddressSpace::write", [&] {
        (void)as->write(addr, buf.data(), len);  // as read
      });
      break;
    default: {
      const bool write = in.flag();
      call_infallible("AddressSpace::handle_fault", [&] {
        (void)as->handle_fault(addr, write);  // a signal leaves the page table as it was
      });
    }
  }
}

void World::op_fork(Input& in) {
  if (child_ && in.flag()) {
    fs_breaking_ = fs_may_evict();  // as munmap
    call_infallible("~AddressSpace(child)", [&] { child_.reset(); });
    return;
  }
  call_infallible("AddressSpace::fork", [&] { child_ = as_->fork(); });
}

void World::op_gup(Input& in) {
  if (gups_.size() >= kMaxHandles) return;
  AddressSpace* as = pick_as(in);
  const std::uint64_t start = pick_addr(in);
  std::uint64_t nr = 1 + in.u8() % 32;
  if (in.u8() % 8 == 0) nr = ~std::uint64_t{0} >> (in.u8() % 16);  // past the end of memory
  const std::uint32_t flags = in.u8() % 16;
  HeldGup g;
  faults_allowed_ = true;
  // Mostly the call that fits the flags; sometimes get_user_pages with kFollPin (refused).
  g.pinned = (flags & mm::kFollPin) != 0 && in.u8() % 4 != 0;
  if (g.pinned) {
    call("pin_user_pages", [&] {
      auto r = mm::pin_user_pages(*as, start, nr, flags);
      if (!r) return r.code();
      g.pins = std::move(r).value();
      return Errc::ok;
    });
  } else {
    call("get_user_pages", [&] {
      auto r = mm::get_user_pages(*as, start, nr, flags);
      if (!r) return r.code();
      g.refs = std::move(r).value();
      return Errc::ok;
    });
  }
  faults_allowed_ = false;
  if (!g.pages().empty()) gups_.push_back(std::move(g));
}

void World::op_gup_release(Input& in) {
  if (gups_.empty()) return;
  const std::size_t i = in.u8() % gups_.size();
  HeldGup g = std::move(gups_[i]);
  gups_.erase(gups_.begin() + static_cast<std::ptrdiff_t>(i));
  call(g.pinned ? "unpin_user_pages" : "put_pages", [&] { return g.release(); });
}

void World::op_page_ref(Input& in) {
  if (in.flag() && !refs_.empty()) {
    const std::size_t i = in.u8() % refs_.size();
    PageRef r = std::move(refs_[i]);
    refs_.erase(refs_.begin() + static_cast<std::ptrdiff_t>(i));
    call("PageRef::release", [&] { return r.release(); });
    return;
  }
  Dev* d = live_dev(in);
  if (d == nullptr || refs_.size() >= kMaxHandles) return;
  if (d->pg->state() == DevPagemap::State::dead) return;  // no metadata left to name
  // alloc_event: a folio reference is only legitimate under an allocation covering it.
  if (d->pg->strategy() == Strategy::alloc_event && !covered_by_alloc(d->pg.get())) return;
  const Pfn pfn = pick_pfn(in, *d);
  const std::uint32_t n = 1 + in.u8() % 3;
  call("PageRef::get", [&] {
    auto r = PageRef::get(*d->pg, pfn, n);
    if (!r) return r.code();
    refs_.push_back(std::move(r).value());
    return Errc::ok;
  });
}

void World::op_pin(Input& in) {
  if (in.flag() && !pins_.empty()) {
    const std::size_t i = in.u8() % pins_.size();
    Pin p = std::move(pins_[i]);
    pins_.erase(pins_.begin() + static_cast<std::ptrdiff_t>(i));
    call("Pin::release", [&] { return p.release(); });
    return;
  }
  Dev* d = live_dev(in);
  if (d == nullptr || pins_.size() >= kMaxHandles) return;
  if (d->pg->state() == DevPagemap::State::dead) return;
  if (d->pg->strategy() == Strategy::alloc_event && !covered_by_alloc(d->pg.get())) return;
  const Pfn pfn = pick_pfn(in, *d);
  call("Pin::pin", [&] {
    auto r = Pin::pin(*d->pg, pfn);
    if (!r) return r.code();
    pins_.push_back(std::move(r).value());
    return Errc::ok;
  });
}

// Misuse the library can see: a put on an idle folio, an unpin of an unpinned one, a put or
// unpin of more than the folio holds, on pagemaps in any state but dead.
void World::op_stray(Input& in) {
  Dev* d = live_dev(in);
  if (d == nullptr || d->pg->state() == DevPagemap::State::dead) return;
  const Pfn pfn = pick_pfn(in, *d);
  if (!d->pg->contains(pfn)) {
    call(
        "DevPagemap::put_folio(outside)", [&] { return d->pg->put_folio(pfn); }, true);
    return;
  }
  PageArray* a = d->pg->array_for(pfn);
  const std::uint64_t head = a->head_of(a->index_of(pfn));
  const std::uint32_t ref = a->ref(head).load();
  if (in.flag()) {
    // More than the whole refcount.
    const std::uint32_t n = ref + 1 + in.u8() % 4;
    call(
        "DevPagemap::put_folio(stray)", [&] { return d->pg->put_folio(pfn, n); }, true);
  } else {
    const std::uint32_t pins =
        a->uses_pin_bias(head) ? ref / PageArray::kPinBias : a->pincount(head).load();
    const std::uint32_t n = pins + 1;
    if (!a->uses_pin_bias(head) || n == 1) {
      call(
          "DevPagemap::unpin_folio(stray)", [&] { return d->pg->unpin_folio(pfn, n); }, true);
    }
  }
}

void World::op_alloc(Input& in) {
  if (in.flag() && !allocs_.empty()) {
    const std::size_t i = in.u8() % allocs_.size();
    const DevPagemap* pg = allocs_[i].pagemap();
    // Keep the rule the harness's own references rely on: under alloc_event an allocation covers
    // the raw references and pins taken on that pagemap.
    std::size_t same = 0;
    for (const auto& a : allocs_)
      same += a.pagemap() == pg ? 1u : 0u;
    bool raw = false;
    for (const auto& r : refs_)
      raw = raw || r.pagemap() == pg;
    for (const auto& p : pins_)
      raw = raw || p.pagemap() == pg;
    if (raw && same == 1 && pg->strategy() == Strategy::alloc_event) return;
    DevPagemap::Allocation a = std::move(allocs_[i]);
    allocs_.erase(allocs_.begin() + static_cast<std::ptrdiff_t>(i));
    call_infallible("Allocation::reset", [&] { a.reset(); });
    return;
  }
  Dev* d = live_dev(in);
  if (d == nullptr || allocs_.size() >= kMaxHandles) return;
  if (d->pg->state() == DevPagemap::State::dead) return;
  const PfnRange r = d->pg->range(0);
  Pfn first = r.start;
  std::uint64_t nr = r.count;
  switch (in.u8() % 4) {
    case 0:
      break;
    case 1:
      first = r.start + 1;  // runs past the end
      break;
    case 2:
      nr = ~std::uint64_t{0};  // first + nr wraps
      first = r.start + 1;
      break;
    default:
      nr = 0;
      break;
  }
  call("DevPagemap::request", [&] {
    auto res = d->pg->request(first, nr);
    if (!res) return res.code();
    allocs_.push_back(std::move(res).value());
    return Errc::ok;
  });
}

void World::op_percpu(Input& in) {
  PercpuModel& m = pc_;
  if (!m.ref) {
    const unsigned flags = in.u8() % 8;
    m.releases->store(0);
    auto rel = m.releases;
    m.dead = (flags & PercpuRef::kInitDead) != 0;
    m.count = m.dead ? 0 : 1;
    m.released = m.dead;
    m.exact = true;
    call_infallible("PercpuRef()", [&] {
      m.ref = std::make_unique<PercpuRef>([rel] { rel->fetch_add(1); }, flags);
    });
    return;
  }
  PercpuRef& r = *m.ref;
  const auto note_release = [&] {
    if (m.releases->load() > 0) m.released = true;
  };
  switch (in.u8() % 9) {
    case 0:
      call("PercpuRef::get", [&] {
        Errc e = r.get();
        if (e == Errc::ok) ++m.count;
        return e;
      });
      break;
    case 1:
      if ((r.is_percpu() && m.count <= 0) || (!m.dead && m.count <= 1)) {
        // Below zero cannot be seen in percpu mode, nor the owner's initial reference being put
        // while live in either mode; kill reports it. Issued sometimes, and the model stops
        // predicting the count.
        if (!in.flag()) break;
        m.exact = false;
      }
      call("PercpuRef::put", [&] {
        Errc e = r.put();
        if (e == Errc::ok) --m.count;
        return e;
      });
      note_release();
      break;
    case 2:
      // After a put below zero in percpu mode, kill's fold finds the underflow and undoes the
      // kill (percpu_ref.h): an error that changes nothing, checked by oracle (b) like any other.
      call("PercpuRef::kill", [&] {
        Errc e = r.kill();
        if (e == Errc::ok) {
          m.dead = true;
          --m.count;
        }
        return e;
      });
      note_release();
      break;
    case 3:
      call("PercpuRef::resurrect", [&] {
        Errc e = r.resurrect();
        if (e == Errc::ok) {
          m.dead = false;
          ++m.count;
        }
        return e;
      });
      break;
    case 4:
      call("PercpuRef::reinit", [&] {
        Errc e = r.reinit();
        if (e == Errc::ok) {
          m.dead = false;
          m.count = 1;
          m.released = false;
          m.exact = true;
          m.releases->store(0);
        }
        return e;
      });
      break;
    case 5:
      call("PercpuRef::switch_to_atomic", [&] { return r.switch_to_atomic(); });
      break;
    case 6:
      call("PercpuRef::switch_to_percpu", [&] { return r.switch_to_percpu(); });
      break;
    case 7:
      call_infallible("PercpuRef::tryget_live", [&] {
        if (r.tryget_live()) ++m.count;
      });
      break;
    default:
      call_infallible("~PercpuRef", [&] { m.ref.reset(); });
      break;
  }
}

void World::op_rcu(Input& in) {
  switch (in.u8() % 4) {
    case 0:
      if (rcu_depth_ < 3) {
        rcu::read_lock();
        ++rcu_depth_;
      }
      break;
    case 1:
      if (rcu_depth_ > 0) {
        rcu::read_unlock();
        --rcu_depth_;
      }
      break;
    default:
      call(
          "rcu::synchronize", [&] { return rcu::synchronize(); }, rcu_depth_ > 0);
      break;
  }
}

void World::op_lookup(Input& in) {
  Dev* d = live_dev(in);
  if (d == nullptr) return;
  const Pfn pfn = d->pg->range(0).start + in.u8() % d->pg->range(0).count;
  call("get_dev_pagemap", [&] {
    PagemapRef r = get_dev_pagemap(pfn);
    if (r && r.get() != d->pg.get()) return Errc::invalid_argument;  // wrong pagemap
    return Errc::ok;
  });
}

// ---- the filesystem ----------------------------------------------------------------------------

bool World::fs_may_evict() const {
  if (!fs_.fs) return false;
  for (const auto& inode : fs_.fs->inodes()) {
    if (inode->nlink() == 0) return true;
  }
  return false;
}

bool World::fs_pages_held() const {
  if (!fs_.pg) return false;
  for (const auto& g : gups_) {
    for (const auto& pg : g.pages()) {
      if (pg.pgmap == fs_.pg.get()) return true;
    }
  }
  return false;
}

// Mount, unbind under the mounted filesystem, unmount, memory failure.
void World::op_fs(Input& in) {
  switch (in.u8() % 5) {
    case 0: {
      if (fs_.fs) return;
      // Inside an open read section memremap is refused (it waits for a grace period): that
      // refusal is op_memremap's to check; mounting needs a pagemap, so there is nothing to do.
      if (rcu_depth_ > 0) return;
      BackingOptions bo;
      bo.size = kFsBytes;
      bo.align = kPmdSize;
      bo.name = "fuzz-fs";
      auto b = make_anonymous_backing(bo);
      if (!b) return fail("fs backing: " + b.error().to_string());
      fs_.backing = std::shared_ptr<Backing>(std::move(b).value());
      MemremapParams p;
      p.type = PagemapType::fs_dax;
      p.strategy = kSafeStrategies[in.u8() % kSafeStrategies.size()];
      p.ranges.push_back(PagemapRangeSpec{fs_.backing, 0, 0});
      p.name = "fuzz-fs";
      auto pg = memremap(std::move(p));
      if (!pg) return fail("fs memremap: " + pg.error().to_string());
      fs_.pg = std::move(pg).value();
      auto d = dax::DaxDevice::create(fs_.pg, "fuzz-pmem");
      if (!d) return fail("fs DaxDevice::create: " + d.error().to_string());
      fs_.dax = std::move(d).value();
      fs::MountOptions mo;
      mo.pre_remove_wait = std::chrono::milliseconds(20);
      mo.evict_report_every = std::chrono::seconds(60);
      auto m = fs::DaxFs::mount(fs_.dax, mo);
      if (!m) return fail("mount: " + m.error().to_string());
      fs_.fs = std::move(m).value();
      fs_check_due_ = true;
      state_changed();
      call(
          "DaxFs::mount again", [&] { return fs::DaxFs::mount(fs_.dax).code(); }, true);
      break;
    }
    case 1:
      if (!fs_.fs) return;
      fs_breaking_ = true;
      call("DaxDevice::kill under a mounted fs", [&] { return fs_.dax->kill(); });
      break;
    case 2:
      if (!fs_.fs) return;
      fs_breaking_ = true;
      call("DaxFs::unmount", [&] { return fs_.fs->unmount(); });
      break;
    case 3: {
      if (!fs_.fs) return;
      const std::uint64_t off = (std::uint64_t{in.u8()} % 1100) * kPageSize;
      const std::uint64_t len = (in.u8() % 3) * kPageSize + 1;
      fs_breaking_ = true;
      call("DaxFs::memory_failure", [&] { return fs_.fs->memory_failure(off, len, 0).code(); });
      break;
    }
    default:
      if (!fs_.fs) return;
      fs_breaking_ = true;
      call("DaxFs::unlink", [&] { return fs_.fs->unlink(fmt_name(in.u8())); });
      break;
  }
}

// File operations (on the files the sequence holds open).
void World::op_fs_file(Input& in) {
  if (!fs_.fs) return;
  fs::DaxFs& fs = *fs_.fs;
  const std::uint8_t k = in.u8();
  fs::File* f = fs_.files.empty() ? nullptr : &fs_.files[in.u8() % fs_.files.size()];
  // One input byte per statement: the decoding must not depend on evaluation order (the fuzzer is
  // built with clang, the replay test with gcc).
  std::uint64_t off = (in.u8() % 64) * kPageSize;
  if (in.flag()) off *= 8;
  if (in.flag()) off += 7;
  std::uint64_t len = (in.u8() % 16) * kPageSize;
  if (!in.flag()) len += 3;
  fs::BreakOptions brk;
  brk.nowait = in.flag();
  if (!brk.nowait) brk.timeout = std::chrono::milliseconds(20);
  switch (k % 10) {
    case 0:
    case 1: {
      if (fs_.files.size() >= kMaxHandles / 4) return;
      const std::string name = fmt_name(in.u8());
      call("DaxFs::create/open", [&] {
        Result<fs::File> r = (k & 1) != 0 ? fs.create(name) : fs.open(name);
        if (!r) return r.code();
        fs_.files.push_back(std::move(r).value());
        return Errc::ok;
      });
      break;
    }
    case 2:
      // The last close of an unlinked file evicts it: that waits for every pin, without bound.
      if (f == nullptr || fs_pages_held()) return;
      fs_breaking_ = fs_may_evict();
      call_infallible("File close",
                      [&] { fs_.files.erase(fs_.files.begin() + (f - fs_.files.data())); });
      break;
    case 3: {
      if (f == nullptr) return;
      std::vector<std::uint8_t> buf(len, static_cast<std::uint8_t>(k));
      call("Inode::write", [&] { return f->inode().write(off, buf.data(), buf.size()).code(); });
      break;
    }
    case 4: {
      if (f == nullptr) return;
      std::vector<std::uint8_t> buf(len);
      call("Inode::read", [&] { return f->inode().read(off, buf.data(), buf.size()).code(); });
      break;
    }
    case 5:
      if (f == nullptr) return;
      faults_allowed_ = true;  // a failed break may have unmapped (refaultable)
      fs_breaking_ = true;
      call("Inode::truncate", [&] { return f->inode().truncate(off, brk).code(); });
      faults_allowed_ = false;
      break;
    case 6: {
      if (f == nullptr) return;
      const fs::FallocMode mode = static_cast<fs::FallocMode>(in.u8() % 4);
      fs::FallocOptions o;
      o.brk = brk;
      o.keep_size = in.flag();
      o.pmd_aligned = in.flag();  // separate statements: sequenced
      faults_allowed_ = true;
      fs_breaking_ = true;  // punch, zero and collapse free blocks and delete entries
      call("Inode::fallocate", [&] { return f->inode().fallocate(mode, off, len, o).code(); });
      faults_allowed_ = false;
      break;
    }
    case 7: {
      // reflink waits for busy pages of both files without bound once its NOWAIT pass fails.
      if (fs_.files.size() < 2 || fs_pages_held()) return;
      fs::File& a = fs_.files[in.u8() % fs_.files.size()];
      fs::File& b = fs_.files[in.u8() % fs_.files.size()];  // after a's byte
      faults_allowed_ = true;
      fs_breaking_ = true;  // the destination's blocks are replaced
      call(
          "DaxFs::reflink", [&] { return fs.reflink(a.inode(), b.inode()); },
          &a.inode() == &b.inode());
      faults_allowed_ = false;
      break;
    }
    case 8: {
      if (f == nullptr) return;
      AddressSpace* as = pick_as(in);
      const std::uint64_t addr = pick_addr(in);
      const std::uint32_t prot = in.u8() % 4;
      std::uint32_t flags = mm::kMapShared;
      if (in.flag()) flags |= mm::kMapFixed;
      std::uint64_t mlen = 2 * kPmdSize;
      if (!in.flag()) mlen = (1 + in.u8() % 16) * kPageSize;
      call("AddressSpace::mmap of a file",
           [&] { return as->mmap(addr, mlen, prot, flags, f->mapping(), 0).code(); });
      break;
    }
    default:
      if (f == nullptr) return;
      faults_allowed_ = true;
      call("Inode::break_layout", [&] {
        return f->inode().break_layout(off >> kPageShift, (off + len) >> kPageShift, brk).code();
      });
      faults_allowed_ = false;
      break;
  }
}

void World::fs_teardown() {
  if (!fs_.fs) return;
  CallScope scope("teardown: filesystem");
  fs_.files.clear();  // the address spaces (their mappings) are gone already: evictions run
  fs_.fs->flush_evictions();
  if (fs_.fs->mounted()) {
    if (Errc e = fs_.fs->unmount(); e != Errc::ok) {
      fail(std::string("teardown: unmount with nothing open: ") + errc_name(e));
    }
  }
  fs_.fs.reset();
  if (!fs_.dax->killed()) (void)fs_.dax->kill();  // already_dead is fine
  MemunmapOptions o;
  o.timeout = std::chrono::seconds(2);
  auto r = fs_.pg->memunmap(o);
  if (!r) fail("teardown: fs memunmap with nothing held: " + r.error().to_string());
  fs_ = FsWorld{};
}

void World::teardown() {
  while (rcu_depth_ > 0) {
    rcu::read_unlock();
    --rcu_depth_;
  }
  for (auto& g : gups_) {
    Errc e = g.release();
    if (e != Errc::ok) fail(std::string("teardown: releasing a GUP set: ") + errc_name(e));
  }
  gups_.clear();
  for (auto& r : refs_) {
    if (Errc e = r.release(); e != Errc::ok) {
      fail(std::string("teardown: PageRef::release: ") + errc_name(e));
    }
  }
  refs_.clear();
  for (auto& p : pins_) {
    if (Errc e = p.release(); e != Errc::ok) {
      fail(std::string("teardown: Pin::release: ") + errc_name(e));
    }
  }
  pins_.clear();
  allocs_.clear();
  {
    CallScope scope("teardown: ~AddressSpace");
    child_.reset();
    as_.reset();
  }
  fs_teardown();
  MemunmapOptions o;
  o.policy = UnmapPolicy::wait;
  o.timeout = std::chrono::seconds(2);
  for (Dev& d : devs_) {
    if (!d.pg) continue;
    if (d.dax && !d.dax->unbound()) {
      CallScope scope("teardown: DevDax::unbind");
      auto r = d.dax->unbind(o);
      if (!r && r.code() != Errc::already_dead) {
        fail("teardown: unbind with nothing held: " + r.error().to_string());
      }
    }
    if (d.pg->state() != DevPagemap::State::dead) {
      CallScope scope("teardown: memunmap");
      auto r = d.pg->memunmap(o);
      if (!r) fail("teardown: memunmap with nothing held: " + r.error().to_string());
    }
  }
  if (!failure_.empty()) {
    // Something is still held: destroying would wait for it forever. Keep the objects.
    static std::mutex mu;
    static auto* leaked = new std::vector<Dev>();
    std::lock_guard<std::mutex> lock(mu);
    for (Dev& d : devs_)
      leaked->push_back(std::move(d));
  }
  {
    CallScope scope("teardown: destroy devices");
    for (Dev& d : devs_)
      d = Dev{};
    for (auto& p : stray_pagemaps_)
      (void)p->memunmap(o);  // refused input; its own report
    stray_pagemaps_.clear();
  }
  pc_.ref.reset();
}

SequenceResult World::run(Input& in) {
  static constexpr void (World::*kOps[])(Input&) = {
      &World::op_memremap,    &World::op_memremap, &World::op_memremap_bad, &World::op_unbind,
      &World::op_kill,        &World::op_memunmap, &World::op_mmap,         &World::op_mmap,
      &World::op_munmap,      &World::op_mprotect, &World::op_mremap,       &World::op_access,
      &World::op_access,      &World::op_fork,     &World::op_gup,          &World::op_gup,
      &World::op_gup_release, &World::op_page_ref, &World::op_pin,          &World::op_stray,
      &World::op_alloc,       &World::op_percpu,   &World::op_percpu,       &World::op_rcu,
      &World::op_lookup,      &World::op_fs,       &World::op_fs_file,      &World::op_fs_file,
      &World::op_fs_file,
  };
  constexpr std::size_t kNumOps = sizeof(kOps) / sizeof(kOps[0]);
  for (std::size_t n = 0; n < kMaxCalls && !in.empty() && failure_.empty(); ++n) {
    const std::uint64_t calls_before = calls_;
    (this->*kOps[in.u8() % kNumOps])(in);
    // An op that issued no call changed nothing the oracles read.
    if (calls_ == calls_before) continue;
    // After the op has recorded what it now holds (a call's handles are stored after it returns).
    // A queued eviction (the last mapping of an unlinked file went) runs before anything reads.
    if (fs_.fs) fs_.fs->flush_evictions();
    check_consistency(last_call_);
    if (fs_check_due_ || fs_unchecked_calls_ >= kFsCheckEvery)
      check_fs(std::string("after ") + last_call_);
  }
  check_fs("the end of the input");
  teardown();
  return SequenceResult{failure_, calls_, errors_};
}

}  // namespace

void set_trace(bool on) {
  g_trace.store(on);
}

SequenceResult run_api_sequence(const std::uint8_t* data, std::size_t size) {
  watchdog().start_thread();
  static const bool installed = [] {
    (void)set_misuse_handler(&counting_handler);  // the previous handler is the default one
    return true;
  }();
  (void)installed;
  Input in(data, size);
  World w;
  return w.run(in);
}

}  // namespace pgmap::fuzz
