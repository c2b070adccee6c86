#include "memory/pagemap_registry.h"

#include <algorithm>
#include <memory>

#include "pgmap/core/rcu.h"

namespace pgmap {

PagemapRegistry& PagemapRegistry::global() {
  static PagemapRegistry* r = new PagemapRegistry;  // outlives every pagemap
  return *r;
}

Errc PagemapRegistry::insert(DevPagemap* pgmap, const std::vector<PfnRange>& ranges) {
  std::lock_guard<std::mutex> lock(mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  for (const PfnRange& r : ranges) {
    for (const Entry& e : *old) {
      if (e.range.overlaps(r)) return Errc::overlap;
    }
  }
  auto next = std::make_unique<Snapshot>(*old);
  for (const PfnRange& r : ranges)
    next->push_back({r, pgmap});
  std::sort(next->begin(), next->end(),
            [](const Entry& a, const Entry& b) { return a.range.start < b.range.start; });
  current_.store(next.release(), std::memory_order_release);
  (void)rcu::synchronize();
  delete old;
  return Errc::ok;
}

void PagemapRegistry::remove(DevPagemap* pgmap) {
  std::lock_guard<std::mutex> lock(mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  auto next = std::make_unique<Snapshot>();
  for (const Entry& e : *old) {
    if (e.pgmap != pgmap) next->push_back(e);
  }
  current_.store(next.release(), std::memory_order_release);
  (void)rcu::synchronize();
  delete old;
}

DevPagemap* PagemapRegistry::lookup(Pfn pfn) const noexcept {
  const Snapshot* s = current_.load(std::memory_order_acquire);
  auto it = std::upper_bound(s->begin(), s->end(), pfn,
                             [](Pfn p, const Entry& e) { return p < e.range.start; });
  if (it == s->begin()) return nullptr;
  --it;
  return it->range.contains(pfn) ? it->pgmap : nullptr;
}

std::size_t PagemapRegistry::size() const noexcept {
  rcu::ReadGuard guard;
  return current_.load(std::memory_order_acquire)->size();
}

}  // namespace pgmap
