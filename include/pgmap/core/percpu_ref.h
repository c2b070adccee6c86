// PercpuRef: a reference count that costs a CPU-local increment while the object is live and
// becomes an ordinary atomic counter, with zero detection, once it is being torn down. It is the
// user-space twin of the kernel's percpu_ref (lib/percpu-refcount.c), and it is what a pagemap
// uses as its liveness reference.
//
// ---- Two implementations, chosen once per process ------------------------------------------
//
// implementation() says which one runs; both count exactly and obey the same contract.
//
//   "rseq" (preferred): each CPU has its own counter for the ref, updated inside a restartable
//     sequence (Linux rseq, registered by glibc): read the CPU id and the ref's word, add to that
//     CPU's counter with one non-locked add. If the thread is preempted, migrated or signalled in
//     between, the kernel restarts the sequence, so the add always lands on the CPU it was meant
//     for. The critical section is in pgmap/core/detail/rseq_percpu.h.
//   "per-thread" (fallback): each thread has its own counter block; the thread sets its `active`
//     flag, reads the word, updates its slot and clears the flag (see below).
//
// The choice is made at the first PercpuRef construction (or implementation() call): "rseq" if it
// was compiled in (x86-64, glibc >= 2.35), the thread has rseq registered and the kernel offers
// MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ; "per-thread" otherwise, always under ThreadSanitizer
// (TSan cannot see the asm's memory accesses), and when the environment variable
// PGMAP_PERCPU_IMPL=per-thread is set (tests run every PercpuRef test under both). Translation
// units must agree on the build flags (all with or all without ThreadSanitizer); one without the
// rseq fast path still counts correctly, through the shared atomic.
//
// ---- Modes and why zero cannot be seen in percpu mode ------------------------------------------
//
// In percpu ("live") mode gets and puts go to a counter that no other CPU (rseq) or thread
// (per-thread) writes: no lock prefix and no shared cache line on the fast path. A counter may go
// negative or wrap (a reference may be dropped on another CPU or thread than it was taken on);
// only the modular sum of all counters plus the shared atomic means anything, and computing that
// sum needs every writer to stop. So percpu mode cannot notice the count reaching zero. That is
// why the owner holds an *initial reference* and shutdown has two stages:
//
//   1. kill(): mark the ref DEAD (which implies ATOMIC), make sure no operation that read the
//      percpu word can still commit (a process-wide barrier), fold every counter into the shared
//      atomic, run the confirm callback, and drop the initial reference.
//   2. The last put() in atomic mode sees the count reach zero and runs `release` exactly once.
//
// There is no implied grace period between kill and release: release may run inside kill()
// (if nothing else was held) or later on whichever thread drops the last reference.
//
// ---- The word and the bias ---------------------------------------------------------------------
//
// The hot word packs the counter location and the mode, so one load gives both (the kernel's
// percpu_count_ptr): rseq: the address of the ref's CPU-0 counter | ATOMIC | DEAD; per-thread:
// slot index << 3 | PER_THREAD | ATOMIC | DEAD. While percpu, the shared atomic holds kBias plus
// whatever was counted there directly (operations that found no percpu counter: threads after
// their exit hook, translation units built without the rseq fast path). The fold adds the sum of
// the counters with the bias still in and only then subtracts the bias, so the shared count never
// transiently reads zero during the switch, and slow-path operations can always use zero-checking
// atomics whatever mode they saw.
//
// ---- How the switch knows that no operation is mid-flight --------------------------------------
//
// The switch stores the new mode (ATOMIC set), then issues a process-wide barrier:
//   rseq: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ), which aborts the rseq critical
//     section of every thread of the process that is in one. An aborted section restarts, re-reads
//     the word and sees ATOMIC; one that committed before the barrier is visible to the fold. So
//     the fold that follows is exact without any reader-side flag.
//   per-thread: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) (mprotect-IPI fallback). A thread's
//     operation is: set `active`; read the word; if percpu, update the slot; clear `active`
//     (release). After the barrier every thread either read the word after it (and sees ATOMIC) or
//     has its `active` store visible; the switch waits for each visible `active` to clear before
//     reading the slots.
//
// After kill() (or kill_and_confirm()) returns, tryget_live() fails on every thread; a
// tryget_live() that was already past its check when kill started may still succeed, and its
// reference is counted like any other.
//
// ---- Counters and slots ------------------------------------------------------------------------
//
// Each live ref owns one slot index (kMaxPercpuRefs of them). rseq: one block of 8-byte counters
// per possible CPU, a slot being the same index in every block (8 bytes per CPU per ref; a block
// is written only by its CPU). per-thread: each thread gets a counter block on its first
// operation; a block is never freed: when its thread exits, it is parked and later adopted by a
// new thread as is, so references taken on one thread and dropped on another, or dropped after
// the taker exited, are never lost or counted twice. A ref created when no slot is free runs in
// atomic mode for its whole life (is_percpu() tells), which is slower but equally correct.
//
// ---- Misuse ------------------------------------------------------------------------------------
//
// put below zero, get on a released ref, double kill, resurrect of a live ref, reinit of a
// non-zero ref: each returns a typed Errc, changes nothing, and calls report_misuse() (which
// aborts in PGMAP_DEBUG_INVARIANTS builds). Underflow in percpu mode cannot be seen until the fold;
// kill() then reports it and undoes itself (see kill()), so no caller waits for a release that
// cannot come. Operations are not async-signal-safe.
//
// ---- Example -----------------------------------------------------------------------------------
//
//   PercpuRef ref([&] { done.set(); });    // live, count 1 (the initial reference)
//   if (ref.tryget_live()) { use(); ref.put(); }   // hot path: CPU-local
//   ref.kill();                             // no new tryget_live; initial ref dropped
//   done.wait();                            // release ran: all users are gone
//
// When to use: an object with many short-lived users on many threads and a rare, explicit
// shutdown (a pagemap, a device). When not: objects that die often (kill costs a process-wide
// barrier, ~2-5 us here; start them with kInitAtomic and switch_to_percpu() once long-lived), or
// counts that must be read often (use a plain atomic). Alternatives: std::shared_ptr (one shared
// atomic, 11 ns here and 47-80 ns under 2-thread contention), liburcu urcu_ref (plain atomic),
// hazard pointers / RCU when the reader holds nothing across blocking.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "pgmap/core/detail/rseq_percpu.h"
#include "pgmap/core/error.h"

