// PageArray: the dense page metadata ("struct page") of one pfn range of a pagemap.
//
// Layout. One entry per base folio of the pagemap (4 KiB pages, or 2 MiB / 1 GiB for compound
// devdax pagemaps, like the kernel's vmemmap_shift). The hot array holds only the refcount, 4 B
// per entry, so a removal sweep over 1 TiB of 4 KiB pages reads 1 GiB, not the 16 GiB of
// 64-byte struct pages, and a 2 MiB-granular pagemap of 1 TiB has a 2 MiB hot array. Everything
// else lives in cold arrays that are mapped MAP_NORESERVE and cost nothing until an upper layer
// touches them: mapcount, exact pincount (large folios), folio order, flags, and the
// mapping/index/share fields of fsdax.
//
// Free pages are all-zero. A base folio that nobody uses has every field zero (refcount 0, order
// relative to the base 0, no flags), which is exactly what fresh MAP_NORESERVE anonymous memory
// reads as, so create() writes nothing: memremap of 1 TiB of 4 KiB pages commits no metadata at
// all, and a touched entry commits only the metadata pages it lands on (the kernel's
// memmap_init_zone_device writes every struct page; pgmap derives what that write would store).
// Whether an entry is a folio head is derived from the order (is_head()), not stored.
//
// Folios. A folio of order o >= base order spans 2^(o - base) entries; its references live in
// the head entry and every entry of the folio records the order, so the head of any pfn is found
// by aligning down. Tail entries keep refcount 0. set_folio_order() builds or splits folios and
// requires them idle (the kernel's dax_folio_init()/folio_reset_order(); bug 5.8 is a split that
// forgot to reset the order, which reset_order() here cannot).
//
// Pins. FOLL_PIN adds kPinBias to the refcount of a small folio (order <= 1 in 4 KiB units) and
// adds 1 to the refcount plus 1 to the exact pincount of a large folio, as the kernel does.
//
// Concurrency. All fields are atomics; PageArray imposes no protocol on its own. The pagemap's
// liveness strategy decides what a 0 -> 1 and 1 -> 0 refcount transition means (dev_pagemap.h).
//
// Teardown. retire() makes the metadata unusable without ever making its addresses fault: a late
// get, put, pin or unpin on a removed device (a caller bug, or the deferred unpin the `none`
// strategy allows) must be caught by the pagemap, not crash the process.
//  - discard (the default): the contents are replaced in O(1) by fresh anonymous memory mapped
//    over the same addresses (MAP_FIXED). The memory is returned to the system, every entry reads
//    zero again, and a stray write lands harmlessly in a private page. The address range stays
//    reserved until the PageArray is destroyed, so nothing else can be mapped there meanwhile.
//  - quarantine (the default of debug builds): every refcount is set to kRetiredRef, so a late
//    put or get finds a value above kMaxRef and is reported (Errc::use_after_teardown).
//    O(entries); the memory stays resident.
//  In ASan builds discarded metadata is also poisoned, so any late access is reported with its
//  stack (quarantined metadata stays readable: there the value is the report).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "pgmap/core/error.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {

// Per-entry flag bits (PageArray::flags()).
// Zero is a free, healthy entry. (A folio head is derived from the order: PageArray::is_head.)
enum PageFlag : std::uint8_t {
  kPagePoisoned = 1u << 1,  // memory failure recorded (PG_hwpoison)
  kPageShared = 1u << 2,    // fsdax: folio associated with several mappings (share counts them)
  // sweep / alloc_event (the FREEING protocol, docs/strategies.md): a put that was not the last
  // of the folio's busy period dropped a held reference, so whoever ends the busy period owes
  // page_free even if that is a get backing out. Cleared before the refcount returns to 0.
  kPageFreeOwed = 1u << 3,
  // fsdax: the owner disassociated this large folio while it was still referenced, so it could not
  // be split back to the base order then. Whoever next finds it idle splits it: the free path of
  // its last put (before ops.page_free), or the owner associating it again (settle_split).
  kPageSplitOwed = 1u << 4,
  // Held by the one thread settling kPageSplitOwed (a bounded, non-blocking step; others spin).
  kPageSplitting = 1u << 5,
};

