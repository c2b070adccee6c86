// PageRef and Pin: move-only RAII handles for one folio reference and one DMA pin.
//
// A PageRef owns `refs` references on the folio containing pfn (get_folio); a Pin owns one
// FOLL_PIN pin on it (pin_folio). Each releases on destruction; release() releases early and
// returns the status (Errc::use_after_teardown under `none` after teardown, for example), after
// which the handle is empty. A default-constructed or moved-from handle holds nothing.
//
// The handles are the ordinary way to hold pages; the raw DevPagemap calls stay for kernel-shaped
// code (page tables, GUP batches) that keeps references in its own structures.
//
// Lifetime: a non-empty handle keeps the pagemap alive under every safe strategy (I1), so its
// pagemap pointer stays valid until the handle is released. The handles are not thread-safe
// objects themselves (like std::unique_ptr): one thread owns each.
#pragma once

#include <cstdint>
#include <utility>

#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"

namespace pgmap {

class PageRef {
 public:
  PageRef() = default;
  // Takes `refs` references on the folio of pfn. Errors as DevPagemap::get_folio; nothing held.
  [[nodiscard]] static Result<PageRef> get(DevPagemap& pgmap, Pfn pfn, std::uint32_t refs = 1) {
    if (Errc e = pgmap.get_folio(pfn, refs); e != Errc::ok) return Error(e, "PageRef::get");
    return PageRef(&pgmap, pfn, refs);
  }
  // Adopts references the caller already took (get_folio returned ok for them).
  [[nodiscard]] static PageRef adopt(DevPagemap& pgmap, Pfn pfn, std::uint32_t refs = 1) noexcept {
    return PageRef(&pgmap, pfn, refs);
  }
  PageRef(PageRef&& o) noexcept
      : pgmap_(std::exchange(o.pgmap_, nullptr)), pfn_(o.pfn_), refs_(std::exchange(o.refs_, 0)) {}
  PageRef& operator=(PageRef&& o) noexcept {
    if (this != &o) {
      (void)release();  // a failed put is already reported (late_accesses, misuse report)
      pgmap_ = std::exchange(o.pgmap_, nullptr);
      pfn_ = o.pfn_;
      refs_ = std::exchange(o.refs_, 0);
    }
    return *this;
  }
  PageRef(const PageRef&) = delete;
  PageRef& operator=(const PageRef&) = delete;
  ~PageRef() { (void)release(); }  // errors already reported, as in operator=

  [[nodiscard]] Errc release() noexcept {
    if (pgmap_ == nullptr) return Errc::ok;
    return std::exchange(pgmap_, nullptr)->put_folio(pfn_, std::exchange(refs_, 0));
  }
  // Gives up ownership without putting: the caller now owns the references (e.g. a page-table
  // entry that will drop them at zap).
  std::uint32_t disown() noexcept {
    pgmap_ = nullptr;
    return std::exchange(refs_, 0);
  }

  explicit operator bool() const noexcept { return pgmap_ != nullptr; }
  DevPagemap* pagemap() const noexcept { return pgmap_; }
  Pfn pfn() const noexcept { return pfn_; }
  std::uint32_t refs() const noexcept { return refs_; }

 private:
  PageRef(DevPagemap* p, Pfn pfn, std::uint32_t refs) noexcept
      : pgmap_(p), pfn_(pfn), refs_(refs) {}
  DevPagemap* pgmap_ = nullptr;
  Pfn pfn_ = 0;
  std::uint32_t refs_ = 0;
};

class Pin {
 public:
  Pin() = default;
  // Pins the folio of pfn. Errors as DevPagemap::pin_folio (Errc::poisoned, Errc::dead, ...).
  [[nodiscard]] static Result<Pin> pin(DevPagemap& pgmap, Pfn pfn) {
    if (Errc e = pgmap.pin_folio(pfn); e != Errc::ok) return Error(e, "Pin::pin");
    return Pin(&pgmap, pfn);
  }
  Pin(Pin&& o) noexcept : pgmap_(std::exchange(o.pgmap_, nullptr)), pfn_(o.pfn_) {}
  Pin& operator=(Pin&& o) noexcept {
    if (this != &o) {
      (void)release();  // a failed unpin is already reported
      pgmap_ = std::exchange(o.pgmap_, nullptr);
      pfn_ = o.pfn_;
    }
    return *this;
  }
  Pin(const Pin&) = delete;
  Pin& operator=(const Pin&) = delete;
  ~Pin() { (void)release(); }

  [[nodiscard]] Errc release() noexcept {
    if (pgmap_ == nullptr) return Errc::ok;
    return std::exchange(pgmap_, nullptr)->unpin_folio(pfn_);
  }

  explicit operator bool() const noexcept { return pgmap_ != nullptr; }
  DevPagemap* pagemap() const noexcept { return pgmap_; }
  Pfn pfn() const noexcept { return pfn_; }

 private:
  Pin(DevPagemap* p, Pfn pfn) noexcept : pgmap_(p), pfn_(pfn) {}
  DevPagemap* pgmap_ = nullptr;
  Pfn pfn_ = 0;
};

}  // namespace pgmap
