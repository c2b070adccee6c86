// The invariant checker extended to the DAX filesystem layer (kernel-semantics.md I7, I8, I11,
// I12, T3). It lives in the debug layer, above fs: nothing in memory/mm/dax knows about it.
//
// check_fs_invariants(u, f) adds to the universe `u` everything the filesystems of `f` own —
// their device pagemaps and zero-page pagemaps, the pages held by pipe buffers (references) and
// in-flight DIO requests (pins), an is_freed that reads each filesystem's block allocator, and the
// pagemap references each strategy makes entries hold — runs check_invariants(u), and then the
// fs checks:
//
//   fs_entry_folio        every block entry maps the file's own blocks at its index; its folio
//                         starts at the entry's pfn with the entry's order (I11); an unshared
//                         folio's mapping/index name exactly that inode and index, a shared one
//                         has no mapping (I12); a folio associated with no entry is back at the
//                         base order (bug 5.8); no entry is locked (quiescent point).
//   fs_block_in_use_free  no block is free in the allocator while a file's block map or an entry
//                         still uses it (I7/I8; pages held by pins, pipes and DIO on free blocks
//                         are reported by freed_unreferenced through is_freed).
//   fs_share_count        every block's allocator share count equals the number of (file, page)
//                         users of it; a shared folio's share count equals the number of entries
//                         associated with it (I12).
//   fs_entry_pagemap_refs alloc_event: every block entry has exactly one allocation covering its
//                         pfns and there is no allocation without an entry; per_lookup /
//                         transition: the pagemap count covers one reference per entry page
//                         (the exact equation is strategy_ref_count's, with these included).
//   fs_nrpages            each inode's nrpages equals the pages of its block entries (T3).
//
// When to call: at quiescent points, as check_invariants, and with no eviction queued
// (DaxFs::flush_evictions first).
#pragma once

#include <vector>

#include "pgmap/debug/invariants.h"

namespace pgmap::fs {
class DaxFs;
class PipeBuffer;
class DioRequest;
}  // namespace pgmap::fs

namespace pgmap::debug {

struct FsUniverse {
  std::vector<const fs::DaxFs*> filesystems;
  std::vector<const fs::PipeBuffer*> pipes;  // unconsumed pipe buffers (page references)
  std::vector<const fs::DioRequest*> dios;   // DIO requests (pins while in flight)
};

// Runs check_invariants over `u` extended by `f`, then the fs checks.
Report check_fs_invariants(Universe u, const FsUniverse& f);

// Aborts with the report on a violation (PGMAP_CHECK_INVARIANTS' counterpart for the fs).
void assert_fs_invariants(const Universe& u, const FsUniverse& f, const char* where);

}  // namespace pgmap::debug
