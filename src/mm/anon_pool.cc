#include "pgmap/mm/anon_pool.h"

#include <utility>

#include "memory/device_bytes.h"
#include "pgmap/memory/backing.h"

namespace pgmap::mm {

std::atomic<DevPagemap*> AnonPool::anon_pagemap_{nullptr};

AnonPool& AnonPool::global() {
  // Never destroyed: pages may still be referenced when static destructors run (a leaked address
  // space, a pin), and the pool must not wait for them at exit.
  static AnonPool* pool = new AnonPool();
  return *pool;
}

AnonPool::AnonPool() {
  BackingOptions bo;
  bo.size = kPoolBytes;
  bo.align = kPageSize;
  bo.hugepage_advice = false;
  bo.name = "pgmap-anon";
  auto backing = make_anonymous_backing(bo);
  if (!backing) return;
  std::shared_ptr<Backing> b = std::move(backing).value();
  MemremapParams p;
  p.type = PagemapType::private_mem;
  p.strategy = Strategy::none;  // never torn down: no liveness to protect
  p.ranges.push_back(PagemapRangeSpec{b, 0, 0});
  p.ops.page_free = [this](DevPagemap&, Pfn head, unsigned) { page_free(head); };
  p.owner = this;
  p.name = "anon";
  auto pg = memremap(std::move(p));
  if (!pg) return;
  pgmap_ = std::move(pg).value();
  base_ = pgmap_->range(0).start;
  npages_ = pgmap_->range(0).count;
  anon_pagemap_.store(pgmap_.get(), std::memory_order_release);
}

Result<PageRef> AnonPool::alloc(const std::byte* src) {
  if (!pgmap_) return Error(Errc::no_memory, "anonymous memory pool unavailable");
  Pfn pfn = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      pfn = free_.back();
      free_.pop_back();
    } else if (next_ < npages_) {
      pfn = base_ + next_++;
    } else {
      return Error(Errc::no_memory, "anonymous memory pool exhausted");
    }
  }
  // The frame is idle and ours alone: fill it before anyone can see it.
  std::byte* bytes = pgmap_->address_of(pfn);
  if (src != nullptr) {
    pgmap::detail::shared_copy(bytes, src, kPageSize);  // src may be a shared page
  } else {
    pgmap::detail::shared_fill(bytes, std::byte{0}, kPageSize);
  }
  // The pool owns the pagemap, so it may take the first reference of an idle folio.
  auto ref = PageRef::get(*pgmap_, pfn);
  if (!ref) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(pfn);
    return Error(ref.code(), "anonymous page: first reference refused");
  }
  in_use_.fetch_add(1, std::memory_order_acq_rel);
  allocated_.fetch_add(1, std::memory_order_relaxed);
  return std::move(ref).value();
}

void AnonPool::page_free(Pfn pfn) noexcept {
  {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(pfn);
  }
  in_use_.fetch_sub(1, std::memory_order_acq_rel);
}

}  // namespace pgmap::mm
