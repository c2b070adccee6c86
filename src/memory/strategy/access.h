// What a strategy file may use of DevPagemap (private; see strategy_ops.h).
#pragma once

#include <atomic>
#include <cstdint>

#include "pgmap/core/error.h"
#include "pgmap/core/percpu_ref.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/strategy.h"

namespace pgmap::strategy_impl {

// What memunmap does between the kill and the unpublish.
struct Teardown {
  bool drain_ref;    // wait for the pagemap reference to be released
  bool scan_folios;  // then scan every folio and wait until each reads idle
};

// The pagemap internals a strategy may use (DevPagemap befriends this struct only).
struct Access {
  static constexpr std::uint8_t kKilled = DevPagemap::kKilled;
  static constexpr std::uint8_t kTornDown = DevPagemap::kTornDown;

  static PercpuRef& ref(DevPagemap& p) noexcept { return p.ref_; }
  static std::uint8_t life(const DevPagemap& p) noexcept {
    return p.life_.load(std::memory_order_seq_cst);
  }
  static bool torn_down(const DevPagemap& p) noexcept {
    return (p.life_.load(std::memory_order_relaxed) & kTornDown) != 0;
  }
  // Counts a late access and returns its error.
  static Errc late(DevPagemap& p) noexcept { return p.late_access(); }
  // A folio operation on a torn-down pagemap: Errc::out_of_range or a counted late access.
  static Errc torn_down_access(DevPagemap& p, Pfn pfn) noexcept { return p.torn_down_access(pfn); }
  // The first range's page array (never null): the hot path's inline lookup, the other ranges
  // out of line (locate).
  static PageArray& first_array(const DevPagemap& p) noexcept { return *p.first_array_; }
  // pfn -> (page array, head entry); array nullptr if pfn is in none of the ranges.
  static DevPagemap::Loc locate(const DevPagemap& p, Pfn pfn) noexcept { return p.locate(pfn); }
  // Whether a folio going idle must wake waiters: always for FS_DAX (I16), and for every type
  // once the pagemap is killed (memunmap's scan and devdax's unbind wait on folios).
  static bool wakes_on_idle(const DevPagemap& p) noexcept {
    return p.type_ == PagemapType::fs_dax || (life(p) & kKilled) != 0;
  }
  // Whether a folio's free path has work that uses the pagemap whatever its life: ops.page_free,
  // or FS_DAX (split settling, the wake-up of I16). Fixed at memremap, on the hot line. Under
  // sweep / alloc_event it decides whether last puts go through FREEING.
  static bool has_free_work(const DevPagemap& p) noexcept { return p.free_work_; }
  // Whether any pagemap of the process is killed and not torn down (process-wide; valid to call
  // when this folio's own pagemap may be gone).
  static bool any_pagemap_killed() noexcept {
    return DevPagemap::killed_pagemaps_.n.load(std::memory_order_seq_cst) != 0;
  }
  // A split the owner left owed at this folio's last put (kPageSplitOwed) is paid before
  // ops.page_free; `head_ref` is what the head's refcount reads meanwhile. A get that raced the
  // put leaves it owed (busy) for its own last put. Only FS_DAX owners owe splits, and an FS_DAX
  // free path always has work (its wake-up), so only the free paths with calls settle.
  static void settle_split(PageArray& a, std::uint64_t head, std::uint32_t head_ref) noexcept {
    if (!a.has_large_folios()) [[likely]]
      return;
    if ((a.flags(head).load(std::memory_order_seq_cst) & kPageSplitOwed) == 0) [[likely]]
      return;
    (void)a.settle_split(head, head_ref, a.base_order());  // busy: still owed (see above)
  }
  // ops.page_free for the folio at `head`.
  static void page_free(DevPagemap& p, PageArray& a, std::uint64_t head) noexcept {
    if (p.ops_.page_free) p.ops_.page_free(p, a.pfn_of(head), a.order(head));
  }
};

}  // namespace pgmap::strategy_impl
