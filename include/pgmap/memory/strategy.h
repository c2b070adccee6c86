// The liveness strategies of the founding design debate (DESIGN.md §4), chosen per pagemap at
// memremap time. All safe strategies give the same guarantee (I1, Jason's rule): a folio with a
// non-zero refcount proves that its pagemap exists; memunmap returns only after every folio is
// idle; no idle folio becomes busy after the kill. docs/strategies.md compares them.
//
//   none         bare refcount; memunmap waits for nothing. Unsafe on purpose: shows the bug.
//   per_lookup   every folio reference also holds a pagemap percpu_ref reference.
//   transition   a folio's 0 -> 1 takes one pagemap reference, its 1 -> 0 drops it (common code
//                on the page_free path); memunmap waits on that one counter.
//   sweep        bare refcount plus a liveness check after each get; memunmap scans every folio
//                once and waits on each busy one.
//   alloc_event  the upper layer's "allocation" (dax direct_access) takes a pagemap reference
//                that covers its whole use of the range (DevPagemap::request); folio references
//                add only the sweep's liveness check (no idle folio becomes busy after the kill).
//                memunmap waits for the allocations.
#pragma once

#include <array>
#include <optional>
#include <string_view>

namespace pgmap {

enum class Strategy { none, per_lookup, transition, sweep, alloc_event };

inline constexpr std::array<Strategy, 5> kAllStrategies = {Strategy::none, Strategy::per_lookup,
                                                           Strategy::transition, Strategy::sweep,
                                                           Strategy::alloc_event};
inline constexpr std::array<Strategy, 4> kSafeStrategies = {
    Strategy::per_lookup, Strategy::transition, Strategy::sweep, Strategy::alloc_event};

constexpr std::string_view strategy_name(Strategy s) {
  switch (s) {
    case Strategy::none:
      return "none";
    case Strategy::per_lookup:
      return "per_lookup";
    case Strategy::transition:
      return "transition";
    case Strategy::sweep:
      return "sweep";
    case Strategy::alloc_event:
      return "alloc_event";
  }
  return "?";
}

constexpr std::optional<Strategy> parse_strategy(std::string_view name) {
  for (Strategy s : kAllStrategies) {
    if (strategy_name(s) == name) return s;
  }
  return std::nullopt;
}

// Types of dev_pagemap (include/linux/memremap.h): FS_DAX (host memory under a DAX filesystem;
// waiters are woken whenever a folio goes idle), GENERIC (device-dax), PRIVATE (device memory not
// addressable by the CPU; page_free is required).
enum class PagemapType { fs_dax, generic, private_mem };

constexpr std::string_view pagemap_type_name(PagemapType t) {
  switch (t) {
    case PagemapType::fs_dax:
      return "fs_dax";
    case PagemapType::generic:
      return "generic";
    case PagemapType::private_mem:
      return "private";
  }
  return "?";
}

}  // namespace pgmap
