// Private to src/mm: what GUP's batched walk needs from the types it works on, the page table of
// an address space (AddressSpace::Impl is private) and the storage of a page set.
#pragma once

#include "mm/page_table.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::mm::detail {

struct GupAccess {
  static const PageTable& page_table(const AddressSpace& as) noexcept;  // address_space.cc
  static PageBuffer& pages(PinnedPages& s) noexcept { return s.pages_; }
  static PageBuffer& pages(ReferencedPages& s) noexcept { return s.pages_; }
};

}  // namespace pgmap::mm::detail
