// The refcount operations the strategies are built from (private; see strategy_ops.h).
//
// Values of a head entry's refcount: 0 idle; 1..PageArray::kMaxRef references; kFreeingRef while
// the last put of a folio under sweep / alloc_event runs the free path (the folio is no longer
// referenced but not idle yet); anything else above kMaxRef is retired (quarantined) metadata.
//
// plain_get / plain_put: one atomic each, the free path runs after the refcount reached 0
// (strategies whose pagemap reference keeps the pagemap alive across it, and `none`).
// checked_get / freeing_put: the sweep protocol (docs/strategies.md, "sweep: the FREEING
// protocol"): a get re-checks liveness after its add; the last put goes 1 -> FREEING, runs the
// free path, then stores 0 and touches nothing of the pagemap after that store.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

#include "memory/strategy/access.h"
#include "pgmap/core/error.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::strategy_impl {

inline constexpr std::uint32_t kFreeingRef = 0xFEEE0000u;
static_assert(kFreeingRef > PageArray::kMaxRef && kFreeingRef != PageArray::kRetiredRef);

// A get whose refcount was not a reference count (retired, or about to overflow), or FREEING on
// torn-down metadata.
[[gnu::cold, gnu::noinline]] inline Errc refused_get(DevPagemap& pg) noexcept {
  return Access::late(pg);
}

// A get that found the folio FREEING: nobody holds it and its last put is running the free path
// (page_free must not block, so this ends promptly). A holder of a pagemap reference may get an
// idle folio (I1), so this is not an error: wait until the putter's P4 store leaves FREEING and
// let the caller retry its CAS on whatever it finds then (0 for an idle folio).
[[gnu::cold, gnu::noinline]] inline std::uint32_t wait_freeing_done(
    const std::atomic<std::uint32_t>& r) noexcept {
  for (unsigned spins = 0;; ++spins) {
    const std::uint32_t v = r.load(std::memory_order_acquire);
    if (v != kFreeingRef) return v;
    if (spins >= 64) std::this_thread::yield();  // the putter may be preempted in page_free
  }
}

// A put that found no reference to drop (underflow), or metadata that is not live.
[[gnu::cold, gnu::noinline]] inline Errc refused_put(DevPagemap& pg, std::uint32_t old) noexcept {
  if (Access::torn_down(pg) || (old > PageArray::kMaxRef && old != kFreeingRef)) {
    return Access::late(pg);
  }
  report_misuse(Errc::underflow, "DevPagemap::put_folio below zero");
  return Errc::underflow;
}

[[gnu::always_inline]] inline Errc plain_get(DevPagemap& pg, std::atomic<std::uint32_t>& r,
                                             std::uint32_t refs) noexcept {
  const std::uint32_t old = r.fetch_add(refs, std::memory_order_acq_rel);
  // The second look at the torn-down flag catches a teardown that raced the add (the first is in
  // DevPagemap before the metadata was touched).
  if (old > PageArray::kMaxRef - refs || Access::torn_down(pg)) [[unlikely]] {
    r.fetch_sub(refs, std::memory_order_relaxed);
    return Access::late(pg);
  }
  return Errc::ok;
}

// Drops `refs`; returns ok and sets *last when the count reached 0 (the caller runs the free
// path). Nothing changes on error.
[[gnu::always_inline]] inline Errc plain_put(DevPagemap& pg, std::atomic<std::uint32_t>& r,
                                             std::uint32_t refs, bool* last) noexcept {
  std::uint32_t old = r.load(std::memory_order_relaxed);
  do {
    if (old < refs || old > PageArray::kMaxRef) [[unlikely]]
      return refused_put(pg, old);
  } while (!r.compare_exchange_weak(old, old - refs, std::memory_order_seq_cst,
                                    std::memory_order_relaxed));
  *last = old == refs;
  return Errc::ok;
}

// The free path after plain_put reached 0: page_free, then wake waiters. The caller's pagemap
// reference (or, under `none`, nothing) keeps the pagemap alive across it.
[[gnu::always_inline]] inline void free_after_put(DevPagemap& pg, PageArray& a,
                                                  std::uint64_t head) noexcept {
  Access::settle_split(a, head, 0);
  Access::page_free(pg, a, head);
  if (Access::wakes_on_idle(pg)) wake_up_var(&a.ref(head));
}

// Whether free_after_put has anything to do: a page_free, or waiters to wake (FS_DAX, or the
// pagemap killed). A hot put tests this inline and leaves the calls to an out-of-line function,
// so that a 1 -> 0 put with nothing to do makes no call that is not a tail call and saves no
// registers.
[[gnu::always_inline]] inline bool free_path_has_work(const DevPagemap& pg) noexcept {
  // ops.page_free, FS_DAX, or killed: from the two bytes of the pagemap's hot line.
  return Access::has_free_work(pg) || (Access::life(pg) & Access::kKilled) != 0;
}

