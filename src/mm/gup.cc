#include "pgmap/mm/gup.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <utility>

#include "mm/gup_access.h"
#include "mm/page_table.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::mm {

namespace {

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

// References on `n` consecutive pages starting at pfn, all in one folio: one refcount operation
// (a huge leaf's run).
struct Run {
  DevPagemap* pgmap;
  Pfn pfn;
  std::uint32_t n;
  bool bias;  // small folio pinned with the bias: n == 1
};

Errc drop_run(const Run& r, bool pin) noexcept {
  if (!pin) {
    Errc e = r.pgmap->put_folio(r.pfn, r.n);
    if (e != Errc::underflow || r.n == 1) return e;
  } else {
    Errc e = r.pgmap->unpin_folio(r.pfn, r.n);
    if (e != Errc::underflow || r.n == 1) return e;
  }
  // Some of the pages did not hold what they should: release the ones that do, page by page
  // (each missing one is reported once).
  Errc result = Errc::ok;
  for (std::uint32_t i = 0; i < r.n; ++i) {
    Errc e = pin ? r.pgmap->unpin_folio(r.pfn + i) : r.pgmap->put_folio(r.pfn + i);
    if (e != Errc::ok && result == Errc::ok) result = e;
  }
  return result;
}

class Gup {
 public:
  Gup(AddressSpace& as, std::uint32_t flags, GupStats& stats, detail::PageBuffer& out)
      : as_(as), pt_(detail::GupAccess::page_table(as)), flags_(flags), stats_(stats), out_(out) {}
  Gup(const Gup&) = delete;
  Gup& operator=(const Gup&) = delete;
  // A call that failed gives every reference back (bug 5.12: nothing leaks).
  ~Gup() {
    if (!done_ && !out_.empty()) {
      (void)detail::release_pages({out_.data(), out_.size()},
                                  pin() ? PageSetKind::pinned : PageSetKind::referenced);
      out_.clear();
    }
  }

  // `first_slow`: the first page's lockless walk was already made (one_page_fast) and found
  // that it needs the slow path, having found `live` live (counted in the stats already).
  Errc run(std::uint64_t start, std::uint64_t nr_pages, std::string* why, bool first_slow = false,
           DevPagemap* live = nullptr) {
    live_ = live;
    out_.reserve(nr_pages);
    std::uint64_t addr = start;
    std::uint64_t left = nr_pages;
    while (left > 0) {
      std::uint64_t got = first_slow ? 0 : walk(addr, left, false);
      first_slow = false;
      if (got == kFailed) [[unlikely]]
        return fail(*err_, why);
      if (got > 0) {
        stats_.fast += got;
      } else {
        if ((flags_ & kFollFastOnly) != 0) {
          return fail(Error(Errc::busy, fmt::format("GUP: {:#x} needs the slow path "
                                                    "(FOLL_FAST_ONLY)",
                                                    addr)),
                      why);
        }
        auto slow = slow_path(addr, left);
        if (!slow) return fail(slow.error(), why);
        got = *slow;
        stats_.slow += got;
      }
      addr += got << kPageShift;
      left -= got;
    }
    done_ = true;  // the references now belong to the caller's set
    return Errc::ok;
  }

 private:
  bool write() const { return (flags_ & kFollWrite) != 0; }
  bool pin() const { return (flags_ & kFollPin) != 0; }
  bool longterm() const { return (flags_ & kFollLongterm) != 0; }

  static Errc fail(const Error& e, std::string* why) {
    if (why != nullptr) *why = e.message();
    return e.code();
  }

  // One refcount operation for the run (a small folio's pin: the bias, one page).
  Errc take(const Run& r) noexcept {
    ++stats_.folio_atomics;
    if (!pin()) return r.pgmap->get_folio(r.pfn, r.n);
    return r.pgmap->pin_folio(r.pfn, r.n);
  }

