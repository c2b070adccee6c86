// Strategy `none`: the bare refcount, nothing vouches for the pagemap. Unsafe on purpose: it is
// the founding bug (memunmap returns while folios are held), kept as the baseline.
//
//   0 -> 1   fetch_add
//   1 -> 0   CAS, then page_free and the wake-up (out of line, when there is one to do)
//   teardown nothing waits
#pragma once

#include "memory/strategy/folio_refcount.h"

namespace pgmap::strategy_impl {

// The 1 -> 0 free path when it has work (page_free, a wake-up).
[[gnu::cold, gnu::noinline]] inline Errc none_free(DevPagemap& pg, PageArray& a,
                                                   std::uint64_t head) noexcept {
  free_after_put(pg, a, head);
  return Errc::ok;
}

struct NoneStrategy {
  static constexpr Strategy kind = Strategy::none;
  static constexpr Teardown teardown{.drain_ref = false, .scan_folios = false};

  [[gnu::always_inline]] static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    return plain_get(pg, a.ref(head), refs);
  }
  [[gnu::always_inline]] static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                         std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = plain_put(pg, a.ref(head), refs, &last);
    if (last && free_path_has_work(pg)) [[unlikely]]
      return none_free(pg, a, head);
    return e;
  }
};

}  // namespace pgmap::strategy_impl
