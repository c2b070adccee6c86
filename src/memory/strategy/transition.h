// Strategy `transition`: a folio's busy period holds one pagemap reference, taken at 0 -> 1 and
// dropped at 1 -> 0, in common code (Dan Williams' "request" / page_free pairing).
//
//   busy get  CAS old -> old + refs (the busy period's reference covers it)
//   0 -> 1    tryget_live, then fetch_add: the reference is taken before the folio can be seen
//             busy. A loser of a concurrent 0 -> 1 drops its extra reference. Errc::dead once
//             killed.
//   1 -> 0    CAS, page_free and the wake-up, then put: the pagemap may be gone after it.
//   teardown  kill, then wait for the pagemap reference (= the number of busy folios).
//
// Cost: get and put are written as a fast path with PercpuRef's percpu fast path inline
// (get_if_percpu / put_if_percpu: one rseq add) and every other case (atomic mode, a lost 0 -> 1
// race, overflow, teardown, a free path with work) in cold out-of-line functions reached by a
// tail call, so the page cycle's functions save no registers and make no call. The 0 -> 1 get and
// the 1 -> 0 put, the cases that pay the rseq section, are the fall-through paths; a busy get or
// put (one CAS, no section) takes one branch more.
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

// The whole get, every case (the fast path's fallback).
[[gnu::cold, gnu::noinline]] inline Errc transition_get_slow(DevPagemap& pg, PageArray& a,
                                                             std::uint64_t head,
                                                             std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a.ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  while (old != 0 && old <= PageArray::kMaxRef - refs) {
    if (r.compare_exchange_weak(old, old + refs, std::memory_order_acq_rel,
                                std::memory_order_relaxed)) {
      return Errc::ok;
    }
  }
  if (old != 0) return refused_get(pg);
  PercpuRef& ref = Access::ref(pg);
  if (!ref.tryget_live()) return Access::torn_down(pg) ? Access::late(pg) : Errc::dead;
  old = r.fetch_add(refs, std::memory_order_acq_rel);
  // Lost the race to another 0 -> 1: theirs covers the folio. Our get succeeded, so this put
  // cannot underflow.
  if (old != 0) (void)ref.put();
  if (old > PageArray::kMaxRef - refs || Access::torn_down(pg)) {
    r.fetch_sub(refs, std::memory_order_relaxed);
    if (old == 0) (void)ref.put();
    return Access::late(pg);
  }
  return Errc::ok;
}

// After the fast path's 0 -> 1 fetch_add (its pagemap reference taken) found something else than
// an idle folio on a live pagemap: a lost race (drop the extra reference), an overflow or a
// teardown (undo both).
[[gnu::cold, gnu::noinline]] inline Errc transition_get_fixup(DevPagemap& pg, PageArray& a,
                                                              std::uint64_t head,
                                                              std::uint32_t refs,
                                                              std::uint32_t old) noexcept {
  PercpuRef& ref = Access::ref(pg);
  if (old != 0) (void)ref.put();  // our get succeeded: cannot underflow
  if (old > PageArray::kMaxRef - refs || Access::torn_down(pg)) {
    a.ref(head).fetch_sub(refs, std::memory_order_relaxed);
    if (old == 0) (void)ref.put();
    return Access::late(pg);
  }
  return Errc::ok;
}

// The 1 -> 0 free path with work (page_free, a wake-up), then the busy period's reference.
[[gnu::cold, gnu::noinline]] inline Errc transition_put_free(DevPagemap& pg, PageArray& a,
                                                             std::uint64_t head) noexcept {
  free_after_put(pg, a, head);
  (void)Access::ref(pg).put();  // an underflow is reported by the ref
  return Errc::ok;
}

struct TransitionStrategy {
  static constexpr Strategy kind = Strategy::transition;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = false};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    std::atomic<std::uint32_t>& r = a.ref(head);
    std::uint32_t old = r.load(std::memory_order_relaxed);
    if (old == 0) [[likely]] {
      // 0 -> 1: the busy period's pagemap reference first (percpu mode: one rseq add).
      if (!Access::ref(pg).get_if_percpu(1)) [[unlikely]]
        return transition_get_slow(pg, a, head, refs);
      old = r.fetch_add(refs, std::memory_order_acq_rel);
      if (old != 0 || refs > PageArray::kMaxRef || Access::torn_down(pg)) [[unlikely]]
        return transition_get_fixup(pg, a, head, refs, old);
      return Errc::ok;
    }
    while (old != 0 && old <= PageArray::kMaxRef - refs) {
      if (r.compare_exchange_weak(old, old + refs, std::memory_order_acq_rel,
                                  std::memory_order_relaxed)) {
        return Errc::ok;
      }
    }
    return transition_get_slow(pg, a, head, refs);  // went idle meanwhile, or refused
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = plain_put(pg, a.ref(head), refs, &last);
    if (!last) [[unlikely]]
      return e;
    if (free_path_has_work(pg)) [[unlikely]]
      return transition_put_free(pg, a, head);
    // The busy period's reference, taken at 0 -> 1.
    if (!Access::ref(pg).put_if_percpu(1)) [[unlikely]]
      return put_pagemap_refs(pg, 1);
    return Errc::ok;
  }
};

}  // namespace pgmap::strategy_impl