namespace pgmap {

inline constexpr std::size_t kMaxPercpuRefs = 16384;

namespace detail {

// One thread's counters. Allocated once, never freed (see "Threads and slots").
struct ThreadCounters {
  alignas(64) std::atomic<std::uint32_t> active;  // 1 while a fast-path operation is in flight
  alignas(64) std::atomic<std::uint64_t> counts[kMaxPercpuRefs];
};

// constinit: the fast path then reads the TLS slot directly instead of going through the TLS
// wrapper (no check for a dynamic initializer on every operation). It also avoids a GCC 12
// -fsanitize=null miscompile of that wrapper check (a stale flag made UBSan report "load of null
// pointer of type 'ThreadCounters *'" at `t_counters` in percpu_add).
// initial-exec: one %fs-relative load even when pgmap is a shared library.
extern constinit thread_local ThreadCounters* t_counters __attribute__((tls_model("initial-exec")));

// Word encoding shared with the implementation (see "The word and the bias").
inline constexpr std::uintptr_t kPercpuWordPerThread = 4;
inline constexpr unsigned kPercpuWordSlotShift = 3;

inline void compiler_barrier() noexcept {
  asm volatile("" ::: "memory");
}

enum class ThreadAddResult { done, not_percpu, no_block };

// The per-thread fast path (see "How the switch knows that no operation is mid-flight").
[[gnu::always_inline]] inline ThreadAddResult thread_slot_add(
    const std::atomic<std::uintptr_t>& word, std::uint64_t delta) noexcept {
  constexpr std::uintptr_t kFlags = 7;  // ATOMIC | DEAD | PER_THREAD
  ThreadCounters* t = t_counters;
  if (t == nullptr) [[unlikely]]
    return ThreadAddResult::no_block;
  t->active.store(1, std::memory_order_relaxed);
  compiler_barrier();  // the flag store stays before the word load (membarrier pairs)
  std::uintptr_t m = word.load(std::memory_order_relaxed);
  bool percpu = (m & kFlags) == kPercpuWordPerThread;
  if (percpu) [[likely]] {
#ifdef PGMAP_YIELD_POINTS
    for (std::uint32_t i = g_rseq_widen_spins.load(std::memory_order_relaxed); i > 0; --i)
      compiler_barrier();  // test-only: widen the window between the check and the add
#endif
    // A live word is slot << 3 | PER_THREAD, so m - PER_THREAD is the slot's byte offset in
    // `counts`: one addressing mode, no shift.
    static_assert(sizeof(std::atomic<std::uint64_t>) == std::uintptr_t{1} << kPercpuWordSlotShift);
    auto& c = *reinterpret_cast<std::atomic<std::uint64_t>*>(reinterpret_cast<char*>(t->counts) +
                                                             (m - kPercpuWordPerThread));
    c.store(c.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
  }
  t->active.store(0, std::memory_order_release);
  return percpu ? ThreadAddResult::done : ThreadAddResult::not_percpu;
}

}  // namespace detail

class PercpuRef {
 public:
  using Callback = std::function<void()>;

