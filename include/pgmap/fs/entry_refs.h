// Entry references: the pagemap references a file's entry holds for the pages it maps, by the
// pagemap's liveness strategy (DESIGN.md §4; issue 10 §1 "page association per strategy").
//
// The seed patch ("fsdax: Manage pgmap references at entry insertion and deletion") made
// dax_insert_entry take one pagemap reference per page of the entry it inserts and
// dax_delete_mapping_entry drop them, so that a teardown waits on the pagemap's counter for every
// page that a file still maps. Here that is what `per_lookup` and `transition` do; `alloc_event`
// keeps instead the DevPagemap::Allocation that direct_access returned (the inode stores it);
// `sweep` and `none` take nothing (a sweep teardown scans the page refcounts).
//
// Contract: get_entry_refs takes all `pages` references or none (on a pagemap that is being
// killed it fails with Errc::dead and changes nothing); put_entry_refs drops exactly what one
// successful get_entry_refs of the same count took. Neither blocks; both are thread-safe.
//
// When to use: only on the entry insert and delete paths (Inode::associate / disassociate, and
// pgmap-bench's fsdax entry_cycle, which times this very path). A lookup that only needs the
// pagemap for a moment takes a PagemapRef instead.
#pragma once

#include <cstdint>

#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/strategy.h"

namespace pgmap::fs {

// Whether an entry of a pagemap with this strategy holds one pagemap reference per page.
constexpr bool entry_holds_pagemap_refs(Strategy s) noexcept {
  return s == Strategy::per_lookup || s == Strategy::transition;
}

// Takes `pages` pagemap references in one step (DevPagemap::tryget_live_many: one tryget_live and
// one get_many, not `pages` of them). Errc::dead when the pagemap is dying; nothing taken then.
Errc get_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept;

// Drops `pages` references taken by get_entry_refs (one put_many).
void put_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept;

}  // namespace pgmap::fs
