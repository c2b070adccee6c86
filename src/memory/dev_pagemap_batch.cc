// DevPagemap's batched folio operations (get_folios / put_folios / pin_folios / unpin_folios).
//
// A batch is defined as the single operations of dev_pagemap.cc applied to its entries in order,
// stopping at the first failure; this file only removes what they repeat per call. The torn-down
// check is made once before anything is touched (the strategies' own check after each atomic
// still catches a teardown that races the batch, exactly as it does for a single operation); the
// strategy is dispatched once and its inline get/put run in the loop; the page array is resolved
// once per run of entries inside one range. Per entry what remains is the folio's order (one byte
// of the cold metadata), the poison flag for a pin, and the refcount operation itself.
//
// Large folios: consecutive entries that are consecutive pages of one folio of more than one
// page (and, for pins, a folio pinned with the exact pincount) form one refcount operation of n,
// as pin_folio(p, n) would. If that operation fails, it is redone page by page, so that what is
// held afterwards is exactly what n single calls would have left (for instance an unpin of more
// pages than are pinned drops the pins that exist, then reports the underflow).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "memory/strategy/strategy_ops.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"

namespace pgmap {
namespace {

enum BatchOp : int { kGet, kPut, kPin, kUnpin };

// per_lookup's folio half (strategy/per_lookup.h without its pagemap references): under
// per_lookup every folio reference carries one pagemap reference, and a batch takes or drops all
// of them in one go instead of once per folio. Gets: one tryget_live before the first folio (the
// liveness check every single get makes; it keeps the pagemap while the batch runs), then
// get_many for the rest of the references the folios took. Puts: the folio puts (page_free at
// zero while the pagemap references are still held), then one put_many. The pagemap reference
// count after the batch is exactly that of the single calls.
struct PerLookupFolios {
  static Errc get(DevPagemap& pg, PageArray& a, std::uint64_t head, std::uint32_t refs) noexcept {
    return strategy_impl::plain_get(pg, a.ref(head), refs);
  }
  static Errc put(DevPagemap& pg, PageArray& a, std::uint64_t head, std::uint32_t refs) noexcept {
    bool last = false;
    Errc e = strategy_impl::plain_put(pg, a.ref(head), refs, &last);
    // As `none`'s put: the free path's calls out of line, so that the batch loop keeps no
    // registers live across them (with free_after_put inline, 512-page GUP cost 1.17-1.19x
    // `none`'s per page).
    if (last && strategy_impl::free_path_has_work(pg)) [[unlikely]]
      return strategy_impl::none_free(pg, a, head);
    return e;
  }
};

constexpr bool is_pin_op(int op) {
  return op == kPin || op == kUnpin;
}

// The entries of a batch: a list of pfns, or consecutive pfns (entry i = start + i).
struct PfnList {
  static constexpr bool kConsecutive = false;
  std::span<const Pfn> pfns;
  std::size_t size() const noexcept { return pfns.size(); }
  Pfn operator[](std::size_t i) const noexcept { return pfns[i]; }
};
struct PfnRun {
  static constexpr bool kConsecutive = true;
  PfnRange range;
  std::size_t size() const noexcept { return range.count; }
  Pfn operator[](std::size_t i) const noexcept { return range.start + i; }
};

}  // namespace

template <int kOp, typename Pages>
Errc DevPagemap::folio_batch(const Pages& pages, BatchResult* result) noexcept {
  BatchResult local;
  BatchResult& r = result != nullptr ? *result : local;
  r = BatchResult{};
  const std::size_t n = pages.size();
  if (n == 0) return Errc::ok;
  if (torn_down()) [[unlikely]]
    return torn_down_access(pages[0]);
  // Bad input first, before any reference moves. The common case, every entry in the first
  // range, is a branch-free min/max over the entries and one range check.
  {
    Pfn min = pages[0];
    Pfn max = pages[0];
    if constexpr (Pages::kConsecutive) {
      // Only the wrap needs a check of its own: a run that does not wrap and leaves the first
      // range is checked entry by entry below, which stops at the first pfn no range holds.
      if (n - 1 > ~Pfn{0} - min) return Errc::out_of_range;
      max = min + (n - 1);
    } else {
      // Four independent accumulators (scalars, so that they stay in registers): the compare
      // chains overlap instead of queueing.
      Pfn lo0 = pages[0], lo1 = lo0, lo2 = lo0, lo3 = lo0;
      Pfn hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
      std::size_t k = 0;
      for (; k + 4 <= n; k += 4) {
        const Pfn p0 = pages[k], p1 = pages[k + 1], p2 = pages[k + 2], p3 = pages[k + 3];
        lo0 = p0 < lo0 ? p0 : lo0;
        lo1 = p1 < lo1 ? p1 : lo1;
        lo2 = p2 < lo2 ? p2 : lo2;
        lo3 = p3 < lo3 ? p3 : lo3;
        hi0 = p0 > hi0 ? p0 : hi0;
        hi1 = p1 > hi1 ? p1 : hi1;
        hi2 = p2 > hi2 ? p2 : hi2;
        hi3 = p3 > hi3 ? p3 : hi3;
      }
      for (; k < n; ++k) {
        lo0 = pages[k] < lo0 ? pages[k] : lo0;
        hi0 = pages[k] > hi0 ? pages[k] : hi0;
      }
      min = std::min({lo0, lo1, lo2, lo3});
      max = std::max({hi0, hi1, hi2, hi3});
    }
    const PfnRange first = first_array_->range();
    if (min < first.start || max >= first.end()) [[unlikely]] {
      for (std::size_t q = 0; q < n; ++q) {
        if (!contains(pages[q])) return Errc::out_of_range;
      }
    }
  }

  // The strategy's body is inlined into each entry point (one switch, no call per batch).
  return strategy_impl::dispatch(
      strategy_, [&](auto strategy) __attribute__((always_inline))->Errc {
        constexpr bool kPerLookup =
            std::is_same_v<decltype(strategy), strategy_impl::PerLookupStrategy>;
        using S = std::conditional_t<kPerLookup, PerLookupFolios, decltype(strategy)>;
        std::uint64_t refs_moved = 0;  // per_lookup: the pagemap references the folios carry
        // One refcount operation on the folio at `head` for `m` pages. `bias`: a small folio's pin
        // (m == 1). Errors and effects are those of the single operation.
        auto one = [&](PageArray & a, std::uint64_t head, std::uint32_t m, bool bias)
            __attribute__((always_inline)) {
          if constexpr (kOp == kGet) {
            Errc e = S::get(*this, a, head, m);
            if (e == Errc::ok) refs_moved += m;
            return e;
          } else if constexpr (kOp == kPut) {
            Errc e = S::put(*this, a, head, m);
            if (e == Errc::ok) refs_moved += m;
            return e;
          } else if constexpr (kOp == kPin) {
            if ((a.flags(head).load(std::memory_order_acquire) & kPagePoisoned) != 0) [[unlikely]]
              return Errc::poisoned;
            if (bias) {
              Errc e = S::get(*this, a, head, PageArray::kPinBias);
              if (e == Errc::ok) refs_moved += PageArray::kPinBias;
              return e;
            }
            Errc e = S::get(*this, a, head, m);
            if (e == Errc::ok) {
              a.pincount(head).fetch_add(m, std::memory_order_acq_rel);
              refs_moved += m;
            }
            return e;
          } else {
            if (bias) {
              const std::uint32_t v = a.ref(head).load(std::memory_order_acquire);
              if (v < PageArray::kPinBias || v > PageArray::kMaxRef) [[unlikely]] {
                if (torn_down()) return late_access();
                if (v > PageArray::kMaxRef && v != strategy_impl::kFreeingRef) return late_access();
                report_misuse(Errc::underflow,
                              "DevPagemap::unpin_folios of a folio that is not pinned");
                return Errc::underflow;
              }
              Errc e = S::put(*this, a, head, PageArray::kPinBias);
              if (e == Errc::ok) refs_moved += PageArray::kPinBias;
              return e;
            }
            std::atomic<std::uint32_t>& pc = a.pincount(head);
            std::uint32_t old = pc.load(std::memory_order_relaxed);
            do {
              if (old < m) [[unlikely]] {
                if (torn_down()) return late_access();
                report_misuse(Errc::underflow,
                              "DevPagemap::unpin_folios of a folio that is not pinned");
                return Errc::underflow;
              }
            } while (!pc.compare_exchange_weak(old, old - m, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
            Errc e = S::put(*this, a, head, m);
            if (e == Errc::ok) refs_moved += m;
            return e;
          }
        };

        // Whether one operation of m pages on a multi-page folio would succeed where m single ones
        // would: checked without side effects first, so that a run that cannot be goes page by page
        // at once and reports (misuse, late access) exactly what the single calls report.
        auto run_fits = [](PageArray& a, std::uint64_t head, std::uint32_t m) -> bool {
          const std::uint32_t v = a.ref(head).load(std::memory_order_relaxed);
          if constexpr (kOp == kGet || kOp == kPin) {
            return v <= PageArray::kMaxRef - m;
          } else if constexpr (kOp == kPut) {
            return v >= m && v <= PageArray::kMaxRef;
          } else {
            return v >= m && v <= PageArray::kMaxRef &&
                   a.pincount(head).load(std::memory_order_relaxed) >= m;
          }
        };

        auto loop = [&]() __attribute__((always_inline)) {
          std::size_t i = 0;
          while (i < n) {
            // A new run of entries in one range (the first array inline, others out of line).
            PageArray* const ap = locate(pages[i]).array;
            PageArray& a = *ap;  // validated above: every entry is in some range
            const unsigned base = a.base_order();
            do {
              const Pfn pfn = pages[i];
              const std::uint64_t idx = a.index_of(pfn);
              const unsigned ord = a.order(idx);
              const std::uint64_t head = ord == base ? idx : a.head_of(idx);
              const bool bias = is_pin_op(kOp) && ord <= 1;
              std::uint32_t m = 1;
              if (!bias && ord > 0) {
                // Consecutive pages of one multi-page folio: one operation for all of them.
                const Pfn folio_end = a.pfn_of(head) + order_pages(ord);
                if constexpr (Pages::kConsecutive) {
                  m = static_cast<std::uint32_t>(std::min<std::uint64_t>(n - i, folio_end - pfn));
                } else {
                  while (i + m < n && pages[i + m] == pfn + m && pfn + m < folio_end)
                    ++m;
                }
              }
              Errc e = m == 1 || run_fits(a, head, m) ? one(a, head, m, bias) : Errc::underflow;
              if (e != Errc::ok) [[unlikely]] {
                if (m == 1) return e;
                // The run as a whole cannot be (or failed and changed nothing): page by page, so
                // that exactly what single calls would leave is held and reported.
                for (std::uint32_t j = 0; j < m; ++j) {
                  if (Errc e1 = one(a, head, 1, false); e1 != Errc::ok) return e1;
                  ++r.done;
                  ++r.atomics;
                }
                i += m;
                if (i == n) return Errc::ok;
                continue;
              }
              r.done += m;
              ++r.atomics;
              i += m;
              // A put may have dropped what kept the pagemap alive: nothing of it is touched after
              // the last entry (the entries still to come are references the caller holds).
              if (i == n) return Errc::ok;
              PGMAP_YIELD_POINT("pagemap.batch_next_folio");
            } while (a.contains(pages[i]));
            if (torn_down()) [[unlikely]]
              return torn_down_access(pages[i]);  // between ranges, as a single operation would
          }
          return Errc::ok;
        };

        if constexpr (!kPerLookup) {
          return loop();
        } else if constexpr (kOp == kGet || kOp == kPin) {
          if (!ref_.tryget_live()) [[unlikely]]
            return torn_down() ? late_access() : Errc::dead;
          const Errc e = loop();
          // We hold one reference: neither call can fail.
          if (refs_moved > 1) (void)ref_.get_many(refs_moved - 1);
          if (refs_moved == 0) (void)ref_.put();
          return e;
        } else {
          const Errc e = loop();
          // Each dropped folio reference carried a pagemap reference; the pagemap may be gone after
          // this (an underflow is reported by the ref itself).
          if (refs_moved > 0) (void)ref_.put_many(refs_moved);
          return e;
        }
      });
}

Errc DevPagemap::get_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kGet>(PfnList{pages}, result);
}

Errc DevPagemap::get_folios(PfnRange pages, BatchResult* result) noexcept {
  return folio_batch<kGet>(PfnRun{pages}, result);
}

Errc DevPagemap::put_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kPut>(PfnList{pages}, result);
}

Errc DevPagemap::put_folios(PfnRange pages, BatchResult* result) noexcept {
  return folio_batch<kPut>(PfnRun{pages}, result);
}

Errc DevPagemap::pin_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kPin>(PfnList{pages}, result);
}

Errc DevPagemap::pin_folios(PfnRange pages, BatchResult* result) noexcept {
  return folio_batch<kPin>(PfnRun{pages}, result);
}

Errc DevPagemap::unpin_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kUnpin>(PfnList{pages}, result);
}

Errc DevPagemap::unpin_folios(PfnRange pages, BatchResult* result) noexcept {
  return folio_batch<kUnpin>(PfnRun{pages}, result);
}

}  // namespace pgmap
