// Strategy `per_lookup`: every folio reference also holds a pagemap reference (the historic
// get_dev_pagemap() per GUP).
//
//   any get  tryget_live (+ get_many for refs > 1), then fetch_add. Errc::dead once killed.
//   any put  CAS (page_free and the wake-up at 0, the pagemap reference still held), then
//            put_many: the pagemap may be gone after it.
//   teardown kill, then wait for the pagemap reference (= every folio reference) to drain.
//
// Cost: as transition.h, a fast path with PercpuRef's percpu fast path inline (one rseq add of
// `refs` on each side) and every other case out of line behind a tail call.
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

// The whole get, every case (the fast path's fallback when the ref is not in percpu mode).
[[gnu::cold, gnu::noinline]] inline Errc per_lookup_get_slow(DevPagemap& pg, PageArray& a,
                                                             std::uint64_t head,
                                                             std::uint32_t refs) noexcept {
  PercpuRef& ref = Access::ref(pg);
  if (!ref.tryget_live()) return Access::torn_down(pg) ? Access::late(pg) : Errc::dead;
  if (refs > 1) (void)ref.get_many(refs - 1);  // we hold one: cannot fail
  Errc e = plain_get(pg, a.ref(head), refs);
  if (e != Errc::ok) (void)ref.put_many(refs);  // undoes our own gets
  return e;
}

// The fast path's fetch_add found an overflow or a teardown: undo it and our pagemap references.
[[gnu::cold, gnu::noinline]] inline Errc per_lookup_get_undo(DevPagemap& pg, PageArray& a,
                                                             std::uint64_t head,
                                                             std::uint32_t refs) noexcept {
  a.ref(head).fetch_sub(refs, std::memory_order_relaxed);
  (void)Access::ref(pg).put_many(refs);  // undoes our own gets
  return Access::late(pg);
}

// The 1 -> 0 free path with work (page_free, a wake-up), then the pagemap references.
[[gnu::cold, gnu::noinline]] inline Errc per_lookup_put_free(DevPagemap& pg, PageArray& a,
                                                             std::uint64_t head,
                                                             std::uint32_t refs) noexcept {
  free_after_put(pg, a, head);
  (void)Access::ref(pg).put_many(refs);  // an underflow is reported by the ref
  return Errc::ok;
}

struct PerLookupStrategy {
  static constexpr Strategy kind = Strategy::per_lookup;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = false};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    // In percpu mode, tryget_live + get_many(refs - 1) is one add of refs.
    if (!Access::ref(pg).get_if_percpu(refs)) [[unlikely]]
      return per_lookup_get_slow(pg, a, head, refs);
    return get_held(pg, a, head, refs);
  }
  // The folio's part of the get, with its `refs` pagemap references already held (they are
  // dropped again on failure). folio_get<PerLookupStrategy> takes them before it locates the
  // folio (dev_pagemap.cc).
  [[gnu::always_inline]] static Errc get_held(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                              std::uint32_t refs) noexcept {
    const std::uint32_t old = a.ref(head).fetch_add(refs, std::memory_order_acq_rel);
    // The second look at the torn-down flag catches a teardown that raced the add.
    if (old > PageArray::kMaxRef - refs || Access::torn_down(pg)) [[unlikely]]
      return per_lookup_get_undo(pg, a, head, refs);
    return Errc::ok;
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = plain_put(pg, a.ref(head), refs, &last);
    if (e != Errc::ok) [[unlikely]]
      return e;
    // The 1 -> 0 put is the fall-through path (as in transition.h): a busy put skips the check
    // with one taken branch.
    if (last) [[likely]] {
      if (free_path_has_work(pg)) [[unlikely]]
        return per_lookup_put_free(pg, a, head, refs);
    }
    // Each dropped folio reference carried a pagemap reference.
    if (!Access::ref(pg).put_if_percpu(refs)) [[unlikely]]
      return put_pagemap_refs(pg, refs);
    return Errc::ok;
  }
};

}  // namespace pgmap::strategy_impl
