#include "pgmap/mm/gup.h"

#include <fmt/format.h>

#include <algorithm>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>

#include "pgmap/memory/page_array.h"

namespace pgmap::mm {
namespace {

// The folio of pfn in pgmap: its metadata array and head entry.
struct FolioLoc {
  PageArray* array = nullptr;
  std::uint64_t head = 0;
};

FolioLoc folio_of(const DevPagemap& pg, Pfn pfn) noexcept {
  PageArray* a = pg.array_for(pfn);
  if (a == nullptr) return {};
  return {a, a->head_of(a->index_of(pfn))};
}

const char* signal_name(Signal s) {
  switch (s) {
    case Signal::sigbus:
      return "SIGBUS";
    case Signal::sigsegv:
      return "SIGSEGV";
    case Signal::none:
      break;
  }
  return "no signal";
}

// References on `n` consecutive pages starting at pfn, all in one folio.
struct Run {
  DevPagemap* pgmap = nullptr;
  Pfn pfn = 0;
  std::uint32_t n = 0;
  bool pin = false;
};

// Drops the pins of a run. Large folios: one pincount and one refcount operation; pinned with the
// bias (small folios): one unpin per page. An underflow falls back to page by page, so the pages
// that were pinned are still unpinned and each missing pin is reported once.
Errc unpin_run(const Run& r) noexcept {
  FolioLoc f = folio_of(*r.pgmap, r.pfn);
  if (f.array == nullptr) return Errc::out_of_range;
  if (!f.array->uses_pin_bias(f.head)) {
    Errc e = r.pgmap->unpin_folio(r.pfn, r.n);
    if (e != Errc::underflow) return e;
  }
  Errc result = Errc::ok;
  for (std::uint32_t i = 0; i < r.n; ++i) {
    Errc e = r.pgmap->unpin_folio(r.pfn + i);
    if (e != Errc::ok && result == Errc::ok) result = e;
  }
  return result;
}

Errc put_run(const Run& r) noexcept {
  Errc e = r.pgmap->put_folio(r.pfn, r.n);
  if (e != Errc::underflow || r.n == 1) return e;
  // Some of the pages were not referenced: put the ones that were, page by page.
  Errc result = Errc::ok;
  for (std::uint32_t i = 0; i < r.n; ++i) {
    Errc pe = r.pgmap->put_folio(r.pfn + i);
    if (pe != Errc::ok && result == Errc::ok) result = pe;
  }
  return result;
}

// Groups pages into runs of consecutive pfns of one folio and applies `drop` to each.
template <typename Drop>
Errc for_each_run(const std::vector<GupPage>& pages, bool pin, Drop drop) {
  Errc result = Errc::ok;
  std::size_t i = 0;
  while (i < pages.size()) {
    const GupPage& p = pages[i];
    if (p.pgmap == nullptr) {
      if (result == Errc::ok) result = Errc::invalid_argument;
      ++i;
      continue;
    }
    FolioLoc f = folio_of(*p.pgmap, p.pfn);
    std::size_t j = i + 1;
    if (f.array != nullptr) {
      const Pfn folio_end = f.array->pfn_of(f.head) + order_pages(f.array->order(f.head));
      while (j < pages.size() && pages[j].pgmap == p.pgmap && pages[j].pfn == p.pfn + (j - i) &&
             pages[j].pfn < folio_end) {
        ++j;
      }
    }
    Errc e = drop(Run{p.pgmap, p.pfn, static_cast<std::uint32_t>(j - i), pin});
    if (e != Errc::ok && result == Errc::ok) result = e;
    i = j;
  }
  return result;
}

class Gup {
 public:
  static constexpr std::uint64_t kReserveMax = std::uint64_t{1} << 16;  // pages

  Gup(AddressSpace& as, std::uint32_t flags, GupStats& stats)
      : as_(as), flags_(flags), stats_(stats) {}
  Gup(const Gup&) = delete;
  Gup& operator=(const Gup&) = delete;
  // A call that did not hand its pages out (an error) gives every reference back.
  ~Gup() { undo(); }

  Result<std::vector<GupPage>> run(std::uint64_t start, std::uint64_t nr_pages) {
    pages_.reserve(std::min<std::uint64_t>(nr_pages, kReserveMax));
    runs_.reserve(std::min<std::uint64_t>(nr_pages, kReserveMax));
    std::uint64_t addr = start;
    std::uint64_t left = nr_pages;
    while (left > 0) {
      auto fast = grab(addr, left, false);
      if (!fast) return fast.error();
      std::uint64_t got = *fast;
      if (got > 0) {
        stats_.fast += got;
      } else {
        if ((flags_ & kFollFastOnly) != 0) {
          return Error(Errc::busy,
                       fmt::format("GUP: {:#x} needs the slow path (FOLL_FAST_ONLY)", addr));
        }
        auto slow = slow_path(addr, left);
        if (!slow) return slow.error();
        got = *slow;
        stats_.slow += got;
      }
      addr += got << kPageShift;
      left -= got;
    }
    runs_.clear();  // the references now belong to the caller
    cache_.reset();
    return std::move(pages_);
  }