  enum InitFlags : unsigned {
    kInitAtomic = 1u,   // start in atomic mode (switch_to_percpu() later)
    kInitDead = 2u,     // start dead with count 0 (reinit() to bring it live)
    kAllowReinit = 4u,  // keep the percpu slot after kill so resurrect/reinit return to percpu
  };

  // `release` runs exactly once, when the count reaches zero after kill; it must not block for
  // long and may run on any thread, including inside kill(). It may destroy this object.
  explicit PercpuRef(Callback release, unsigned flags = 0);

  // The ref must be released (count zero) or never used by anyone but the owner; destroying a
  // ref that others still hold is reported as misuse (Errc::busy).
  ~PercpuRef();

  PercpuRef(const PercpuRef&) = delete;
  PercpuRef& operator=(const PercpuRef&) = delete;

  // ---- hot path: never block ----
  // Always inlined: the compiler's size estimate for the rseq asm would otherwise keep them out
  // of line, and the call would cost as much as the operation.
  [[gnu::always_inline]] Errc get() noexcept { return get_many(1); }
  [[gnu::always_inline]] Errc put() noexcept { return put_many(1); }
  [[gnu::always_inline]] inline Errc get_many(std::uint64_t n) noexcept;
  [[gnu::always_inline]] inline Errc put_many(std::uint64_t n) noexcept;
  // Succeeds unless the count is zero (fails only after release).
  [[gnu::always_inline]] inline bool tryget() noexcept;
  // Succeeds unless the ref was killed. Guaranteed to fail once kill() has returned.
  [[gnu::always_inline]] inline bool tryget_live() noexcept;
  // The inline fast path alone, for a hot caller that keeps every other case out of line (so
  // that its slow path is a tail call and its fast path makes no call and saves no registers):
  // adds (get_if_percpu) or drops (put_if_percpu) n references and returns true, exactly what
  // get_many / tryget_live / put_many do in percpu mode; otherwise returns false having changed
  // nothing, and the caller must call one of those, which handle every mode. With the inline
  // rseq path this is the rseq section alone (false also for a per-thread ref: the per-thread
  // path's first use is a call); without it, the per-thread fast path.
  [[gnu::always_inline]] bool get_if_percpu(std::uint64_t n) noexcept { return fast_add(n); }
  [[gnu::always_inline]] bool put_if_percpu(std::uint64_t n) noexcept { return fast_add(0 - n); }

  // ---- mode changes: may block for a process-wide barrier (µs), serialized per ref ----

