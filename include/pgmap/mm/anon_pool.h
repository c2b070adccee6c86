// AnonPool: the anonymous memory of simulated processes (the kernel's page allocator as seen by
// do_anonymous_page / wp_page_copy): the 4 KiB pages that copy-on-write of a MAP_PRIVATE mapping
// puts in place of the file's pages. They belong to the address spaces that map them, never to a
// device or a file: a device removal, a truncate's wait for idle pages or a pagemap teardown of a
// device never waits for them, and the file never sees their bytes.
//
// Frames and metadata. The pool is one process-wide sparse anonymous backing (MAP_NORESERVE, so
// it costs nothing until pages are used) described by an internal PRIVATE-type pagemap. The
// pagemap is only the pool's frame allocator and page metadata carrier — refcount, mapcount and
// pincount work exactly as for device pages, so the page table, GUP (FOLL_PIN / FOLL_GET) and the
// release paths treat an anonymous page like any other folio of order 0. The pool is never torn
// down (it lives until the process exits), so its pages need no liveness strategy (`none`).
//
// Lifetime of a page. alloc() hands out a page with refcount 1 (the caller's PageRef); each
// page-table entry mapping it holds one reference and one mapcount, each GUP pin or reference one
// more. When the last reference goes the pagemap's page_free returns the frame to the pool's free
// list: munmap, exit (AddressSpace destruction) and zaps free anonymous pages by dropping their
// entries' references. in_use() counts pages handed out and not yet freed.
//
// When to use: only the mm layer allocates from it (copy-on-write). Alternatives: a test that needs
// device-like memory uses a DevPagemap of its own.
//
// Thread safety: every member is thread-safe. alloc() takes the pool's mutex briefly; page_free
// (on whichever thread drops the last reference) takes it too. Lock order: the pool's mutex is
// innermost (nothing is called while it is held).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_ref.h"

namespace pgmap::mm {

class AnonPool {
 public:
  // 1 GiB of sparse frames: 262144 pages.
  static constexpr std::uint64_t kPoolBytes = std::uint64_t{1} << 30;

  // The process-wide pool, created on first use. Errors creating it (no address space for the
  // backing) make every alloc() fail with Errc::no_memory.
  static AnonPool& global();
  // Whether pg is the pool's pagemap (an anonymous page). Cheap; never creates the pool.
  static bool is_anon(const DevPagemap* pg) noexcept {
    return pg != nullptr && pg == anon_pagemap_.load(std::memory_order_acquire);
  }
  // The pool's pagemap if the pool exists (diagnostics: the invariant checker's universe).
  static DevPagemap* pagemap_if_created() noexcept {
    return anon_pagemap_.load(std::memory_order_acquire);
  }

  // A fresh page holding one reference (the caller's), filled with a copy of the 4 KiB at `src`,
  // or with zeros if src is null. Errc::no_memory when the pool is exhausted (Linux would OOM).
  Result<PageRef> alloc(const std::byte* src);
  // Bytes of a pool page (valid while a reference is held).
  std::byte* address_of(Pfn pfn) const noexcept { return pgmap_->address_of(pfn); }

  std::uint64_t in_use() const noexcept { return in_use_.load(std::memory_order_acquire); }
  std::uint64_t allocated_total() const noexcept {
    return allocated_.load(std::memory_order_relaxed);
  }

  AnonPool(const AnonPool&) = delete;
  AnonPool& operator=(const AnonPool&) = delete;

 private:
  AnonPool();
  void page_free(Pfn pfn) noexcept;

  static std::atomic<DevPagemap*> anon_pagemap_;
  std::shared_ptr<DevPagemap> pgmap_;
  Pfn base_ = 0;
  std::uint64_t npages_ = 0;
  std::mutex mu_;
  std::vector<Pfn> free_;   // freed frames (mu_)
  std::uint64_t next_ = 0;  // frames never handed out start here (mu_)
  std::atomic<std::uint64_t> in_use_{0};
  std::atomic<std::uint64_t> allocated_{0};
};

}  // namespace pgmap::mm