  // The entry's pagemap must be live (not killed by a memunmap / unbind in progress): checked once
  // per pagemap along the call. The entry's folio reference keeps the pagemap's memory valid
  // inside our read section; after a kill no new pin may start here (the kernel's gup-fast fails
  // get_dev_pagemap then). A kill after the check is covered by the re-check of the entry: the
  // teardown zaps the entry, and either our re-check sees the zap (we give the reference back) or
  // the teardown's wait for idle folios sees our reference.
  bool pagemap_live(DevPagemap* pg) noexcept {
    if (pg == live_) return true;
    ++stats_.pagemap_lookups;
    if (pg->state() != DevPagemap::State::live) return false;
    live_ = pg;
    return true;
  }

  // The lockless walk, in one RCU read section: takes references on up to `max` pages from addr
  // (one walk per page-table page, one refcount operation per folio run) and appends them to
  // out_. Returns the number of pages taken; 0 if the first page needs the slow path (not mapped,
  // read-only for FOLL_WRITE, its entry changed under us); or an error. `slow`: called by the slow
  // path with mmap_lock held, right after faulting addr in: what would send the first page to the
  // slow path again is an error instead.
  // (Errors go to err_ and return kFailed, so that the common path moves no Result around.)
  std::uint64_t walk(std::uint64_t addr, std::uint64_t max, bool slow) {
    rcu::ReadGuard guard;
    std::uint64_t taken = 0;
    while (taken < max) {
      const std::uint64_t got =
          walk_table(addr + (taken << kPageShift), max - taken, slow && taken == 0);
      if (got == kFailed) [[unlikely]]
        return kFailed;
      if (got == 0) break;
      taken += got;
    }
    return taken;
  }

  static constexpr std::uint64_t kFailed = ~std::uint64_t{0};
  [[gnu::cold, gnu::noinline]] std::uint64_t failed(Error e) {
    err_.emplace(std::move(e));
    return kFailed;
  }

  [[gnu::cold, gnu::noinline]] Error dead(std::string what, Pfn pfn, std::uint64_t addr) const {
    return Error(Errc::dead, fmt::format("GUP: pfn {:#x} (at {:#x}) {}", pfn, addr, what));
  }