  // Makes tryget_live() fail, switches to atomic mode, runs `confirm` (if any), then drops the
  // initial reference. Returns promptly (one process-wide barrier at most) and never waits for
  // holders. Errc::already_dead if already killed (nothing changes).
  //
  // Errc::underflow (and a misuse report) if the kill finds that the initial reference is gone,
  // i.e. more puts than gets (a stray put in percpu mode is only visible here). The kill is then
  // undone: DEAD is cleared, the ref is back in the mode it had (percpu stays percpu), `confirm`
  // does not run, release does not run, and the count is exactly what the fold computed (zero or
  // negative; approx_count() shows it). Concurrent tryget_live() calls may fail while the kill is
  // in flight. From that state every call returns promptly with its usual result: put()/get()
  // count as usual (a get() that restores the initial reference makes the next kill succeed),
  // kill() reports underflow again, resurrect() says Errc::not_dead, reinit() Errc::busy, and the
  // destructor reports Errc::underflow. An owner must therefore not wait for release after a kill
  // that failed: nothing was killed.
  Errc kill() noexcept { return kill_and_confirm(nullptr); }
  Errc kill_and_confirm(const Callback& confirm) noexcept;

  // Switch modes without killing. switch_to_atomic is sticky: the ref stays atomic (also across
  // kill + resurrect/reinit) until a successful switch_to_percpu(). switch_to_percpu refuses with
  // Errc::dead on a dead ref and Errc::no_memory if the ref has no percpu slot; a refusal changes
  // nothing (in particular a sticky atomic request stays in force).
  Errc switch_to_atomic() noexcept;
  Errc switch_to_percpu() noexcept;

  // Undo a kill before release: re-take the initial reference and go live again.
  // Errc::not_dead on a live ref, Errc::released if the count already reached zero (use reinit).
  Errc resurrect() noexcept;
  // Bring a released (zero) ref back to the state right after construction.
  // Errc::busy if the count is not zero.
  Errc reinit() noexcept;

  // ---- queries ----
  // "rseq" or "per-thread" (see the file comment); fixed for the life of the process.
  static std::string_view implementation() noexcept;
  // Issues the process-wide barrier that the fold of a live ref's kill issues (membarrier
  // PRIVATE_EXPEDITED_RSEQ, or the per-thread implementation's heavy barrier), and nothing else:
  // what a kill costs at least (pgmap-bench's ref/barrier_floor). Changes no ref.
  static void kill_barrier() noexcept;

  bool is_zero() const noexcept;    // atomic mode and count == 0
  bool is_dying() const noexcept {  // killed (DEAD set)
    return (mode_.load(std::memory_order_acquire) & kDead) != 0;
  }
  bool is_percpu() const noexcept { return (mode_.load(std::memory_order_acquire) & kAtomic) == 0; }
  // The exact count in atomic mode; in percpu mode a racy snapshot of the sum (diagnostics only).
  std::int64_t approx_count() const noexcept;

 private:
  static constexpr std::uintptr_t kAtomic = 1;
  static constexpr std::uintptr_t kDead = 2;
  static constexpr std::uintptr_t kPerThread = detail::kPercpuWordPerThread;  // + slot index << 3
  static constexpr std::uintptr_t kModeMask = kAtomic | kDead;
  static constexpr std::uintptr_t kFlagMask = kAtomic | kDead | kPerThread;
  static constexpr unsigned kSlotShift = detail::kPercpuWordSlotShift;

  struct Data;