// The pagemap reference's own slow paths (atomic mode, or the per-thread implementation's first
// use), out of line for the strategies whose hot path tries PercpuRef's percpu fast path inline.
[[gnu::cold, gnu::noinline]] inline Errc put_pagemap_refs(DevPagemap& pg,
                                                          std::uint32_t refs) noexcept {
  (void)Access::ref(pg).put_many(refs);  // an underflow is reported by the ref itself
  return Errc::ok;
}

// The last put of the FREEING protocol. Steps (docs/strategies.md names them):
//   P1  CAS refcount refs -> kFreeingRef   (in freeing_put; a put of fewer refs is a plain CAS)
//   P2  wake = wakes_on_idle()             (read before P4: the pagemap may be gone after it)
//   P3  page_free                          (the pagemap exists: the scan waits while FREEING)
//   P4  store refcount 0 (release)         (the folio is idle; memunmap may now return)
//   P5  if wake: wake_up_var(&refcount)    (the key is only an address: nothing is dereferenced)
// freeing_to_idle is P2..P5. Only a pagemap with a free path (Access::has_free_work: a
// page_free, or FS_DAX with its wake-up) enters FREEING, so there is always a call to make:
// out of line, reached by a tail call from the puts (a pagemap without one takes the lean
// protocol below). Returns ok: a put that reached FREEING has succeeded.
[[gnu::noinline]] inline Errc freeing_to_idle(DevPagemap& pg, PageArray& a,
                                              std::uint64_t head) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  const bool wake = Access::wakes_on_idle(pg);  // P2
  Access::settle_split(a, head, kFreeingRef);   // P3 (a split the owner left owed)
  Access::page_free(pg, a, head);               // P3
  PGMAP_YIELD_POINT("put.freeing");
  // P3b: the busy period is paid for; nobody holds the folio, so nobody sets the flag meanwhile.
  std::atomic<std::uint8_t>& f = a.flags(head);
  if ((f.load(std::memory_order_relaxed) & kPageFreeOwed) != 0) [[unlikely]]
    f.fetch_and(static_cast<std::uint8_t>(~kPageFreeOwed), std::memory_order_relaxed);
  r.store(0, std::memory_order_release);  // P4 (also publishes P3b)
  if (wake) wake_up_var(&r);              // P5
  return Errc::ok;
}

// P1a: a held reference is dropped and the folio stays busy. Whoever ends this busy period may be
// a get that backs out (back_out), which cannot tell from the count that a reference came and
// went meanwhile (an ABA: 0 -> 1 by the backing-out get, 1 -> 2 -> 1 by a successful get and its
// put): the flag tells it. Set before the CAS that drops the reference, so whoever reads the
// count that CAS wrote (acquire) sees it. Costs a put that is not the last one a load (and, once
// per busy period, an RMW) of the cold flags line; the last put of a busy period reads it.
[[gnu::cold, gnu::noinline]] inline void mark_page_free_owed(PageArray& a,
                                                             std::uint64_t head) noexcept {
  a.flags(head).fetch_or(kPageFreeOwed, std::memory_order_relaxed);
}

// A put of a held reference under the FREEING protocol, every case: a put that leaves the folio
// busy (P1a), the last put (P1..P5), a CAS lost to a racing get or put, refused values.
[[gnu::noinline]] inline Errc freeing_put_slow(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  std::uint32_t next = 0;
  do {
    if (old < refs || old > PageArray::kMaxRef) [[unlikely]]
      return refused_put(pg, old);
    if (old == refs) {
      next = kFreeingRef;
    } else {
      next = old - refs;
      if ((a.flags(head).load(std::memory_order_relaxed) & kPageFreeOwed) == 0) [[unlikely]]
        mark_page_free_owed(a, head);  // P1a
    }
  } while (!r.compare_exchange_weak(old, next, std::memory_order_seq_cst,  // P1
                                    std::memory_order_relaxed));
  if (next == kFreeingRef) return freeing_to_idle(pg, a, head);
  return Errc::ok;
}

// The put, with the last reference's case inline: one CAS (P1), then a tail call to the free
// path. Straight-line on purpose: written as one loop with both cases, GCC moved the whole
// FREEING path to the cold section and saved two registers on every put
// (folio_put<SweepStrategy> pushed rbx and rbp). Anything else is the slow function, reached by
// a tail call.
[[gnu::always_inline]] inline Errc freeing_put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  if (old != refs || !r.compare_exchange_strong(old, kFreeingRef, std::memory_order_seq_cst,
                                                std::memory_order_relaxed)) [[unlikely]]
    return freeing_put_slow(pg, a, head, refs);
  return freeing_to_idle(pg, a, head);
}

