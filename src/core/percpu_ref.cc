#include "pgmap/core/percpu_ref.h"

#include <sched.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <vector>

#include "core/heavy_barrier.h"
#include "core/rseq.h"
#include "pgmap/core/yield_point.h"

namespace pgmap {
namespace detail {

constinit thread_local ThreadCounters* t_counters = nullptr;

namespace {

// All counter blocks ever created, the parked ones, and the slot allocator. Lock order: a ref's
// own mutex (Data::mu) before this one.
enum class Impl { per_thread, rseq };

Impl choose_impl() {
  const char* force = std::getenv("PGMAP_PERCPU_IMPL");
  if (force != nullptr && std::strcmp(force, "per-thread") == 0) return Impl::per_thread;
  return rseq::available() ? Impl::rseq : Impl::per_thread;
}

// The implementation, the slot allocator, and (per-thread) all counter blocks ever created and
// the parked ones. Lock order: a ref's own mutex (Data::mu) before this one.
struct Registry {
  const Impl impl = choose_impl();
  std::mutex mu;
  std::vector<ThreadCounters*> all;
  std::vector<ThreadCounters*> parked;
  std::vector<std::uint32_t> free_slots;
  std::uint32_t next_slot = 0;

  static Registry& get() {
    static Registry* r = new Registry;  // never destroyed: threads may exit after main returns
    return *r;
  }

  ThreadCounters* adopt_or_create() {
    std::lock_guard<std::mutex> lock(mu);
    if (!parked.empty()) {
      ThreadCounters* t = parked.back();
      parked.pop_back();
      return t;
    }
    void* mem = mmap(nullptr, sizeof(ThreadCounters), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) return nullptr;  // the thread falls back to the shared atomic
    auto* t = new (mem) ThreadCounters;     // mmap memory is zero: every count starts at 0
    all.push_back(t);
    return t;
  }

  void park(ThreadCounters* t) {
    std::lock_guard<std::mutex> lock(mu);
    parked.push_back(t);
  }

  std::uint32_t alloc_slot() {
    std::lock_guard<std::mutex> lock(mu);
    if (!free_slots.empty()) {
      std::uint32_t s = free_slots.back();
      free_slots.pop_back();
      return s;
    }
    if (next_slot < kMaxPercpuRefs) return next_slot++;
    return kNoSlot;
  }

  // The slot's counts must sum to zero with no one touching them; they are reset so that the
  // next owner starts from zero everywhere.
  void free_slot(std::uint32_t slot) {
    std::lock_guard<std::mutex> lock(mu);
    if (impl == Impl::rseq) {
      (void)rseq::collect(slot, /*zero=*/true);  // the sum is zero; only the reset matters
    } else {
      for (ThreadCounters* t : all)
        t->counts[slot].store(0, std::memory_order_relaxed);
    }
    free_slots.push_back(slot);
  }

  // The word of a live (percpu) ref that owns `slot`.
  std::uintptr_t live_word(std::uint32_t slot) const {
    if (impl == Impl::rseq) return reinterpret_cast<std::uintptr_t>(rseq::counter(slot));
    return std::uintptr_t{slot} << kPercpuWordSlotShift | kPercpuWordPerThread;
  }

  // The barrier that makes the fold exact once ATOMIC is published (see the header).
  void barrier() const {
    if (impl == Impl::rseq) {
      rseq::barrier();
    } else {
      heavy_barrier();
    }
  }

  // Collects and zeroes one slot everywhere. The caller already published ATOMIC and ran
  // barrier(): no rseq section can commit any more, and a thread either sees ATOMIC or has its
  // `active` flag visible here.
  std::uint64_t collect(std::uint32_t slot) {
    std::lock_guard<std::mutex> lock(mu);
    if (impl == Impl::rseq) return rseq::collect(slot, /*zero=*/true);
    std::uint64_t sum = 0;
    for (ThreadCounters* t : all) {
      for (unsigned spins = 0; t->active.load(std::memory_order_acquire) != 0; ++spins) {
        if (spins > 64) sched_yield();  // its owner was preempted mid-operation
      }
      sum += t->counts[slot].load(std::memory_order_relaxed);
      t->counts[slot].store(0, std::memory_order_relaxed);
    }
    return sum;
  }