class PageArray {
 public:
  // Added to a small folio's refcount per FOLL_PIN (GUP_PIN_COUNTING_BIAS).
  static constexpr std::uint32_t kPinBias = 1024;
  // Refcounts at or above this are not references: a retired (quarantined) entry holds
  // kRetiredRef, and any get or put that finds such a value reports use after teardown.
  static constexpr std::uint32_t kRetiredRef = 0xDEAD0000u;
  static constexpr std::uint32_t kMaxRef = kRetiredRef - 1;

  // Reserves the metadata for `range` at `base_order` (0, 9 or 18): every entry is a free base
  // folio, read as zero from lazily committed memory. Writes nothing, so it costs O(1) time and
  // no resident memory whatever the size. The range must be aligned to the base folio.
  // Errc::invalid_argument, Errc::unaligned, Errc::no_memory.
  static Result<std::unique_ptr<PageArray>> create(PfnRange range, unsigned base_order);
  ~PageArray();
  PageArray(const PageArray&) = delete;
  PageArray& operator=(const PageArray&) = delete;

  PfnRange range() const noexcept { return range_; }
  unsigned base_order() const noexcept { return base_order_; }
  std::uint64_t entries() const noexcept { return entries_; }
  bool contains(Pfn pfn) const noexcept { return range_.contains(pfn); }
  std::uint64_t index_of(Pfn pfn) const noexcept { return (pfn - range_.start) >> base_order_; }
  Pfn pfn_of(std::uint64_t e) const noexcept { return range_.start + (e << base_order_); }

  // ---- fields (entry index e, from index_of) ----
  std::atomic<std::uint32_t>& ref(std::uint64_t e) noexcept { return ref_[e]; }
  std::atomic<std::int32_t>& mapcount(std::uint64_t e) noexcept { return cold_->mapcount[e]; }
  std::atomic<std::uint32_t>& pincount(std::uint64_t e) noexcept { return cold_->pincount[e]; }
  std::atomic<std::uint8_t>& flags(std::uint64_t e) noexcept { return flags_[e]; }
  std::atomic<const void*>& mapping(std::uint64_t e) noexcept { return cold_->mapping[e]; }
  std::atomic<std::uint64_t>& index_or_share(std::uint64_t e) noexcept {
    return cold_->index_or_share[e];
  }

  // Folio order (in 4 KiB pages) of the folio containing entry e, and its head entry. Until the
  // first folio larger than the base folio is built (has_large_folios()), every entry is its own
  // head and the order array is not read: the hot path of a pagemap of base folios touches the
  // refcount line only.
  unsigned order(std::uint64_t e) const noexcept {
    if (!has_large_folios()) [[likely]]
      return base_order_;
    return base_order_ + order_[e].load(std::memory_order_acquire);
  }
  std::uint64_t head_of(std::uint64_t e) const noexcept {
    if (!has_large_folios()) [[likely]]
      return e;
    unsigned rel = order_[e].load(std::memory_order_acquire);
    return e & ~((std::uint64_t{1} << rel) - 1);
  }
  // True once set_folio_order() has built a folio larger than the base folio (sticky). It is set
  // before the first order store, so a reader that sees an entry's new order also sees it; a
  // reader racing with the build of a folio it uses is a caller bug either way (the folio must be
  // idle and the caller serializes changes to it).
  bool has_large_folios() const noexcept { return large_folios_.load(std::memory_order_acquire); }
  // True if entry e is the first entry of its folio (every base folio is its own head).
  bool is_head(std::uint64_t e) const noexcept { return head_of(e) == e; }
  // Entries per folio of entry e's folio.
  std::uint64_t folio_entries(std::uint64_t e) const noexcept {
    if (!has_large_folios()) [[likely]]
      return 1;
    return std::uint64_t{1} << order_[e].load(std::memory_order_acquire);
  }
  // True for folios pinned with the bias (small) rather than the exact pincount (large).
  bool uses_pin_bias(std::uint64_t head) const noexcept { return order(head) <= 1; }