// A checked_get that found the pagemap killed (or torn down) after its add backs out: a put of a
// reference that no successful get took (B1..B3). It ends the busy period if nothing else holds
// the folio; that busy period owes page_free only if a successful get's reference came and went
// in it (kPageFreeOwed, P1a; a successful get still holding means this is not the last put). So:
//   B1  load the count (acquire) and, if it is our own add only, the owed flag;
//   B2  CAS: our add only -> FREEING if owed (then P2..P5: page_free), else -> 0; otherwise
//       old -> old - refs (the folio stays busy; the flag is left as it is);
//   B3  if it went to 0: wake a scan that may have seen the transient add (address only).
// No successful get can join meanwhile (the kill is visible: every later get backs out too), and
// other backing-out gets never set the flag, so the value read at B1 decides correctly.
[[gnu::cold, gnu::noinline]] inline Errc back_out(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                                  std::uint32_t refs, std::uint8_t life) noexcept {
  // Decided before letting go: after it the pagemap may be gone.
  const Errc result = (life & Access::kTornDown) != 0 ? Access::late(pg) : Errc::dead;
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_acquire);  // B1
  std::uint32_t next = 0;
  do {
    // Our own add is in the count: no underflow, and FREEING / retired only if torn down
    // under us (quarantined metadata): nothing to drop then.
    if (old < refs || old > PageArray::kMaxRef) [[unlikely]]
      return result;
    if (old == refs) {
      // Nothing is ever owed on a pagemap without FREEING (its puts never set the flag).
      const bool owed = Access::has_free_work(pg) &&
                        (a.flags(head).load(std::memory_order_relaxed) & kPageFreeOwed) != 0;
      next = owed ? kFreeingRef : 0;
    } else {
      next = old - refs;
    }
  } while (!r.compare_exchange_weak(old, next, std::memory_order_seq_cst,  // B2
                                    std::memory_order_acquire));
  PGMAP_YIELD_POINT("sweep.after_back_out");
  if (next == kFreeingRef) {
    (void)freeing_to_idle(pg, a, head);  // P2..P5 for the busy period's last successful get (ok)
  } else if (next == 0) {
    wake_up_var(&r);  // B3
  }
  return result;
}

// Sweep's get: CAS (never on a FREEING or retired value: on FREEING it waits for the free path to
// end and retries, G0), then the liveness check that pairs with memunmap's kill-then-scan
// (Dekker): either this get sees the kill and backs out, or the scan sees the reference and waits
// for it. checked_get_slow is the whole protocol; checked_get is its common case inline (a
// reference count below kMaxRef, the pagemap live), with no call that is not a tail call, so it
// saves no registers; anything else goes to the slow function from the start.
[[gnu::cold, gnu::noinline]] inline Errc checked_get_slow(DevPagemap& pg, PageArray& a,
                                                          std::uint64_t head,
                                                          std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  for (;;) {
    if (old > PageArray::kMaxRef - refs) {
      if (old != kFreeingRef || Access::torn_down(pg)) return refused_get(pg);
      old = wait_freeing_done(r);  // G0: a racing last put is freeing the folio
      continue;
    }
    if (r.compare_exchange_weak(old, old + refs, std::memory_order_seq_cst,  // G1
                                std::memory_order_relaxed)) {
      break;
    }
  }
  PGMAP_YIELD_POINT("sweep.get_after_add");
  const std::uint8_t life = Access::life(pg);  // G2
  if (life != 0) return back_out(pg, a, head, refs, life);
  return Errc::ok;
}

[[gnu::always_inline]] inline Errc checked_get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  do {
    if (old > PageArray::kMaxRef - refs) [[unlikely]]
      return checked_get_slow(pg, a, head, refs);  // FREEING (G0), retired, or overflow
  } while (!r.compare_exchange_weak(old, old + refs, std::memory_order_seq_cst,  // G1
                                    std::memory_order_relaxed));
  PGMAP_YIELD_POINT("sweep.get_after_add");
  const std::uint8_t life = Access::life(pg);  // G2
  if (life != 0) [[unlikely]]
    return back_out(pg, a, head, refs, life);
  return Errc::ok;
}

