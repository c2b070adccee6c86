// Strategy `transition`: a folio's busy period holds one pagemap reference, taken at 0 -> 1 and
// dropped at 1 -> 0, in common code (Dan Williams' "request" / page_free pairing).
//
//   busy get  CAS old -> old + refs (the busy period's reference covers it)
//   0 -> 1    tryget_live, then fetch_add: the reference is taken before the folio can be seen
//             busy. A loser of a concurrent 0 -> 1 drops its extra reference. Errc::dead once
//             killed.
//   1 -> 0    CAS, page_free and the wake-up, then put: the pagemap may be gone after it.
//   teardown  kill, then wait for the pagemap reference (= the number of busy folios).
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

struct TransitionStrategy {
  static constexpr Strategy kind = Strategy::transition;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = false};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    std::atomic<std::uint32_t>& r = a.ref(head);
    std::uint32_t old = r.load(std::memory_order_relaxed);
    while (old != 0 && old <= PageArray::kMaxRef - refs) {
      if (r.compare_exchange_weak(old, old + refs, std::memory_order_acq_rel,
                                  std::memory_order_relaxed)) {
        return Errc::ok;
      }
    }
    if (old != 0) [[unlikely]]
      return refused_get(pg);
    PercpuRef& ref = Access::ref(pg);
    if (!ref.tryget_live()) [[unlikely]]
      return Access::torn_down(pg) ? Access::late(pg) : Errc::dead;
    old = r.fetch_add(refs, std::memory_order_acq_rel);
    // Lost the race to another 0 -> 1: theirs covers the folio. Our get succeeded, so this put
    // cannot underflow.
    if (old != 0) (void)ref.put();
    if (old > PageArray::kMaxRef - refs || Access::torn_down(pg)) [[unlikely]] {
      r.fetch_sub(refs, std::memory_order_relaxed);
      if (old == 0) (void)ref.put();
      return Access::late(pg);
    }
    return Errc::ok;
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = plain_put(pg, a.ref(head), refs, &last);
    if (last) {
      free_after_put(pg, a, head);
      // The busy period's reference, taken at 0 -> 1 (an underflow is reported by the ref).
      (void)Access::ref(pg).put();
    }
    return e;
  }
};

}  // namespace pgmap::strategy_impl
