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
#include <cstddef>
#include <cstdint>
#include <span>

#include "memory/strategy/strategy_ops.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"

namespace pgmap {
namespace {

enum BatchOp : int { kGet, kPut, kPin, kUnpin };

constexpr bool is_pin_op(int op) {
  return op == kPin || op == kUnpin;
}

}  // namespace

template <int kOp>
Errc DevPagemap::folio_batch(std::span<const Pfn> pages, BatchResult* result) noexcept {
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
    Pfn lo = pages[0];
    Pfn hi = pages[0];
    for (const Pfn p : pages) {
      lo = p < lo ? p : lo;
      hi = p > hi ? p : hi;
    }
    const PfnRange first = first_array_->range();
    if (lo < first.start || hi >= first.end()) [[unlikely]] {
      for (const Pfn q : pages) {
        if (!contains(q)) return Errc::out_of_range;
      }
    }
  }

  return strategy_impl::dispatch(strategy_, [&](auto s) -> Errc {
    using S = decltype(s);
    // One refcount operation on the folio at `head` for `m` pages. `bias`: a small folio's pin
    // (m == 1). Errors and effects are those of the single operation.
    auto one = [&](PageArray& a, std::uint64_t head, std::uint32_t m, bool bias) -> Errc {
      if constexpr (kOp == kGet) {
        return S::get(*this, a, head, m);
      } else if constexpr (kOp == kPut) {
        return S::put(*this, a, head, m);
      } else if constexpr (kOp == kPin) {
        if ((a.flags(head).load(std::memory_order_acquire) & kPagePoisoned) != 0) [[unlikely]]
          return Errc::poisoned;
        if (bias) return S::get(*this, a, head, PageArray::kPinBias);
        Errc e = S::get(*this, a, head, m);
        if (e == Errc::ok) a.pincount(head).fetch_add(m, std::memory_order_acq_rel);
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
          return S::put(*this, a, head, PageArray::kPinBias);
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
        return S::put(*this, a, head, m);
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
          while (i + m < n && pages[i + m] == pfn + m && pfn + m < folio_end)
            ++m;
        }
        Errc e = m == 1 || run_fits(a, head, m) ? one(a, head, m, bias) : Errc::underflow;
        if (e != Errc::ok) [[unlikely]] {
          if (m == 1) return e;
          // The run as a whole cannot be (or failed and changed nothing): page by page, so that
          // exactly what single calls would leave is held and reported.
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
        // A put may have dropped what kept the pagemap alive: nothing of it is touched after the
        // last entry (the entries still to come are references the caller holds).
        if (i == n) return Errc::ok;
        PGMAP_YIELD_POINT("pagemap.batch_next_folio");
      } while (a.contains(pages[i]));
      if (torn_down()) [[unlikely]]
        return torn_down_access(pages[i]);  // between ranges, as a single operation would
    }
    return Errc::ok;
  });
}

Errc DevPagemap::get_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kGet>(pages, result);
}

Errc DevPagemap::put_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kPut>(pages, result);
}

Errc DevPagemap::pin_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kPin>(pages, result);
}

Errc DevPagemap::unpin_folios(std::span<const Pfn> pages, BatchResult* result) noexcept {
  return folio_batch<kUnpin>(pages, result);
}

}  // namespace pgmap