 private:
  bool write() const { return (flags_ & kFollWrite) != 0; }
  bool pin() const { return (flags_ & kFollPin) != 0; }
  bool longterm() const { return (flags_ & kFollLongterm) != 0; }

  // Gives back every reference this call took, and the cached pagemap reference (bug 5.12).
  void undo() noexcept {
    for (auto it = runs_.rbegin(); it != runs_.rend(); ++it) {
      (void)(it->pin ? unpin_run(*it) : put_run(*it));
    }
    runs_.clear();
    pages_.clear();
    cache_.reset();
  }

  // The lockless walk: takes references on up to `max` pages from addr that lie in one folio
  // and are mapped by present entries, with one refcount operation. Returns the number of pages
  // taken, 0 if the first page needs the slow path (not mapped, read-only for FOLL_WRITE, its
  // entry changed under us), or an error. `slow`: called by the slow path, with mmap_lock held
  // and the VMA checks done.
  Result<std::uint64_t> grab(std::uint64_t addr, std::uint64_t max, bool slow) {
    auto entry = as_.lookup(addr);
    if (!entry || (write() && !entry->writable)) return std::uint64_t{0};
    const Pfn pfn = entry->pfn + ((addr - entry->addr) >> kPageShift);
    if (!(cache_ && cache_->contains(pfn))) {
      ++stats_.pagemap_lookups;
      cache_ = get_dev_pagemap(pfn, std::move(cache_));
    }
    if (!cache_) {
      if (!slow) return std::uint64_t{0};
      return Error(Errc::dead, fmt::format("GUP: the pagemap of pfn {:#x} (at {:#x}) is being "
                                           "torn down",
                                           pfn, addr));
    }
    DevPagemap* pg = cache_.get();
    FolioLoc f = folio_of(*pg, pfn);
    if (entry->pgmap != pg || f.array == nullptr) {
      // Fast: the entry changed since we read it. Slow (mmap_lock held, just faulted in): the
      // entry's pagemap is no longer the one published for its pfn, so it is being torn down.
      if (!slow) return std::uint64_t{0};
      return Error(Errc::dead, fmt::format("GUP: pfn {:#x} (at {:#x}) is mapped from a pagemap "
                                           "that no longer covers it",
                                           pfn, addr));
    }
    // gup-fast does not grant long-term pins on fsdax folios (folio_is_longterm_pinnable); the
    // slow path decides from the VMA.
    if (!slow && longterm() && pg->type() == PagemapType::fs_dax) return std::uint64_t{0};
    const Pfn folio_end = f.array->pfn_of(f.head) + order_pages(f.array->order(f.head));

    // Extend the run over the following pages of the same folio, entry by entry. (seen_ is reused
    // across calls: a small folio's run is one page, and an allocation per page would dominate.)
    std::vector<PtEntry>& seen = seen_;
    seen.clear();
    seen.push_back(*entry);
    std::uint64_t n = 1;
    while (n < max && pfn + n < folio_end) {
      const std::uint64_t next = addr + (n << kPageShift);
      const PtEntry& cur = seen.back();
      if (next >= cur.addr + level_bytes(cur.level)) {
        auto e = as_.lookup(next);
        if (!e || (write() && !e->writable) || e->pgmap != pg ||
            e->pfn + ((next - e->addr) >> kPageShift) != pfn + n) {
          break;
        }
        seen.push_back(*e);
      }
      ++n;
    }

    Run run{pg, pfn, static_cast<std::uint32_t>(n), pin()};
    if (Errc e = take(run, f); e != Errc::ok) {
      if (!slow && e != Errc::poisoned) return std::uint64_t{0};
      return Error(e,
                   fmt::format("GUP: cannot {} pfn {:#x} (at {:#x}) of {}: {}",
                               pin() ? "pin" : "reference", pfn, addr, pg->name(), errc_name(e)));
    }
    // Re-read every entry the run came from: a concurrent zap may have dropped the mapping's
    // reference between our lookup and our reference, and the page may be reused.
    for (const PtEntry& s : seen) {
      auto now = as_.lookup(s.addr);
      if (!now || now->addr != s.addr || now->pfn != s.pfn || now->level != s.level ||
          now->pgmap != s.pgmap || (write() && !now->writable)) {
        (void)(run.pin ? unpin_run(run) : put_run(run));
        return std::uint64_t{0};
      }
    }
    runs_.push_back(run);
    for (std::uint64_t i = 0; i < n; ++i)
      pages_.push_back(GupPage{pfn + i, pg});
    return n;
  }

