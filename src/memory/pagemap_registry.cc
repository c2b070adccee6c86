#include "memory/pagemap_registry.h"

#include <algorithm>
#include <memory>

#include "pgmap/core/rcu.h"
#include "pgmap/memory/dev_pagemap.h"

namespace pgmap {

PagemapRegistry& PagemapRegistry::global() {
  static PagemapRegistry* r = new PagemapRegistry;  // outlives every pagemap
  return *r;
}

std::optional<PagemapRegistry::Conflict> PagemapRegistry::overlap_in(const Snapshot& s,
                                                                     PfnRange range) {
  // The first entry starting after range.start, and the one before it (which may reach into it).
  auto it = std::upper_bound(s.begin(), s.end(), range.start,
                             [](Pfn p, const Entry& e) { return p < e.range.start; });
  if (it != s.begin() && std::prev(it)->range.overlaps(range)) --it;
  if (it == s.end() || !it->range.overlaps(range)) return std::nullopt;
  // A published pagemap's name is immutable and it stays allocated for a grace period after it
  // leaves the snapshot, which our caller's read section (or the writer lock) covers.
  return Conflict{it->range, it->pgmap->name()};
}

Errc PagemapRegistry::insert(DevPagemap* pgmap, const std::vector<PfnRange>& ranges,
                             Conflict* conflict) {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "PagemapRegistry::insert inside an RCU read section");
    return Errc::invalid_argument;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  for (const PfnRange& r : ranges) {
    if (auto c = overlap_in(*old, r)) {
      if (conflict != nullptr) *conflict = std::move(*c);
      return Errc::overlap;
    }
  }
  auto next = std::make_unique<Snapshot>(*old);
  for (const PfnRange& r : ranges)
    next->push_back({r, pgmap});
  std::sort(next->begin(), next->end(),
            [](const Entry& a, const Entry& b) { return a.range.start < b.range.start; });
  current_.store(next.release(), std::memory_order_release);
  // Cannot refuse: we checked for a read section above and hold no lock readers take.
  (void)rcu::synchronize();
  delete old;
  return Errc::ok;
}

Errc PagemapRegistry::remove(DevPagemap* pgmap) {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "PagemapRegistry::remove inside an RCU read section");
    return Errc::invalid_argument;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  auto next = std::make_unique<Snapshot>();
  for (const Entry& e : *old) {
    if (e.pgmap != pgmap) next->push_back(e);
  }
  current_.store(next.release(), std::memory_order_release);
  (void)rcu::synchronize();  // cannot refuse: checked above
  delete old;
  return Errc::ok;
}

DevPagemap* PagemapRegistry::lookup(Pfn pfn) const noexcept {
  const Snapshot* s = current_.load(std::memory_order_acquire);
  auto it = std::upper_bound(s->begin(), s->end(), pfn,
                             [](Pfn p, const Entry& e) { return p < e.range.start; });
  if (it == s->begin()) return nullptr;
  --it;
  return it->range.contains(pfn) ? it->pgmap : nullptr;
}

std::optional<PagemapRegistry::Conflict> PagemapRegistry::find_overlap(PfnRange range) const {
  rcu::ReadGuard guard;
  return overlap_in(*current_.load(std::memory_order_acquire), range);
}

std::size_t PagemapRegistry::size() const noexcept {
  rcu::ReadGuard guard;
  return current_.load(std::memory_order_acquire)->size();
}

}  // namespace pgmap
