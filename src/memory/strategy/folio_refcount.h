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
  Access::page_free(pg, a, head);
  if (Access::wakes_on_idle(pg)) wake_up_var(&a.ref(head));
}

// The last put of the FREEING protocol. Steps (docs/strategies.md names them):
//   P1  CAS refcount refs -> kFreeingRef   (in freeing_put; a put of fewer refs is a plain CAS)
//   P2  wake = wakes_on_idle()             (read before P4: the pagemap may be gone after it)
//   P3  page_free                          (the pagemap exists: the scan waits while FREEING)
//   P4  store refcount 0 (release)         (the folio is idle; memunmap may now return)
//   P5  if wake: wake_up_var(&refcount)    (the key is only an address: nothing is dereferenced)
[[gnu::always_inline]] inline void freeing_to_idle(DevPagemap& pg, PageArray& a,
                                                   std::uint64_t head) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  const bool wake = Access::wakes_on_idle(pg);  // P2
  Access::page_free(pg, a, head);               // P3
  PGMAP_YIELD_POINT("put.freeing");
  r.store(0, std::memory_order_release);  // P4
  if (wake) wake_up_var(&r);              // P5
}

[[gnu::always_inline]] inline Errc freeing_put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  std::uint32_t next = 0;
  do {
    if (old < refs || old > PageArray::kMaxRef) [[unlikely]]
      return refused_put(pg, old);
    next = old == refs ? kFreeingRef : old - refs;
  } while (!r.compare_exchange_weak(old, next, std::memory_order_seq_cst,  // P1
                                    std::memory_order_relaxed));
  if (next == kFreeingRef) freeing_to_idle(pg, a, head);
  return Errc::ok;
}

// A checked_get that found the pagemap killed (or torn down) after its add backs out. If the
// folio was idle before the add, this was no busy period: straight back to 0 (no page_free) and
// wake a scan that may have seen the transient reference. Otherwise it is an ordinary put, which
// may be the last of the folio's busy period.
[[gnu::cold, gnu::noinline]] inline Errc back_out(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                                  std::uint32_t refs, std::uint32_t old,
                                                  std::uint8_t life) noexcept {
  // Decided before letting go: after it the pagemap may be gone.
  const Errc result = (life & Access::kTornDown) != 0 ? Access::late(pg) : Errc::dead;
  std::atomic<std::uint32_t>& r = a.ref(head);
  if (old != 0) {
    (void)freeing_put(pg, a, head, refs);  // drops our own add: cannot underflow
    return result;
  }
  if (r.fetch_sub(refs, std::memory_order_seq_cst) == refs) wake_up_var(&r);
  return result;
}

// Sweep's get: CAS (never on a FREEING or retired value: on FREEING it waits for the free path to
// end and retries, G0), then the liveness check that pairs with
// memunmap's kill-then-scan (Dekker): either this get sees the kill and backs out, or the scan
// sees the reference and waits for it.
[[gnu::always_inline]] inline Errc checked_get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                               std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  for (;;) {
    if (old > PageArray::kMaxRef - refs) [[unlikely]] {
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
  if (life != 0) [[unlikely]]
    return back_out(pg, a, head, refs, old, life);
  return Errc::ok;
}

}  // namespace pgmap::strategy_impl
