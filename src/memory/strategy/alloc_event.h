// Strategy `alloc_event`: the upper layer's allocation (dax direct_access -> DevPagemap::request)
// holds a pagemap reference for its whole use of the range (Dan Williams' proposal); folio
// references cost what they cost under sweep.
//
//   get       as sweep: the add, then the liveness check (no idle folio becomes busy after the
//             kill, even for a caller whose allocation still keeps the pagemap).
//   1 -> 0    as sweep (lean, or the FREEING protocol when there is a free path), so that a
//             teardown that waits on folios (devdax's unbind, DevPagemap::wait_folios_idle) sees
//             a folio idle only once its free path has finished.
//   teardown  kill, then wait for the pagemap reference (the allocations and transient
//             lookups). Folio references are vouched for by the allocations (a protocol
//             guarantee: a holder without an allocation breaks it).
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

struct AllocEventStrategy {
  static constexpr Strategy kind = Strategy::alloc_event;
  static constexpr Teardown teardown{.drain_ref = true, .scan_folios = false};

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