  // The fast path: adds `delta` (mod 2^64) to this CPU's or this thread's counter and returns true
  // if the ref is in percpu mode; returns false, having changed nothing, otherwise.
  [[gnu::always_inline]] inline bool percpu_add(std::uint64_t delta) noexcept;
  // get_if_percpu / put_if_percpu: the rseq section alone when it is compiled in.
  [[gnu::always_inline]] bool fast_add(std::uint64_t delta) noexcept {
#if PGMAP_PERCPU_RSEQ_INLINE
    // The cast is exact mod 2^64 (put passes 0 - n), as in percpu_add.
    return detail::rseq_percpu_add(&mode_, static_cast<std::int64_t>(delta));
#else
    return percpu_add(delta);
#endif
  }
  // The per-thread fast path. Inline in every build: out of line, the call and return cost about
  // 2 ns per pair on top of the fallback's ~2 ns; inlined, it sits on the cold branch the rseq
  // section leaves by, so the rseq loop is unchanged (same instructions, no spills).
  [[gnu::always_inline]] inline bool thread_add(std::uint64_t delta) noexcept;
  bool thread_add_first(std::uint64_t delta) noexcept;  // registers the thread's counter block
  Errc put_atomic(std::uint64_t n) noexcept;
  Errc get_undo(std::int64_t add) noexcept;                       // the get found a released ref
  Errc put_reached(std::int64_t now, std::int64_t sub) noexcept;  // zero (release) or below

  bool tryget_slow(bool live) noexcept;
  std::int64_t fold_locked(std::uintptr_t m, std::uintptr_t flags) noexcept;
  void go_live_locked() noexcept;
  static bool ensure_thread_counters() noexcept;

  // Hot word (see "The word and the bias"). The cold state lives behind data_, so a user
  // embedding a PercpuRef pays 24 bytes in its hot cache line (Ming Lei's split in the kernel).
  std::atomic<std::uintptr_t> mode_;
  // The shared count: kBias + direct counts while percpu, the exact count in atomic mode. It sits
  // beside the mode word so atomic-mode get/put are inline; the cold state lives behind data_.
  std::atomic<std::int64_t> count_;
  std::unique_ptr<Data> data_;
};

// ---- fast paths -------------------------------------------------------------------------------

inline bool PercpuRef::percpu_add(std::uint64_t delta) noexcept {
#if PGMAP_PERCPU_RSEQ_INLINE
  // The cast is exact mod 2^64 (put passes 0 - n); a constant delta becomes an immediate.
  if (detail::rseq_percpu_add(&mode_, static_cast<std::int64_t>(delta))) [[likely]]
    return true;
#endif
  return thread_add(delta);
}

inline bool PercpuRef::thread_add(std::uint64_t delta) noexcept {
  // The thread's block pointer is tested first, not the word: only threads of a process using
  // the per-thread implementation ever get a block, so for them this is the whole dispatch (the
  // block's own word check decides percpu or atomic), and rseq threads (no block) fall through
  // to the word check below on their way to the shared atomic.
  detail::ThreadAddResult r = detail::thread_slot_add(mode_, delta);
  if (r == detail::ThreadAddResult::no_block) [[unlikely]] {
    // Live per-thread words have only PER_THREAD set; a live rseq word seen by a translation unit
    // without the rseq fast path takes the shared atomic, which is always correct (the bias).
    if ((mode_.load(std::memory_order_relaxed) & kFlagMask) != kPerThread) return false;
    return thread_add_first(delta);
  }
  return r == detail::ThreadAddResult::done;
}

inline Errc PercpuRef::get_many(std::uint64_t n) noexcept {
  if (percpu_add(n)) [[likely]]
    return Errc::ok;
  // Atomic mode. While percpu the count carries kBias, so the check cannot fire by mistake.
  auto add = static_cast<std::int64_t>(n);
  if (count_.fetch_add(add, std::memory_order_acq_rel) > 0) [[likely]]
    return Errc::ok;
  return get_undo(add);
}

inline Errc PercpuRef::put_many(std::uint64_t n) noexcept {
  if (percpu_add(0 - n)) [[likely]]
    return Errc::ok;
  auto sub = static_cast<std::int64_t>(n);
  std::int64_t now = count_.fetch_sub(sub, std::memory_order_acq_rel) - sub;
  if (now > 0) [[likely]]
    return Errc::ok;
  return put_reached(now, sub);
}

inline bool PercpuRef::tryget() noexcept {
  return percpu_add(1) || tryget_slow(false);
}

inline bool PercpuRef::tryget_live() noexcept {
  return percpu_add(1) || tryget_slow(true);
}

}  // namespace pgmap
