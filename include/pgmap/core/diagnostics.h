// Who still holds what: the report attached to a teardown that timed out or was refused.
//
// A holder report names the busy pages (pfn, folio order, reference, map and pin counts, the
// owner the upper layer recorded) and the outstanding pagemap references that are not page
// references (transient lookups, allocation events), capped so that a 1 TiB device with every
// page busy still produces a readable report; `total_busy` is always exact.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pgmap {

struct BusyPage {
  std::uint64_t pfn = 0;        // head pfn of the folio
  unsigned order = 0;           // folio order in 4 KiB pages
  std::uint32_t refcount = 0;   // raw folio refcount (includes the pin bias for small folios)
  std::int32_t mapcount = 0;    // page-table mappings
  std::uint32_t pincount = 0;   // exact pins for large folios; refcount / bias for small ones
  const void* owner = nullptr;  // mapping recorded by the upper layer, if any
};

struct HolderReport {
  static constexpr std::size_t kMaxListed = 64;

  std::string object;              // e.g. "pagemap 0x100000-0x140000 (fs_dax, transition)"
  std::uint64_t total_busy = 0;    // exact number of busy folios
  std::vector<BusyPage> busy;      // the first kMaxListed of them, in pfn order
  std::int64_t pagemap_refs = -1;  // outstanding pagemap references, -1 if not counted
  std::string to_string() const;
};

}  // namespace pgmap
