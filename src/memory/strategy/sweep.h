// Strategy `sweep`: nothing on the hot path but the refcount and one liveness load; memunmap
// scans every folio once and waits for each busy one (Jason Gunthorpe's proposal).
//
//   get       fetch_add (lean) or CAS old -> old + refs (FREEING: refused on FREEING or retired
//             values), then load the pagemap's life word; if killed, back out (Errc::dead).
//             Dekker-paired with the kill-then-scan of memunmap.
//   1 -> 0    lean (no page_free, not FS_DAX): CAS 1 -> 0, then wake (address only) if any
//             pagemap is killed. Otherwise the FREEING protocol: CAS 1 -> FREEING, page_free,
//             store 0, wake. The pagemap is not touched after the refcount reads 0.
//   teardown  kill (the life word), wait for transient pagemap references (get_dev_pagemap),
//             then scan the hot refcount array and wait until every entry reads 0 (FREEING
//             counts as busy).
// docs/strategies.md gives the protocol step by step and why it is safe.
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

struct SweepStrategy {
  static constexpr Strategy kind = Strategy::sweep;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = true};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    return checked_folio_get(pg, a, head, refs);
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    return checked_folio_put(pg, a, head, refs);
  }
};

}  // namespace pgmap::strategy_impl
