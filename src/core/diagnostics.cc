#include "pgmap/core/diagnostics.h"

#include <fmt/format.h>

namespace pgmap {

std::string HolderReport::to_string() const {
  std::string s = fmt::format("{}: {} busy folio(s)", object, total_busy);
  if (pagemap_refs >= 0) s += fmt::format(", {} pagemap reference(s) outstanding", pagemap_refs);
  for (const BusyPage& p : busy) {
    s += fmt::format("\n  pfn {:#x} order {} refcount {} mapcount {} pincount {}", p.pfn, p.order,
                     p.refcount, p.mapcount, p.pincount);
    if (p.owner != nullptr) s += fmt::format(" owner {}", p.owner);
  }
  if (total_busy > busy.size()) s += fmt::format("\n  ... and {} more", total_busy - busy.size());
  return s;
}

}  // namespace pgmap