  // A racy snapshot of the slot's sum (diagnostics).
  std::uint64_t peek(std::uint32_t slot) {
    std::lock_guard<std::mutex> lock(mu);
    if (impl == Impl::rseq) return rseq::collect(slot, /*zero=*/false);
    std::uint64_t sum = 0;
    for (ThreadCounters* t : all)
      sum += t->counts[slot].load(std::memory_order_relaxed);
    return sum;
  }

  static constexpr std::uint32_t kNoSlot = std::numeric_limits<std::uint32_t>::max();
};

// Parks the thread's counter block when the thread exits. After it ran, the thread's operations
// take the shared-atomic slow path (t_exiting keeps it from registering again).
thread_local bool t_exiting = false;
struct ExitHook {
  ThreadCounters* block = nullptr;
  ~ExitHook() {
    t_exiting = true;
    t_counters = nullptr;
    if (block != nullptr) Registry::get().park(block);
  }
};
thread_local ExitHook t_exit_hook;

}  // namespace
}  // namespace detail

using detail::Registry;

namespace {
// Added to the shared count while percpu, so it can never read zero before the fold.
constexpr std::int64_t kBias = std::int64_t{1} << 62;
}  // namespace

struct PercpuRef::Data {
  Callback release;
  std::mutex mu;       // serializes mode changes of this ref
  std::uint32_t slot;  // Registry::kNoSlot: atomic-only
  bool allow_reinit;
  bool force_atomic;  // switch_to_atomic() is sticky
};

bool PercpuRef::ensure_thread_counters() noexcept {
  if (detail::t_counters != nullptr || detail::t_exiting) return false;
  detail::ThreadCounters* t = Registry::get().adopt_or_create();
  if (t == nullptr) return false;
  detail::t_exit_hook.block = t;  // constructs the hook, so its destructor will run at exit
  detail::t_counters = t;
  return true;
}

// A thread without a counter block (first use, or after its exit hook): register and retry, or
// report "not counted here" so that the caller uses the shared count.
bool PercpuRef::thread_add_first(std::uint64_t delta) noexcept {
  return ensure_thread_counters() && thread_add(delta);
}

std::string_view PercpuRef::implementation() noexcept {
  return Registry::get().impl == detail::Impl::rseq ? "rseq" : "per-thread";
}

void PercpuRef::kill_barrier() noexcept {
  Registry::get().barrier();
}

PercpuRef::PercpuRef(Callback release, unsigned flags) : mode_(0), data_(new Data) {
  Registry& r = Registry::get();
  data_->release = std::move(release);
  data_->allow_reinit = (flags & kAllowReinit) != 0;
  data_->force_atomic = (flags & kInitAtomic) != 0;
  data_->slot = r.alloc_slot();
  bool dead = (flags & kInitDead) != 0;
  bool percpu = !dead && !data_->force_atomic && data_->slot != Registry::kNoSlot;
  std::uintptr_t live = data_->slot == Registry::kNoSlot ? 0 : r.live_word(data_->slot);
  if (dead) {
    count_.store(0, std::memory_order_relaxed);
    mode_.store(live | kAtomic | kDead, std::memory_order_release);
  } else if (percpu) {
    count_.store(kBias + 1, std::memory_order_relaxed);
    mode_.store(live, std::memory_order_release);
  } else {
    count_.store(1, std::memory_order_relaxed);
    mode_.store(live | kAtomic, std::memory_order_release);
  }
}

PercpuRef::~PercpuRef() {
  std::uintptr_t m = mode_.load(std::memory_order_acquire);
  if ((m & kAtomic) == 0) {
    // Never killed: only legal if nobody but the owner ever used it. Fold to find out.
    mode_.store(m | kAtomic, std::memory_order_seq_cst);
    Registry::get().barrier();
    auto sum = static_cast<std::int64_t>(Registry::get().collect(data_->slot));
    count_.fetch_add(sum - kBias, std::memory_order_acq_rel);
  }
  std::int64_t c = count_.load(std::memory_order_acquire);
  // A live ref folded here must still hold its initial reference (release cannot have run in
  // percpu mode); an atomic one may have released already (its count may reach zero while live).
  bool folded = (m & kAtomic) == 0;
  if (c < 0 || (folded && c < 1)) {
    report_misuse(Errc::underflow, "PercpuRef destroyed after more puts than gets");
  } else if (c > 1 || ((m & kDead) != 0 && c != 0)) {
    report_misuse(Errc::busy, "PercpuRef destroyed while references are held");
  }
  if (data_->slot != Registry::kNoSlot) Registry::get().free_slot(data_->slot);
}

// ---- slow paths -------------------------------------------------------------------------------
// They use the shared atomic with zero checks whatever mode they saw: in percpu mode the count
// carries kBias, so the checks cannot fire; after a fold they are exact.

// Atomic-mode get/put are one fetch_add/fetch_sub (inline in the header) rather than a
// compare-and-swap loop: atomic mode is the contended mode, where CAS retries cost most. Misuse
// is detected from the value returned and undone at once, so it leaves the count as it was; the
// transient value is only visible to other users of a ref that is already being misused.
Errc PercpuRef::get_undo(std::int64_t add) noexcept {
  count_.fetch_sub(add, std::memory_order_acq_rel);
  report_misuse(Errc::released, "PercpuRef::get on a released reference");
  return Errc::released;
}

Errc PercpuRef::put_reached(std::int64_t now, std::int64_t sub) noexcept {
  if (now < 0) {
    count_.fetch_add(sub, std::memory_order_acq_rel);
    report_misuse(Errc::underflow, "PercpuRef::put below zero");
    return Errc::underflow;
  }
  if (data_->release) data_->release();  // only one put can move the count to zero
  return Errc::ok;
}

// A put on the shared count whatever the mode (kill's drop of the initial reference).
Errc PercpuRef::put_atomic(std::uint64_t n) noexcept {
  auto sub = static_cast<std::int64_t>(n);
  std::int64_t now = count_.fetch_sub(sub, std::memory_order_acq_rel) - sub;
  if (now > 0) return Errc::ok;
  return put_reached(now, sub);
}

bool PercpuRef::tryget_slow(bool live) noexcept {
  if (live && (mode_.load(std::memory_order_seq_cst) & kDead) != 0) return false;
  std::int64_t old = count_.load(std::memory_order_relaxed);
  do {
    if (old <= 0) return false;
  } while (!count_.compare_exchange_weak(old, old + 1, std::memory_order_seq_cst,
                                         std::memory_order_relaxed));
  // In atomic mode a kill does not wait for us, so check DEAD again after taking the reference:
  // either we see it and back out, or our increment preceded the kill and counts as before it.
  if (live && (mode_.load(std::memory_order_seq_cst) & kDead) != 0) {
    (void)put_atomic(1);  // undoes our own increment: cannot underflow
    return false;
  }
  return true;
}

// ---- mode changes -----------------------------------------------------------------------------

// Publishes ATOMIC (and DEAD if asked), then waits until no percpu operation can still commit and
// folds the counters into the shared count, bias still in. Returns the count without the bias.
// Called with data_->mu held on a percpu ref.
std::int64_t PercpuRef::fold_locked(std::uintptr_t m, std::uintptr_t flags) noexcept {
  mode_.store(m | flags, std::memory_order_seq_cst);
  PGMAP_YIELD_POINT("percpu.fold_before_barrier");
  Registry& r = Registry::get();
  r.barrier();
  PGMAP_YIELD_POINT("percpu.fold_before_collect");
  auto sum = static_cast<std::int64_t>(r.collect(data_->slot));
  return count_.fetch_add(sum, std::memory_order_acq_rel) + sum - kBias;
}

Errc PercpuRef::kill_and_confirm(const Callback& confirm) noexcept {
  {
    std::lock_guard<std::mutex> lock(data_->mu);
    std::uintptr_t m = mode_.load(std::memory_order_relaxed);
    if ((m & kDead) != 0) {
      report_misuse(Errc::already_dead, "PercpuRef killed twice");
      return Errc::already_dead;
    }
    std::int64_t now = 0;
    if ((m & kAtomic) == 0) {
      // The bias stays in until the count is known to be sane, so that it stays far from zero.
      now = fold_locked(m, kAtomic | kDead);
      if (now >= 1) count_.fetch_sub(kBias, std::memory_order_acq_rel);
    } else {
      mode_.store(m | kAtomic | kDead, std::memory_order_seq_cst);
      now = count_.load(std::memory_order_acquire);
    }
    if (now < 1) {
      // The initial reference is gone: more puts than gets. Undo the kill (the mode word goes
      // back to what it was; a percpu count keeps its bias and its counters were zeroed by the
      // fold, so the count is exactly what the fold found), so that nobody waits for a release
      // that cannot come.
      PGMAP_YIELD_POINT("percpu.kill_before_undo");
      mode_.store(m, std::memory_order_seq_cst);
      report_misuse(Errc::underflow, "PercpuRef: more puts than gets found at kill");
      return Errc::underflow;
    }
    if (!data_->allow_reinit && data_->slot != Registry::kNoSlot) {
      Registry::get().free_slot(data_->slot);
      data_->slot = Registry::kNoSlot;
    }
  }
  PGMAP_YIELD_POINT("percpu.kill_before_confirm");
  if (confirm) confirm();
  PGMAP_YIELD_POINT("percpu.kill_before_initial_put");
  // Drop the initial reference; may run release. The count was >= 1 (checked above), so this
  // can only fail if another thread is misusing the ref concurrently (and then it reports).
  return put_atomic(1);
}

Errc PercpuRef::switch_to_atomic() noexcept {
  std::lock_guard<std::mutex> lock(data_->mu);
  data_->force_atomic = true;
  std::uintptr_t m = mode_.load(std::memory_order_relaxed);
  if ((m & kAtomic) != 0) return Errc::ok;
  (void)fold_locked(m, kAtomic);  // any count is fine here: the ref is not being killed
  count_.fetch_sub(kBias, std::memory_order_acq_rel);
  return Errc::ok;
}

Errc PercpuRef::switch_to_percpu() noexcept {
  std::lock_guard<std::mutex> lock(data_->mu);
  std::uintptr_t m = mode_.load(std::memory_order_relaxed);
  if ((m & kAtomic) == 0) return Errc::ok;
  // Refusals change nothing: the sticky atomic request stays in force.
  if ((m & kDead) != 0) return Errc::dead;
  if (data_->slot == Registry::kNoSlot) return Errc::no_memory;
  data_->force_atomic = false;
  count_.fetch_add(kBias, std::memory_order_acq_rel);
  // The slot's counters are zero everywhere (reset by the last collect or free_slot).
  mode_.store(Registry::get().live_word(data_->slot), std::memory_order_seq_cst);
  return Errc::ok;
}

// Clears DEAD and returns to percpu mode unless atomic mode was asked for or there is no slot.
// Called with data_->mu held and the initial reference already counted in count_.
void PercpuRef::go_live_locked() noexcept {
  bool percpu = !data_->force_atomic && data_->slot != Registry::kNoSlot;
  std::uintptr_t live =
      data_->slot == Registry::kNoSlot ? 0 : Registry::get().live_word(data_->slot);
  if (percpu) {
    count_.fetch_add(kBias, std::memory_order_acq_rel);
    mode_.store(live, std::memory_order_seq_cst);  // the slot's counters are all zero
  } else {
    mode_.store(live | kAtomic, std::memory_order_seq_cst);
  }
}

Errc PercpuRef::resurrect() noexcept {
  std::lock_guard<std::mutex> lock(data_->mu);
  std::uintptr_t m = mode_.load(std::memory_order_relaxed);
  if ((m & kDead) == 0) {
    report_misuse(Errc::not_dead, "PercpuRef::resurrect of a live reference");
    return Errc::not_dead;
  }
  std::int64_t old = count_.load(std::memory_order_relaxed);
  do {
    if (old <= 0) return Errc::released;
  } while (!count_.compare_exchange_weak(old, old + 1, std::memory_order_acq_rel,
                                         std::memory_order_relaxed));
  go_live_locked();
  return Errc::ok;
}

Errc PercpuRef::reinit() noexcept {
  std::lock_guard<std::mutex> lock(data_->mu);
  std::uintptr_t m = mode_.load(std::memory_order_relaxed);
  std::int64_t expected = 0;
  if ((m & kAtomic) == 0 || !count_.compare_exchange_strong(expected, 1)) {
    report_misuse(Errc::busy, "PercpuRef::reinit of a reference that is not zero");
    return Errc::busy;
  }
  go_live_locked();
  return Errc::ok;
}

bool PercpuRef::is_zero() const noexcept {
  return (mode_.load(std::memory_order_acquire) & kAtomic) != 0 &&
         count_.load(std::memory_order_acquire) == 0;
}

std::int64_t PercpuRef::approx_count() const noexcept {
  std::uintptr_t m = mode_.load(std::memory_order_acquire);
  std::int64_t c = count_.load(std::memory_order_acquire);
  if ((m & kAtomic) != 0) return c;
  return c - kBias + static_cast<std::int64_t>(Registry::get().peek(data_->slot));
}

}  // namespace pgmap