  // One table page (a PTE table from addr's slot, or one huge leaf).
  std::uint64_t walk_table(std::uint64_t addr, std::uint64_t max, bool strict) {
    auto s = pt_.slots(addr);
    if (!s) return 0;
    const std::uint64_t count = s->depth == 0 ? std::min(max, s->count) : 1;
    std::array<std::uint64_t, PageTable::kEntries> seen;  // entry values, for the re-check
    std::uint64_t n = 0;                                  // entries read (depth 0)

    // An entry is usable if it is a present leaf (writable for FOLL_WRITE), its pagemap is the
    // live one of its pfn, and (fast) FOLL_LONGTERM is not asked of an fsdax page.
    auto usable = [&](std::uint64_t e, DevPagemap* pg, Pfn pfn, std::uint64_t at) -> bool {
      if (!pte::leaf(e) || (write() && !pte::writable(e)) || pg == nullptr) return false;
      if (!pagemap_live(pg)) {
        if (strict && n == 0) {
          (void)failed(dead("is mapped from a pagemap that is being torn down", pfn, at));
        }
        return false;
      }
      // gup-fast does not grant long-term pins on fsdax folios (folio_is_longterm_pinnable); the
      // slow path decides from the VMA.
      if (!strict && longterm() && pg->type() == PagemapType::fs_dax) return false;
      return true;
    };

    if (s->depth > 0) {
      // A huge leaf: one folio run (or several, if the folio is smaller than the leaf).
      const std::uint64_t e = s->entry->load(std::memory_order_acquire);
      DevPagemap* pg = s->pgmap->load(std::memory_order_acquire);
      if (s->entry->load(std::memory_order_acquire) != e) return 0;
      const Pfn pfn = pte::pfn(e) + ((addr - s->addr) >> kPageShift);
      if (!usable(e, pg, pfn, addr)) {
        if (err_) return kFailed;
        return 0;
      }
      PageArray* a = pg->array_for(pfn);
      if (a == nullptr) {
        if (strict) return failed(dead("is outside its pagemap", pfn, addr));
        return 0;
      }
      const std::uint64_t head = a->head_of(a->index_of(pfn));
      const Pfn folio_end = a->pfn_of(head) + order_pages(a->order(head));
      const Pfn leaf_end = pte::pfn(e) + order_pages(level_order(pte::level(e)));
      std::uint64_t len = std::min<std::uint64_t>({max, folio_end - pfn, leaf_end - pfn});
      const bool bias = a->uses_pin_bias(head) && pin();
      if (bias) len = 1;
      const Run run{pg, pfn, static_cast<std::uint32_t>(len), bias};
      // The leaf was read locklessly; its reference is not taken yet.
      PGMAP_YIELD_POINT("gup.after_walk");
      if (Errc te = take(run); te != Errc::ok) {
        if (te == Errc::poisoned) {
          return failed(
              Error(te, fmt::format("GUP: cannot pin pfn {:#x} of {}: poisoned", pfn, pg->name())));
        }
        if (strict) {
          return failed(Error(
              te, fmt::format("GUP: cannot {} pfn {:#x} (at {:#x}) of {}: {}",
                              pin() ? "pin" : "reference", pfn, addr, pg->name(), errc_name(te))));
        }
        return 0;
      }
      PGMAP_YIELD_POINT("gup.before_recheck");
      sanitizer::full_fence();  // our reference before the re-read
      if (s->entry->load(std::memory_order_acquire) != e) {
        (void)drop_run(run, pin());  // zapped meanwhile: the slow path faults it again
        return 0;
      }
      GupPage* o = out_.append(len);
      for (std::uint64_t i = 0; i < len; ++i)
        o[i] = GupPage{pfn + i, pg};
      return len;
    }

    // A PTE table: read its entries directly. One pagemap per call: an entry of another pagemap
    // ends it, and the next call starts there (with that pagemap's checks).
    std::array<Pfn, PageTable::kEntries> pfns;
    DevPagemap* const pg = s->pgmap[0].load(std::memory_order_acquire);
    bool consecutive = true;  // pfns[i] == pfns[0] + i (a device mapped in order)
    for (; n < count; ++n) {
      const std::atomic<std::uint64_t>& slot = s->entry[n];
      const std::uint64_t e = slot.load(std::memory_order_acquire);
      if (!pte::leaf(e)) break;
      if (s->pgmap[n].load(std::memory_order_acquire) != pg) break;
      if (slot.load(std::memory_order_acquire) != e) break;
      if (n == 0) {
        if (!usable(e, pg, pte::pfn(e), s->addr)) break;
      } else if (write() && !pte::writable(e)) {
        break;
      }
      seen[n] = e;
      pfns[n] = pte::pfn(e);
      consecutive &= pfns[n] == pfns[0] + n;
    }
    if (n == 0) {
      if (err_) return kFailed;
      return 0;
    }

    // The entries were read locklessly; their references are not taken yet. One batch: one
    // refcount operation per folio (consecutive pages of a large folio share one).
    PGMAP_YIELD_POINT("gup.after_walk");
    DevPagemap::BatchResult taken;
    Errc e = consecutive ? take_batch(pg, PfnRange{pfns[0], n}, &taken)
                         : take_batch(pg, std::span<const Pfn>(pfns.data(), n), &taken);
    if (e == Errc::out_of_range && taken.done == 0) [[unlikely]] {
      // An entry outside its pagemap (the batch refused as a whole): keep those before it.
      std::uint64_t k = 0;
      while (k < n && pg->contains(pfns[k]))
        ++k;
      if (k == 0) {
        if (strict) return failed(dead("is outside its pagemap", pfns[0], s->addr));
        return 0;
      }
      n = k;
      e = take_batch(pg, std::span<const Pfn>(pfns.data(), n), &taken);
    }
    stats_.folio_atomics += taken.atomics;
    if (taken.done == 0) {
      // The first page could not be had: an error, or the slow path for it.
      if (e == Errc::poisoned) {
        return failed(Error(
            e, fmt::format("GUP: cannot pin pfn {:#x} of {}: poisoned", pfns[0], pg->name())));
      }
      if (strict) {
        return failed(Error(
            e, fmt::format("GUP: cannot {} pfn {:#x} (at {:#x}) of {}: {}",
                           pin() ? "pin" : "reference", pfns[0], addr, pg->name(), errc_name(e))));
      }
      return 0;
    }
    // What failed after the first page is found again by the next walk from there.
    n = taken.done;

    // Re-read every entry from the same table page: a concurrent zap may have dropped the
    // mapping's reference between our read and our reference, and the page may be reused.
    PGMAP_YIELD_POINT("gup.before_recheck");
    sanitizer::full_fence();  // our references before the re-reads
    std::uint64_t good = n;
    for (std::uint64_t i = 0; i < n; ++i) {
      if (s->entry[i].load(std::memory_order_acquire) != seen[i]) [[unlikely]] {
        good = i;
        break;
      }
    }
    if (good < n) [[unlikely]] {
      // Give back what lies at or after the first changed entry: references this call just took
      // (cannot underflow; the ones kept still hold the pagemap).
      (void)drop_batch(pg, std::span<const Pfn>(pfns.data() + good, n - good));
    }
    GupPage* o = out_.append(good);
    for (std::uint64_t i = 0; i < good; ++i)
      o[i] = GupPage{pfns[i], pg};
    return good;
  }

