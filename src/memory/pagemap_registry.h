// The pfn -> pagemap index (the kernel's pgmap_array XArray), private to the memory layer.
//
// Readers look a pfn up inside an RCU read section without locks: the index is an immutable
// sorted snapshot published through an atomic pointer. Writers (memremap, memunmap) serialize on
// a mutex, build a new snapshot, publish it, wait for a grace period and free the old one — both
// insert() and remove() wait for a grace period, so neither may be called inside a read section
// (they refuse with Errc::invalid_argument and change nothing). A pagemap removed from the index
// is unreachable by lookups once remove() returns.
#pragma once

#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {

class DevPagemap;

class PagemapRegistry {
 public:
  // A published range that overlaps a requested one.
  struct Conflict {
    PfnRange range;    // the published range
    std::string name;  // its pagemap's name
  };

  static PagemapRegistry& global();

  // Publishes every range of `ranges` for `pgmap`, then waits for a grace period and frees the
  // previous snapshot. Errc::overlap (nothing published; *conflict filled if given) if any range
  // overlaps a published one; Errc::invalid_argument (misuse reported, nothing changed) inside a
  // read section.
  Errc insert(DevPagemap* pgmap, const std::vector<PfnRange>& ranges, Conflict* conflict = nullptr);
  // Unpublishes every range of `pgmap` and waits for a grace period. Errc::invalid_argument
  // (misuse reported, nothing changed) inside a read section.
  Errc remove(DevPagemap* pgmap);
  // The pagemap covering pfn, or nullptr. Must be called inside an rcu::ReadGuard, and the result
  // may only be used inside it (or after taking a reference with tryget_live).
  DevPagemap* lookup(Pfn pfn) const noexcept;
  // The first published range overlapping `range`, if any (a real interval query, not a probe of
  // its ends). Takes its own read section.
  std::optional<Conflict> find_overlap(PfnRange range) const;
  std::size_t size() const noexcept;

 private:
  struct Entry {
    PfnRange range;
    DevPagemap* pgmap;
  };
  using Snapshot = std::vector<Entry>;  // sorted by range.start, non-overlapping

  static std::optional<Conflict> overlap_in(const Snapshot& s, PfnRange range);

  mutable std::mutex mu_;  // writers
  std::atomic<const Snapshot*> current_{new Snapshot};
};

}  // namespace pgmap
