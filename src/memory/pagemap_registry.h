// The pfn -> pagemap index (the kernel's pgmap_array XArray), private to the memory layer.
//
// Readers look a pfn up inside an RCU read section without locks: the index is an immutable
// sorted snapshot published through an atomic pointer. Writers (memremap, memunmap) serialize on
// a mutex, build a new snapshot, publish it, wait for a grace period and free the old one. A
// pagemap removed from the index is therefore unreachable by lookups once remove() returns.
#pragma once

#include <atomic>
#include <mutex>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {

class DevPagemap;

class PagemapRegistry {
 public:
  static PagemapRegistry& global();

  // Publishes every range of `ranges` for `pgmap`. Errc::overlap (nothing published) if any range
  // overlaps a published one. Does not wait for a grace period.
  Errc insert(DevPagemap* pgmap, const std::vector<PfnRange>& ranges);
  // Unpublishes every range of `pgmap` and waits for a grace period.
  void remove(DevPagemap* pgmap);
  // The pagemap covering pfn, or nullptr. Must be called inside an rcu::ReadGuard, and the result
  // may only be used inside it (or after taking a reference with tryget_live).
  DevPagemap* lookup(Pfn pfn) const noexcept;
  std::size_t size() const noexcept;

 private:
  struct Entry {
    PfnRange range;
    DevPagemap* pgmap;
  };
  using Snapshot = std::vector<Entry>;  // sorted by range.start, non-overlapping

  mutable std::mutex mu_;  // writers
  std::atomic<const Snapshot*> current_{new Snapshot};
};

}  // namespace pgmap
