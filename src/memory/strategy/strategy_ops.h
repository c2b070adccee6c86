// The one strategy interface (private to the memory layer): what a folio reference costs at
// 0 -> 1 and 1 -> 0 under each liveness strategy, and what memunmap waits for. It plays the part
// of the kernel's pgmap->ops: each strategy is one file in this directory defining one struct, and
// dispatch() below is the one place that maps a Strategy value to it.
//
// A strategy struct provides:
//
//   static constexpr Strategy kind;
//   static constexpr Teardown teardown;   // what memunmap waits for after the kill
//   static Errc get(DevPagemap&, PageArray&, std::uint64_t head, std::uint32_t refs) noexcept;
//   static Errc put(DevPagemap&, PageArray&, std::uint64_t head, std::uint32_t refs) noexcept;
//
// get/put act on the head entry of a folio; DevPagemap has already resolved the pfn and checked
// that the pagemap is not torn down. They are static and inline: dispatch() is a switch over
// inline functions, so a folio operation costs no indirect call.
//
// A put that drops the last reference must not touch the pagemap once the folio reads idle
// (0): under the strategies whose teardown only scans refcounts, memunmap may return at that
// moment. The shared building blocks are in folio_refcount.h.
//
// Adding a strategy: a new file here with its struct, its value in pgmap/memory/strategy.h, and
// one line in dispatch().
#pragma once

#include "memory/strategy/access.h"

#include "memory/strategy/alloc_event.h"
#include "memory/strategy/none.h"
#include "memory/strategy/per_lookup.h"
#include "memory/strategy/sweep.h"
#include "memory/strategy/transition.h"

namespace pgmap::strategy_impl {

// The one dispatch point: calls fn(S{}) with the strategy struct S of `s`.
template <typename Fn>
inline decltype(auto) dispatch(Strategy s, Fn&& fn) {
  switch (s) {
    case Strategy::none:
      return fn(NoneStrategy{});
    case Strategy::per_lookup:
      return fn(PerLookupStrategy{});
    case Strategy::transition:
      return fn(TransitionStrategy{});
    case Strategy::sweep:
      return fn(SweepStrategy{});
    case Strategy::alloc_event:
      return fn(AllocEventStrategy{});
  }
  __builtin_unreachable();  // Strategy is validated at memremap
}

}  // namespace pgmap::strategy_impl
