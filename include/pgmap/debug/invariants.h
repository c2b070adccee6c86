// The invariant checker: verifies the page-state invariants of kernel-semantics.md §4 over a set
// of pagemaps, address spaces and pages held outside page tables, and returns every violation it
// finds as a typed report (nothing is fixed, nothing is changed).
//
// Checks (Check enumerators):
//   refcount_covers_users   per folio: refcount >= mapcount + pins (a small folio's pins are in
//                           its refcount as kPinBias; a large one's in the exact pincount);
//                           mapcount and pincount >= 0; an idle folio is unmapped and unpinned;
//                           tail entries have refcount 0; no live refcount reads as retired.
//   pfn_in_live_pagemap     every mapped or held pfn lies in a pagemap of the universe that is
//                           not dead, whose metadata is not retired, and which the pfn -> pagemap
//                           registry resolves the pfn to (I1: a reference proves the pagemap).
//   pagemaps_disjoint       no two pagemaps that are not dead overlap, and each is the one
//                           published in the registry for its ranges.
//   folio_order_matches_entry  a PMD entry maps a 2 MiB-aligned run inside a folio of >= 2 MiB,
//                           a PUD entry one of >= 1 GiB, a PTE one page of some folio.
//   freed_unreferenced      no entry or held page is on freed memory (Universe::freed_ranges, or
//                           what Universe::is_freed says — the extension point for a block
//                           allocator above the pagemap, e.g. fsdax: its free blocks), and no
//                           folio of freed memory has a reference.
//   strategy_ref_count      the pagemap reference's count is what the strategy predicts from the
//                           page state: the initial reference while live, plus Universe::
//                           extra_pagemap_refs (allocations, lookups held), plus per_lookup: the
//                           sum of folio refcounts; transition: the number of busy folios;
//                           sweep / alloc_event / none: nothing.
//   mapcount_matches_entries  (complete universes) each folio's mapcount is the number of
//                           page-table entries of the universe mapping it.
//   holds_match             (complete universes) each folio's refcount is exactly its entries
//                           plus the universe's held pages (pins weighted as pin_folio does).
//
// The fs checks (fs_*) run only through debug::check_fs_invariants (fs_invariants.h), which adds
// the filesystems' pagemaps, holders and allocators to a universe; this file and the layers below
// the fs know nothing of it.
//
// When to call: at quiescent points only — no operation on the universe's objects may run
// concurrently (the checker reads counters that are legitimately transient mid-operation, and
// reads the metadata of every pagemap that is not dead, which a concurrent memunmap may retire).
// Every pagemap pointer found in an entry or held page is compared against the universe before it
// is dereferenced, so a stale pointer is reported, not followed. Cost: one pass over every folio
// of every pagemap and every entry of every address space (cold path, diagnostics and tests).
//
// In PGMAP_DEBUG_INVARIANTS builds PGMAP_CHECK_INVARIANTS(universe, where) runs the checker and
// aborts with the report on a violation; in other builds it expands to nothing. check_invariants()
// itself is available in every build (tests, pgmap-stress).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::debug {

enum class Check : std::uint8_t {
  refcount_covers_users,
  pfn_in_live_pagemap,
  pagemaps_disjoint,
  folio_order_matches_entry,
  freed_unreferenced,
  strategy_ref_count,
  mapcount_matches_entries,
  holds_match,
  fs_entry_folio,         // I11/I12 association: each block entry's folio (fs_invariants.h)
  fs_block_in_use_free,   // I7/I8: a block a file or an entry still uses is free
  fs_share_count,         // I12: share counts equal the number of users
  fs_entry_pagemap_refs,  // what each entry holds of the pagemap, per strategy
  fs_nrpages,             // T3: nrpages equals the pages of the block entries
};
inline constexpr std::size_t kNumChecks = 13;

std::string_view check_name(Check c) noexcept;

struct Violation {
  Check check = Check::refcount_covers_users;
  std::string pagemap;  // name of the pagemap concerned, if any
  Pfn pfn = 0;          // folio head or mapped pfn concerned (0 if none)
  std::string detail;   // what was found and what was expected
};

struct Report {
  std::vector<Violation> violations;
  std::uint64_t pagemaps_checked = 0;
  std::uint64_t folios_checked = 0;
  std::uint64_t entries_checked = 0;
  std::uint64_t held_checked = 0;

  bool ok() const noexcept { return violations.empty(); }
  std::size_t count(Check c) const noexcept;
  // One line per violation (the first `max_listed`), then the totals per check.
  std::string to_string(std::size_t max_listed = 32) const;
};

// A page referenced or pinned outside any page table (a GUP result, a PageRef, a Pin): one per
// 4 KiB page, as get_user_pages returns them. `pin` false is a plain reference of one.
struct HeldPage {
  Pfn pfn = 0;
  const DevPagemap* pgmap = nullptr;
  bool pin = false;
};

struct Universe {
  std::vector<const DevPagemap*> pagemaps;
  std::vector<const mm::AddressSpace*> address_spaces;
  std::vector<HeldPage> held;
  // True if the pagemaps' folios are referenced by nothing but the universe's entries and held
  // pages: enables mapcount_matches_entries and holds_match.
  bool complete = false;
  // Pagemap references held besides what the strategy derives from the folios: allocations
  // (DevPagemap::request, devdax VMAs under alloc_event), PagemapRefs. Null: none.
  std::function<std::int64_t(const DevPagemap&)> extra_pagemap_refs;
  // Memory that has been freed and must be neither mapped nor referenced.
  std::vector<PfnRange> freed_ranges;
  // Extension point for allocators above the pagemap (fsdax: a block allocator's free blocks):
  // true if pfn of pgmap is free. Null: no such allocator.
  std::function<bool(const DevPagemap&, Pfn)> is_freed;
};

// Runs every check; see the file comment for when it may be called.
Report check_invariants(const Universe& u);

// Runs the checker and, on a violation, prints the report (prefixed with `where`) to stderr and
// aborts. Used by PGMAP_CHECK_INVARIANTS.
void assert_invariants(const Universe& u, const char* where);

}  // namespace pgmap::debug

#ifdef PGMAP_DEBUG_INVARIANTS
#define PGMAP_CHECK_INVARIANTS(universe, where) \
  ::pgmap::debug::assert_invariants((universe), (where))
#else
#define PGMAP_CHECK_INVARIANTS(universe, where) \
  do {                                          \
  } while (false)
#endif