  // One refcount operation for the run (a pin of a small folio: one per page).
  Errc take(const Run& r, FolioLoc f) noexcept {
    if (!r.pin) {
      ++stats_.folio_atomics;
      return r.pgmap->get_folio(r.pfn, r.n);
    }
    if (f.array->uses_pin_bias(f.head)) {
      for (std::uint32_t i = 0; i < r.n; ++i) {
        ++stats_.folio_atomics;
        if (Errc e = r.pgmap->pin_folio(r.pfn + i); e != Errc::ok) {
          for (std::uint32_t j = 0; j < i; ++j)
            (void)r.pgmap->unpin_folio(r.pfn + j);
          return e;
        }
      }
      return Errc::ok;
    }
    ++stats_.folio_atomics;
    return r.pgmap->pin_folio(r.pfn, r.n);  // large folio: +n refcount, +n pincount
  }

  // mmap_lock shared: check the VMA, fault the page in, take it (and what follows in its folio).
  Result<std::uint64_t> slow_path(std::uint64_t addr, std::uint64_t max) {
    std::shared_lock<std::shared_mutex> lock(as_.mmap_lock());
    const Vma* vma = as_.find_vma_locked(addr);
    if (vma == nullptr) {
      return Error(Errc::out_of_range, fmt::format("GUP: SIGSEGV at {:#x}: no VMA", addr));
    }
    if (longterm() && (vma->flags & kVmFsDax) != 0) {
      return Error(Errc::not_supported,
                   fmt::format("GUP: FOLL_LONGTERM refused on the fsdax VMA [{:#x}, {:#x}) of {}",
                               vma->start, vma->end, vma->owner->name()));
    }
    if (write() && !vma->writable()) {
      return Error(Errc::out_of_range,
                   fmt::format("GUP: SIGSEGV at {:#x}: FOLL_WRITE on the read-only VMA "
                               "[{:#x}, {:#x})",
                               addr, vma->start, vma->end));
    }
    for (;;) {
      SignalInfo sig = as_.handle_fault_locked(addr, write());
      if (sig) {
        return Error(sig.signal == Signal::sigbus ? Errc::dead : Errc::out_of_range,
                     fmt::format("GUP: {} at {:#x} (addr_lsb {}): {}", signal_name(sig.signal),
                                 sig.addr, sig.addr_lsb, sig.why));
      }
      auto got = grab(addr, max, true);
      if (!got || *got > 0) return got;
      // Zapped again between the fault and the grab (unmap_mapping_range): fault again.
    }
  }

  AddressSpace& as_;
  const std::uint32_t flags_;
  GupStats& stats_;
  PagemapRef cache_;
  std::vector<Run> runs_;
  std::vector<PtEntry> seen_;  // grab()'s scratch: the entries a run came from
  std::vector<GupPage> pages_;
};

}  // namespace

Result<std::vector<GupPage>> get_user_pages(AddressSpace& as, std::uint64_t start,
                                            std::uint64_t nr_pages, std::uint32_t flags,
                                            GupStats* stats) {
  if (!is_aligned(start, kPageSize)) {
    return Error(Errc::invalid_argument, fmt::format("GUP: unaligned start {:#x}", start));
  }
  if ((flags & kFollLongterm) != 0 && (flags & kFollPin) == 0) {
    return Error(Errc::invalid_argument, "GUP: FOLL_LONGTERM is only valid with FOLL_PIN");
  }
  if (nr_pages > (AddressSpace::kTaskSize >> kPageShift) ||
      start > AddressSpace::kTaskSize - (nr_pages << kPageShift)) {
    return Error(Errc::out_of_range, "GUP: range past the task size");
  }
  GupStats local;
  Gup gup(as, flags, stats != nullptr ? *stats : local);
  return gup.run(start, nr_pages);
}

Errc unpin_user_pages(const std::vector<GupPage>& pages) {
  return for_each_run(pages, true, [](const Run& r) { return unpin_run(r); });
}

Errc put_pages(const std::vector<GupPage>& pages) {
  return for_each_run(pages, false, [](const Run& r) { return put_run(r); });
}

}  // namespace pgmap::mm