  template <typename Pfns>  // std::span<const Pfn> or PfnRange
  Errc take_batch(DevPagemap* pg, Pfns pfns, DevPagemap::BatchResult* r) noexcept {
    return pin() ? pg->pin_folios(pfns, r) : pg->get_folios(pfns, r);
  }
  Errc drop_batch(DevPagemap* pg, std::span<const Pfn> pfns) noexcept {
    return pin() ? pg->unpin_folios(pfns) : pg->put_folios(pfns);
  }

  // mmap_lock shared: check the VMA, fault the page in, take it (and what follows it).
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
    // Only the pages of this VMA: the next one may need its own checks.
    max = std::min(max, (vma->end - addr) >> kPageShift);
    for (;;) {
      SignalInfo sig = as_.handle_fault_locked(addr, write());
      if (sig) {
        return Error(sig.signal == Signal::sigbus ? Errc::dead : Errc::out_of_range,
                     fmt::format("GUP: {} {} at {:#x}: {}", signal_name(sig.signal),
                                 sig_code_name(sig.code), sig.addr, sig.why));
      }
      const std::uint64_t got = walk(addr, max, true);
      if (got == kFailed) return *err_;
      if (got > 0) return got;
      // Zapped again between the fault and the walk (unmap_mapping_range): fault again.
    }
  }

  AddressSpace& as_;
  const PageTable& pt_;
  const std::uint32_t flags_;
  GupStats& stats_;
  detail::PageBuffer& out_;
  DevPagemap* live_ = nullptr;  // the last pagemap found live by this call
  std::optional<Error> err_;    // why a walk returned kFailed
  bool done_ = false;
};

[[gnu::cold, gnu::noinline]] Errc bad_args(std::uint64_t start, std::uint64_t nr_pages,
                                           std::uint32_t flags, std::string* why) {
  std::string msg;
  Errc e = Errc::invalid_argument;
  if (!is_aligned(start, kPageSize)) {
    msg = fmt::format("GUP: unaligned start {:#x}", start);
  } else if ((flags & kFollLongterm) != 0 && (flags & kFollPin) == 0) {
    msg = "GUP: FOLL_LONGTERM is only valid with FOLL_PIN";
  } else if ((flags & ~(kFollWrite | kFollPin | kFollLongterm | kFollFastOnly)) != 0) {
    msg = fmt::format("GUP: unknown flags {:#x}", flags);
  } else {
    msg = fmt::format("GUP: range of {} pages from {:#x} past the task size", nr_pages, start);
    e = Errc::out_of_range;
  }
  if (why != nullptr) *why = std::move(msg);
  return e;
}