// ---- The lean protocol: sweep / alloc_event on a pagemap without FREEING ----------------------
// (docs/strategies.md, "sweep without a free path"). With no page_free and not FS_DAX, a last put
// has nothing to do between "no longer referenced" and "idle" but the wake-up, and the wake-up
// needs only the refcount's address. So FREEING is never entered, and a folio operation costs what
// it costs under `none` plus L2's load:
//   L0  get: fetch_add (no FREEING value to stay off), then G2's life_ load as in checked_get;
//       a value that was not a reference count (retired metadata, overflow) is undone.
//   L1  last put: CAS refs -> 0 (seq_cst). After it the pagemap may be gone.
//   L2  load the process-wide killed count (seq_cst); if non-zero, wake (address only).
// L1/L2 pair with the kill, which raises the count (seq_cst) before the scan's fence and loads:
// either L2 sees the kill and wakes, or the scan reads 0. Back-outs (B1..B3) run as before and
// never owe a page_free here.

// L2's wake-up, out of line: some pagemap is killed, so a scan or an unbind may be waiting on this
// folio. The key is only an address: nothing is dereferenced.
[[gnu::cold, gnu::noinline]] inline Errc wake_idle_folio(std::atomic<std::uint32_t>& r) noexcept {
  wake_up_var(&r);
  return Errc::ok;
}

// L0's unusual outcomes: a value that was not a count (undo; nothing else changed), or the kill.
[[gnu::cold, gnu::noinline]] inline Errc lean_get_fixup(DevPagemap& pg, PageArray& a,
                                                        std::uint64_t head, std::uint32_t refs,
                                                        std::uint32_t old,
                                                        std::uint8_t life) noexcept {
  if (old > PageArray::kMaxRef - refs) {
    a.ref(head).fetch_sub(refs, std::memory_order_relaxed);
    return refused_get(pg);
  }
  return back_out(pg, a, head, refs, life);
}

[[gnu::always_inline]] inline Errc lean_get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                            std::uint32_t refs) noexcept {
  const std::uint32_t old = a.ref(head).fetch_add(refs, std::memory_order_seq_cst);  // L0
  PGMAP_YIELD_POINT("sweep.get_after_add");
  const std::uint8_t life = Access::life(pg);  // G2
  if (old > PageArray::kMaxRef - refs || life != 0) [[unlikely]]
    return lean_get_fixup(pg, a, head, refs, old, life);
  return Errc::ok;
}

// Any put, inline: plain_put's CAS loop is L1 for the last one (seq_cst); a put that leaves the
// folio busy has nothing else to do (nothing is owed without a page_free).
[[gnu::always_inline]] inline Errc lean_put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                            std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  bool last = false;
  const Errc e = plain_put(pg, r, refs, &last);  // L1
  // After L1 reached 0 the pagemap may be gone: the decision reads only the process-wide count.
  // One branch, not two: the count is loaded for every put (a read-mostly line). Written as a
  // branch on `last` around the load, GCC made the last put jump out to the load and back, and
  // the page cycle measured 1.14-1.20x `none` against 1.09-1.11x this way (pgmap-bench hotpath,
  // interleaved). The load itself is what remains: hoisted above the CAS (which would break the
  // pairing with the kill) the cycle measured 1.00-1.05x.
  if ((static_cast<unsigned>(last) & static_cast<unsigned>(Access::any_pagemap_killed())) != 0)
      [[unlikely]]
    return wake_idle_folio(r);  // L2
  return e;
}

// The FREEING protocol's get and put as functions of their own: on the strategies' hot path a
// pagemap that uses FREEING costs one jump more, and the lean path carries none of its code.
[[gnu::noinline]] inline Errc freeing_get_call(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  return checked_get(pg, a, head, refs);
}
[[gnu::noinline]] inline Errc freeing_put_call(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  return freeing_put(pg, a, head, refs);
}

// The get and put of the strategies whose folios a teardown may wait on one by one (sweep's scan;
// alloc_event's unbind and wait_folios_idle): lean when the pagemap allows it, FREEING otherwise.
[[gnu::always_inline]] inline Errc checked_folio_get(DevPagemap& pg, PageArray& a,
                                                     std::uint64_t head,
                                                     std::uint32_t refs) noexcept {
  if (Access::has_free_work(pg)) [[unlikely]]
    return freeing_get_call(pg, a, head, refs);
  return lean_get(pg, a, head, refs);
}
[[gnu::always_inline]] inline Errc checked_folio_put(DevPagemap& pg, PageArray& a,
                                                     std::uint64_t head,
                                                     std::uint32_t refs) noexcept {
  if (Access::has_free_work(pg)) [[unlikely]]
    return freeing_put_call(pg, a, head, refs);
  return lean_put(pg, a, head, refs);
}

}  // namespace pgmap::strategy_impl
