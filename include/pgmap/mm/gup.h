// GUP: get_user_pages / pin_user_pages on simulated address spaces (mm/gup.c).
//
// For each page of [start, start + nr_pages * 4 KiB) the caller gets a reference on the folio
// mapped there: a plain reference (FOLL_GET, the default) or a DMA pin (FOLL_PIN: +kPinBias on a
// small folio's refcount, +1 refcount and +1 exact pincount on a large one). A 2 MiB or 1 GiB
// folio covered by several requested pages gets ONE atomic for all of them (refs/pins added in one
// operation), not one per 4 KiB page.
//
// Fast path: walks the page table locklessly (no mmap_lock), takes the folio reference, then
// re-reads the entry; if it changed (a concurrent zap), the reference is dropped and the page goes
// to the slow path. Slow path: takes mmap_lock shared, faults the page in through its VMA (with
// FOLL_WRITE a write fault), and retries. The pagemap of consecutive pfns is looked up once and
// cached across the walk (get_dev_pagemap with the cached argument; the kernel measured 1.04 s ->
// 0.38 s for 12 GiB with that fix).
//
// FOLL_LONGTERM is refused with Errc::not_supported on fsdax VMAs (kVmFsDax; I9, bug 5.2) and
// allowed on devdax. Failure midway (a hole, a signal, a dead pagemap) drops every reference taken
// by the call and every pagemap reference — nothing leaks (bug 5.12) — and returns the error; the
// SignalInfo of a failed fault is in the Error message.
//
// Errors: Errc::invalid_argument (start not page aligned, FOLL_LONGTERM without FOLL_PIN),
// Errc::not_supported (FOLL_LONGTERM on fsdax), Errc::out_of_range (the fault would raise SIGSEGV:
// no VMA, or FOLL_WRITE on a read-only one), Errc::dead (SIGBUS from the owner, or the page's
// pagemap is being torn down; the kernel returns -EFAULT for these), Errc::poisoned (FOLL_PIN of
// a poisoned folio), Errc::busy (kFollFastOnly and a page needed the slow path).
#pragma once

#include <cstdint>
#include <vector>

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
  std::uint64_t pagemap_lookups = 0;  // get_dev_pagemap calls that missed the cache
};

// Returns one GupPage per requested page, in address order.
Result<std::vector<GupPage>> get_user_pages(AddressSpace& as, std::uint64_t start,
                                            std::uint64_t nr_pages, std::uint32_t flags,
                                            GupStats* stats = nullptr);
inline Result<std::vector<GupPage>> pin_user_pages(AddressSpace& as, std::uint64_t start,
                                                   std::uint64_t nr_pages, std::uint32_t flags,
                                                   GupStats* stats = nullptr) {
  return get_user_pages(as, start, nr_pages, flags | kFollPin, stats);
}

// Drops pins taken with FOLL_PIN (batched per folio run). Errc::underflow (misuse reported) for a
// page that is not pinned; the remaining pages are still unpinned.
Errc unpin_user_pages(const std::vector<GupPage>& pages);
// Drops plain references (FOLL_GET).
Errc put_pages(const std::vector<GupPage>& pages);

}  // namespace pgmap::mm