// The checks of bad_args, without a message (the common path: everything fine).
inline Errc check_args(std::uint64_t start, std::uint64_t nr_pages, std::uint32_t flags,
                       std::string* why) {
  const bool ok = is_aligned(start, kPageSize) &&
                  ((flags & kFollLongterm) == 0 || (flags & kFollPin) != 0) &&
                  (flags & ~(kFollWrite | kFollPin | kFollLongterm | kFollFastOnly)) == 0 &&
                  // start + nr_pages * 4 KiB without overflow, inside the task size.
                  nr_pages <= (AddressSpace::kTaskSize >> kPageShift) &&
                  start <= AddressSpace::kTaskSize - (nr_pages << kPageShift);
  if (ok) [[likely]]
    return Errc::ok;
  return bad_args(start, nr_pages, flags, why);
}

// What one_page_fast found.
enum class FastResult {
  taken,     // the page is in the set
  fallback,  // not a case for it: nothing was tried that has an effect (Gup::run from the start)
  slow,      // the reference was refused or the entry changed: the page needs the slow path
  poisoned,  // FOLL_PIN of a poisoned folio (the error the general walk gives at once)
};

// The lockless walk for a call of one 4 KiB-mapped page, the case whose cost is all fixed
// overhead: the same steps as Gup::walk_table's PTE path (load the entry, its pagemap between two
// equal loads, the pagemap's liveness and the FOLL_LONGTERM/fsdax refusal, the reference, a full
// fence, the re-check against the same slot) and the same outcomes, without the machinery for
// many pages. No PTE table, a huge leaf, or an entry not usable as it is: `fallback`, and
// Gup::run makes the call from the start. A refused reference or a changed entry (given back):
// `slow`, where walk_table would also have sent the page to the slow path. Stats are counted only
// for a page taken (a fallback leaves them to Gup).
[[gnu::cold, gnu::noinline]] void poisoned_why(Pfn pfn, const DevPagemap& pg, std::string* why) {
  if (why != nullptr)
    *why = fmt::format("GUP: cannot pin pfn {:#x} of {}: poisoned", pfn, pg.name());
}

// `why` (may be null): the message of a `poisoned` result.
FastResult one_page_fast(detail::PageBuffer& out, AddressSpace& as, std::uint64_t addr,
                         std::uint32_t flags, GupStats* stats, std::string* why,
                         DevPagemap** live) {
  const bool pin = (flags & kFollPin) != 0;
  const PageTable& pt = detail::GupAccess::page_table(as);
  rcu::ReadGuard guard;
  const auto s = pt.slots(addr);
  if (!s || s->depth != 0) return FastResult::fallback;
  const std::uint64_t e = s->entry->load(std::memory_order_acquire);
  if (!pte::leaf(e) || ((flags & kFollWrite) != 0 && !pte::writable(e))) {
    return FastResult::fallback;
  }
  DevPagemap* const pg = s->pgmap->load(std::memory_order_acquire);
  if (pg == nullptr || s->entry->load(std::memory_order_acquire) != e) return FastResult::fallback;
  if (pg->state() != DevPagemap::State::live) return FastResult::fallback;
  if ((flags & kFollLongterm) != 0 && pg->type() == PagemapType::fs_dax) {
    return FastResult::fallback;
  }
  const Pfn pfn = pte::pfn(e);
  *live = pg;
  // The entry was read locklessly; its reference is not taken yet.
  PGMAP_YIELD_POINT("gup.after_walk");
  if (Errc te = pin ? pg->pin_folio(pfn) : pg->get_folio(pfn); te != Errc::ok) [[unlikely]] {
    if (stats != nullptr) ++stats->pagemap_lookups;  // as walk_table counts its liveness check
    if (te != Errc::poisoned) return FastResult::slow;
    poisoned_why(pfn, *pg, why);
    return FastResult::poisoned;
  }
  PGMAP_YIELD_POINT("gup.before_recheck");
  sanitizer::full_fence();  // our reference before the re-read
  if (s->entry->load(std::memory_order_acquire) != e) [[unlikely]] {
    // Zapped meanwhile: give back the reference this call just took (it cannot underflow).
    (void)(pin ? pg->unpin_folio(pfn) : pg->put_folio(pfn));
    if (stats != nullptr) {
      ++stats->pagemap_lookups;
      ++stats->folio_atomics;
    }
    return FastResult::slow;
  }
  *out.append(1) = GupPage{pfn, pg};
  if (stats != nullptr) {
    ++stats->fast;
    ++stats->folio_atomics;
    ++stats->pagemap_lookups;
  }
  return FastResult::taken;
}