  // Builds a folio of `order` at head entry `head` (aligned), or splits it back to base folios
  // when order == base_order(). Every entry of the old and new folio must be idle (refcount 0,
  // mapcount 0, pincount 0): Errc::busy otherwise; Errc::unaligned / Errc::out_of_range /
  // Errc::invalid_argument for a bad head or order. Splitting resets the order of every entry.
  // The caller serializes changes to the same folio (the kernel holds the entry lock).
  Errc set_folio_order(std::uint64_t head, unsigned order) noexcept;

  // ---- split owed at the last put (kPageSplitOwed; docs/fsdax.md "Order reset at the last put")
  // The owner (fsdax) marks a disassociated folio at `head` as owed a split and tries it at once:
  // Errc::ok if it is split (now, or by a racing last put), Errc::busy if it is still referenced
  // (the free path of its last put splits it). Errc::invalid_argument if `head` is not a head.
  Errc owe_split(std::uint64_t head) noexcept;
  // Settles a split owed by the folio at `head`, if any. If its order is `keep_order` the debt is
  // cancelled (the owner associates it again at that order); otherwise it is split back to the
  // base order if every entry is idle, the head's refcount reading `head_ref` (0, or the value a
  // last put shows while it runs the free path). Errc::ok if nothing is owed any more,
  // Errc::busy if it is still referenced (still owed). Sequentially consistent with the refcount
  // operations: either a last put sees the debt or this sees the folio idle. Never blocks but for
  // a bounded spin on another thread's settling in progress; takes no lock.
  Errc settle_split(std::uint64_t head, std::uint32_t head_ref, unsigned keep_order) noexcept;

  // ---- scans (cold paths: removal, diagnostics) ----
  // First entry in [from, to) whose refcount is non-zero, or `to`. Reads only the hot array.
  std::uint64_t find_busy(std::uint64_t from, std::uint64_t to) const noexcept;
  std::uint64_t count_busy() const noexcept;

  // ---- teardown ----
  // See "Teardown" above. `unmap` is the former name of `discard` (the memory is returned, the
  // addresses stay mapped). Idempotent, also when called concurrently; the first call's mode wins.
  enum class RetireMode { discard, quarantine, unmap = discard };
  void retire(RetireMode mode) noexcept;
  // True once retire() has started. One acquire load (a plain load on x86), cheap enough for a hot
  // path; an access that raced with retire() and saw false touched either the old or the new
  // memory, both harmless to the process.
  bool retired() const noexcept { return retired_.load(std::memory_order_acquire); }

  // Memory actually used by the hot array, and virtual size of everything.
  std::uint64_t hot_bytes() const noexcept { return entries_ * sizeof(std::uint32_t); }
  std::uint64_t reserved_bytes() const noexcept;

 private:
  struct Cold {
    std::atomic<std::int32_t>* mapcount;
    std::atomic<std::uint32_t>* pincount;
    std::atomic<std::uint8_t>* order;  // relative to base_order_
    std::atomic<std::uint8_t>* flags;
    std::atomic<const void*>* mapping;
    std::atomic<std::uint64_t>* index_or_share;
  };
  PageArray(PfnRange range, unsigned base_order, std::uint64_t entries);
  Errc split_idle(std::uint64_t head, std::uint32_t head_ref) noexcept;

  PfnRange range_;
  unsigned base_order_;
  std::uint64_t entries_;
  std::atomic<std::uint32_t>* ref_ = nullptr;
  std::atomic<std::uint8_t>* order_ = nullptr;  // cold_->order, beside ref_ for head_of
  std::atomic<std::uint8_t>* flags_ = nullptr;  // cold_->flags, for the free path
  std::atomic<bool> large_folios_{false};       // see has_large_folios()
  std::unique_ptr<Cold> cold_;
  struct Region {
    void* base = nullptr;
    std::size_t len = 0;
  };
  Region regions_[7];
  std::atomic<bool> retired_{false};
};

}  // namespace pgmap
