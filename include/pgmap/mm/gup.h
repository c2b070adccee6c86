// GUP: get_user_pages / pin_user_pages on simulated address spaces (mm/gup.c).
//
// For each page of [start, start + nr_pages * 4 KiB) the caller gets a reference on the folio
// mapped there: a plain reference (FOLL_GET, the default) or a DMA pin (FOLL_PIN: +kPinBias on a
// small folio's refcount, +1 refcount and +1 exact pincount on a large one). A 2 MiB or 1 GiB
// folio covered by several requested pages gets ONE atomic for all of them (refs/pins added in one
// operation), not one per 4 KiB page.
//
// Fast path: one RCU read section per call and one walk per page-table page: the entries of a
// PTE table are read directly, their folio references are taken by one batched call
// (DevPagemap::pin_folios / get_folios: one pfn -> page array resolution and one strategy
// dispatch per batch, one atomic per folio), then every entry is re-read from the same table
// page; the entries from the first that changed (a concurrent zap) give their references back and
// their pages go to the slow path. docs/gup.md describes the design and its costs. Slow path: takes
// mmap_lock shared, faults the page in through its VMA (with FOLL_WRITE a write fault), and
// retries. Pagemap liveness is checked once per pagemap along the walk, not per page (the kernel's
// get_dev_pagemap with the cached argument: 1.04 s -> 0.38 s for 12 GiB); no pagemap reference is
// held: inside the read section the entry's folio reference keeps the pagemap, and the re-check of
// the entry orders a pin against a concurrent teardown's zap (either the pin is given back, or the
// teardown's wait for idle folios sees it).
//
// FOLL_LONGTERM is refused with Errc::not_supported on fsdax VMAs (kVmFsDax; I9, bug 5.2) and
// allowed on devdax. Failure midway (a hole, a signal, a dead pagemap) drops every reference taken
// by the call — nothing leaks (bug 5.12) — and returns the error; the
// SignalInfo of a failed fault is in the Error message.
//
// Results. The pages come back as a typed, move-only page set that knows what it holds:
// pin_user_pages returns PinnedPages (FOLL_PIN), get_user_pages ReferencedPages (FOLL_GET). A set
// releases itself on destruction (unpin or put, batched per pagemap: one operation per folio) and
// has an explicit release() returning the status; unpinning a referenced set or putting a pinned
// set does not compile (issue 7 item 10: put_pages() on pinned pages used to turn each pin into a
// leaked reference). The `_into` forms fill an empty set the caller keeps across calls, so a
// repeated pin/unpin cycle allocates nothing.
//
// Contract: may block (the slow path takes mmap_lock shared and faults; a fault may wait for the
// owner's locks); must not be called with mmap_lock held or inside an RCU read section. After a
// successful return every page of the set is referenced/pinned; after an error nothing is.
//
// Errors: Errc::invalid_argument (start not page aligned, FOLL_LONGTERM without FOLL_PIN, FOLL_PIN
// passed to get_user_pages, a non-empty set given to an `_into` form),
// Errc::not_supported (FOLL_LONGTERM on fsdax), Errc::out_of_range (the fault would raise SIGSEGV:
// no VMA, or FOLL_WRITE on a read-only one), Errc::dead (SIGBUS from the owner, or the page's
// pagemap is being torn down; the kernel returns -EFAULT for these), Errc::poisoned (FOLL_PIN of
// a poisoned folio), Errc::busy (kFollFastOnly and a page needed the slow path).
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::mm {

enum GupFlags : std::uint32_t {
  kFollWrite = 1u << 0,
  kFollPin = 1u << 1,       // DMA pin (pin_user_pages); otherwise a plain reference
  kFollLongterm = 1u << 2,  // pin that may last indefinitely (RDMA, AF_XDP); FOLL_PIN only
  kFollFastOnly = 1u << 3,  // fail (Errc::busy) instead of taking the slow path
};

// One pinned or referenced 4 KiB page: the pfn of the page (not the folio head) and its pagemap.
struct GupPage {
  Pfn pfn = 0;
  DevPagemap* pgmap = nullptr;
};

struct GupStats {
  std::uint64_t fast = 0;             // pages resolved by the lockless walk
  std::uint64_t slow = 0;             // pages that needed the slow path (fault)
  std::uint64_t folio_atomics = 0;    // refcount operations issued (one per folio run)
  std::uint64_t pagemap_lookups = 0;  // pagemap liveness checks (one per pagemap change)
};

enum class PageSetKind : std::uint8_t { referenced, pinned };

namespace detail {
// Drops what `pages` hold (unpin or put), batched per folio run. Errc::underflow (misuse
// reported) for a page that does not hold what it should; the others are still released.
Errc release_pages(std::span<const GupPage> pages, PageSetKind kind) noexcept;
struct GupAccess;

// The storage of a page set: room for kInline pages inside the object, so that a small call
// allocates nothing (the Result forms included), and an array on the heap beyond that. Clearing
// keeps the capacity. One owner, like the set. Entries past size() are not initialised;
// append() hands them to the caller to fill (GUP writes each one exactly once).
class PageBuffer {
 public:
  static constexpr std::size_t kInline = 4;

  PageBuffer() noexcept = default;
  PageBuffer(PageBuffer&& o) noexcept { take(o); }
  PageBuffer& operator=(PageBuffer&& o) noexcept {
    if (this != &o) {
      free_heap();
      take(o);
    }
    return *this;
  }
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;
  ~PageBuffer() { free_heap(); }

  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::size_t capacity() const noexcept { return cap_; }
  const GupPage* data() const noexcept { return data_; }
  void clear() noexcept { size_ = 0; }
  // Room for n entries in all (may throw std::bad_alloc; the entries held are kept).
  void reserve(std::size_t n) {
    if (n <= cap_) return;
    auto* grown = new GupPage[n];
    for (std::size_t i = 0; i < size_; ++i)
      grown[i] = data_[i];
    free_heap();
    data_ = grown;
    cap_ = n;
  }
  // n more entries (size() + n <= capacity()), returned for the caller to fill.
  GupPage* append(std::size_t n) noexcept {
    GupPage* p = data_ + size_;
    size_ += n;
    return p;
  }

 private:
  void take(PageBuffer& o) noexcept {
    size_ = o.size_;
    if (o.data_ == o.inline_) {
      for (std::size_t i = 0; i < size_; ++i)
        inline_[i] = o.inline_[i];
    } else {
      data_ = o.data_;
      cap_ = o.cap_;
      o.data_ = o.inline_;
      o.cap_ = kInline;
    }
    o.size_ = 0;
  }
  void free_heap() noexcept {
    if (data_ != inline_) delete[] data_;
    data_ = inline_;
    cap_ = kInline;
  }

  GupPage* data_ = inline_;
  std::size_t size_ = 0;
  std::size_t cap_ = kInline;
  GupPage inline_[kInline];
};
}  // namespace detail

// A set of pages that each hold one pin (PageSetKind::pinned) or one plain reference
// (PageSetKind::referenced), in address order. Move-only; not a thread-safe object itself (one
// thread owns it, like std::unique_ptr). Releasing keeps the storage for the next `_into` call.
template <PageSetKind K>
class PageSet {
 public:
  static constexpr PageSetKind kKind = K;

  PageSet() = default;
  PageSet(PageSet&& o) noexcept : pages_(std::move(o.pages_)) {}  // o is empty afterwards
  PageSet& operator=(PageSet&& o) noexcept {
    if (this != &o) {
      (void)release();  // a failed release is already reported (misuse report, late_accesses)
      pages_ = std::move(o.pages_);
    }
    return *this;
  }
  PageSet(const PageSet&) = delete;
  PageSet& operator=(const PageSet&) = delete;
  ~PageSet() { (void)release(); }  // errors already reported, as in operator=

  // Unpins (pinned) or puts (referenced) every page; the set is empty afterwards (its storage is
  // kept). Errc::use_after_teardown under `none` after the device was removed, for example.
  [[nodiscard]] Errc release() noexcept {
    if (pages_.empty()) return Errc::ok;
    Errc e = detail::release_pages(pages(), K);
    pages_.clear();
    return e;
  }

  std::size_t size() const noexcept { return pages_.size(); }
  bool empty() const noexcept { return pages_.empty(); }
  const GupPage& operator[](std::size_t i) const noexcept { return pages_.data()[i]; }
  const GupPage* begin() const noexcept { return pages_.data(); }
  const GupPage* end() const noexcept { return pages_.data() + pages_.size(); }
  std::span<const GupPage> pages() const noexcept { return {pages_.data(), pages_.size()}; }

 private:
  friend struct detail::GupAccess;
  detail::PageBuffer pages_;
};

using PinnedPages = PageSet<PageSetKind::pinned>;
using ReferencedPages = PageSet<PageSetKind::referenced>;

// FOLL_GET: one plain reference per page. kFollPin is refused (Errc::invalid_argument): pins come
// from pin_user_pages.
Result<ReferencedPages> get_user_pages(AddressSpace& as, std::uint64_t start,
                                       std::uint64_t nr_pages, std::uint32_t flags,
                                       GupStats* stats = nullptr);
// FOLL_PIN (added to flags): one pin per page.
Result<PinnedPages> pin_user_pages(AddressSpace& as, std::uint64_t start, std::uint64_t nr_pages,
                                   std::uint32_t flags, GupStats* stats = nullptr);
// The same into a set the caller keeps: `out` must be empty (else Errc::invalid_argument, nothing
// changed); on error it stays empty. No heap allocation once its storage has grown to nr_pages.
Errc get_user_pages_into(ReferencedPages& out, AddressSpace& as, std::uint64_t start,
                         std::uint64_t nr_pages, std::uint32_t flags, GupStats* stats = nullptr);
Errc pin_user_pages_into(PinnedPages& out, AddressSpace& as, std::uint64_t start,
                         std::uint64_t nr_pages, std::uint32_t flags, GupStats* stats = nullptr);

// The kernel-shaped release calls, typed: unpin_user_pages takes only pinned sets, put_pages only
// referenced ones (mixing them does not compile). Both empty the set; same as set.release().
inline Errc unpin_user_pages(PinnedPages& pages) noexcept {
  return pages.release();
}
inline Errc put_pages(ReferencedPages& pages) noexcept {
  return pages.release();
}

}  // namespace pgmap::mm