// `why` (may be null): the error's message.
Errc gup_into(detail::PageBuffer& out, AddressSpace& as, std::uint64_t start,
              std::uint64_t nr_pages, std::uint32_t flags, GupStats* stats, std::string* why) {
  if (!out.empty()) {
    if (why != nullptr) *why = "GUP: the page set to fill is not empty";
    return Errc::invalid_argument;
  }
  if (Errc e = check_args(start, nr_pages, flags, why); e != Errc::ok) return e;
  FastResult fast = FastResult::fallback;
  DevPagemap* live = nullptr;
  if (nr_pages == 1) {
    fast = one_page_fast(out, as, start, flags, stats, why, &live);
    if (fast == FastResult::taken) [[likely]]
      return Errc::ok;
    if (fast == FastResult::poisoned) return Errc::poisoned;
  }
  GupStats local;
  Gup gup(as, flags, stats != nullptr ? *stats : local, out);
  return fast == FastResult::slow ? gup.run(start, nr_pages, why, true, live)
                                  : gup.run(start, nr_pages, why);
}

}  // namespace

namespace {

// Keeps the first error seen.
struct FirstError {
  Errc result = Errc::ok;
  void operator()(Errc e) noexcept {
    if (e != Errc::ok && result == Errc::ok) result = e;
  }
};

// Releases `run` (entries of pg), reporting each failure to `note`: an entry that does not hold
// what it should is reported (once) and skipped; the others are still released. After teardown
// each entry reports its late access, as a single unpin would.
void release_list(DevPagemap* pg, std::span<const Pfn> run, bool pin, FirstError& note) noexcept {
  while (!run.empty()) {
    DevPagemap::BatchResult r;
    const Errc e = pin ? pg->unpin_folios(run, &r) : pg->put_folios(run, &r);
    if (e == Errc::ok) return;
    note(e);
    if (e == Errc::out_of_range && r.done == 0) [[unlikely]] {
      // Refused as a whole (an entry outside the pagemap): one by one.
      for (const Pfn p : run)
        note(pin ? pg->unpin_folio(p) : pg->put_folio(p));
      return;
    }
    run = run.subspan(r.done + 1);
  }
}

// The entries of one pagemap that are not consecutive pfns: one list batch.
[[gnu::noinline]] void release_scattered(DevPagemap* pg, std::span<const GupPage> run, bool pin,
                                         FirstError& note) noexcept {
  std::array<Pfn, PageTable::kEntries> pfns;
  for (std::size_t j = 0; j < run.size(); ++j)
    pfns[j] = run[j].pfn;
  release_list(pg, std::span<const Pfn>(pfns.data(), run.size()), pin, note);
}

// A range batch that failed at entry r.done with e: that entry is reported, the rest go as a list.
[[gnu::cold, gnu::noinline]] void release_range_failed(DevPagemap* pg, PfnRange all,
                                                       const DevPagemap::BatchResult& r, Errc e,
                                                       bool pin, FirstError& note) noexcept {
  note(e);
  if (e == Errc::out_of_range && r.done == 0) {
    for (std::uint64_t j = 0; j < all.count; ++j)
      note(pin ? pg->unpin_folio(all.start + j) : pg->put_folio(all.start + j));
    return;
  }
  std::array<Pfn, PageTable::kEntries> pfns;
  const std::uint64_t from = r.done + 1;
  for (std::uint64_t j = from; j < all.count; ++j)
    pfns[j - from] = all.start + j;
  release_list(pg, std::span<const Pfn>(pfns.data(), all.count - from), pin, note);
}

}  // namespace

