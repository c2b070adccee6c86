// Strategy `per_lookup`: every folio reference also holds a pagemap reference (the historic
// get_dev_pagemap() per GUP).
//
//   any get  tryget_live (+ get_many for refs > 1), then fetch_add. Errc::dead once killed.
//   any put  CAS (page_free and the wake-up at 0, the pagemap reference still held), then
//            put_many: the pagemap may be gone after it.
//   teardown kill, then wait for the pagemap reference (= every folio reference) to drain.
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

struct PerLookupStrategy {
  static constexpr Strategy kind = Strategy::per_lookup;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = false};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    PercpuRef& ref = Access::ref(pg);
    if (!ref.tryget_live()) [[unlikely]]
      return Access::torn_down(pg) ? Access::late(pg) : Errc::dead;
    if (refs > 1) [[unlikely]]
      (void)ref.get_many(refs - 1);  // we hold one: cannot fail
    Errc e = plain_get(pg, a.ref(head), refs);
    if (e != Errc::ok) [[unlikely]]
      (void)ref.put_many(refs);  // undoes our own gets
    return e;
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = plain_put(pg, a.ref(head), refs, &last);
    if (e != Errc::ok) [[unlikely]]
      return e;
    if (last) free_after_put(pg, a, head);
    // Each dropped folio reference carried a pagemap reference; an underflow is reported by the
    // ref itself.
    (void)Access::ref(pg).put_many(refs);
    return Errc::ok;
  }
};

}  // namespace pgmap::strategy_impl