Errc detail::release_pages(std::span<const GupPage> pages, PageSetKind kind) noexcept {
  const bool pin = kind == PageSetKind::pinned;
  if (pages.size() == 1 && pages[0].pgmap != nullptr) {
    // A batch of one entry is the single operation (and the set's most common size).
    DevPagemap* const pg = pages[0].pgmap;
    return pin ? pg->unpin_folio(pages[0].pfn) : pg->put_folio(pages[0].pfn);
  }
  FirstError note;
  std::size_t i = 0;
  while (i < pages.size()) {
    DevPagemap* const pg = pages[i].pgmap;
    if (pg == nullptr) [[unlikely]] {
      note(Errc::invalid_argument);
      ++i;
      continue;
    }
    // The entries of one pagemap, up to a table's worth: one batch (one operation per folio).
    const std::size_t from = i;
    const std::size_t most = from + std::min<std::size_t>(pages.size() - from, PageTable::kEntries);
    const Pfn first = pages[i].pfn;
    bool consecutive = true;
    for (++i; i < most && pages[i].pgmap == pg; ++i)
      consecutive &= pages[i].pfn == first + (i - from);
    if (consecutive) [[likely]] {
      // The common case (a device mapped in order): a range, no list to build or search.
      DevPagemap::BatchResult r;
      const PfnRange all{first, i - from};
      const Errc e = pin ? pg->unpin_folios(all, &r) : pg->put_folios(all, &r);
      if (e != Errc::ok) [[unlikely]]
        release_range_failed(pg, all, r, e, pin, note);
      continue;
    }
    release_scattered(pg, pages.subspan(from, i - from), pin, note);
  }
  return note.result;
}

template class PageSet<PageSetKind::pinned>;
template class PageSet<PageSetKind::referenced>;

// The `_into` forms return only the code: no message is built.
Errc get_user_pages_into(ReferencedPages& out, AddressSpace& as, std::uint64_t start,
                         std::uint64_t nr_pages, std::uint32_t flags, GupStats* stats) {
  if ((flags & kFollPin) != 0) return Errc::invalid_argument;  // pins: pin_user_pages
  return gup_into(detail::GupAccess::pages(out), as, start, nr_pages, flags, stats, nullptr);
}

Errc pin_user_pages_into(PinnedPages& out, AddressSpace& as, std::uint64_t start,
                         std::uint64_t nr_pages, std::uint32_t flags, GupStats* stats) {
  return gup_into(detail::GupAccess::pages(out), as, start, nr_pages, flags | kFollPin, stats,
                  nullptr);
}

Result<ReferencedPages> get_user_pages(AddressSpace& as, std::uint64_t start,
                                       std::uint64_t nr_pages, std::uint32_t flags,
                                       GupStats* stats) {
  if ((flags & kFollPin) != 0) {
    return Error(Errc::invalid_argument,
                 "get_user_pages: FOLL_PIN is not a plain reference (use pin_user_pages)");
  }
  ReferencedPages set;
  std::string why;
  if (Errc e = gup_into(detail::GupAccess::pages(set), as, start, nr_pages, flags, stats, &why);
      e != Errc::ok) {
    return Error(e, std::move(why));
  }
  return set;
}

Result<PinnedPages> pin_user_pages(AddressSpace& as, std::uint64_t start, std::uint64_t nr_pages,
                                   std::uint32_t flags, GupStats* stats) {
  PinnedPages set;
  std::string why;
  if (Errc e = gup_into(detail::GupAccess::pages(set), as, start, nr_pages, flags | kFollPin, stats,
                        &why);
      e != Errc::ok) {
    return Error(e, std::move(why));
  }
  return set;
}

}  // namespace pgmap::mm
