#include "pgmap/mm/mapping.h"

#include <algorithm>
#include <limits>

#include "pgmap/core/sanitizer.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::mm {

const char* sig_code_name(SigCode c) noexcept {
  switch (c) {
    case SigCode::none:
      return "none";
    case SigCode::bus_adrerr:
      return "BUS_ADRERR";
    case SigCode::bus_mceerr_ar:
      return "BUS_MCEERR_AR";
    case SigCode::bus_mceerr_ao:
      return "BUS_MCEERR_AO";
    case SigCode::segv_maperr:
      return "SEGV_MAPERR";
    case SigCode::segv_accerr:
      return "SEGV_ACCERR";
  }
  return "?";
}

void MappingOwner::link(Vma* vma) {
  std::lock_guard<std::mutex> lock(i_mmap_mu_);
  i_mmap_.insert(vma);
}

void MappingOwner::unlink(Vma* vma) {
  std::lock_guard<std::mutex> lock(i_mmap_mu_);
  i_mmap_.erase(vma);
}

void MappingOwner::link_and_copy(Vma* vma, const std::function<void()>& copy) {
  std::lock_guard<std::mutex> lock(i_mmap_mu_);
  i_mmap_.insert(vma);
  copy();
}

CowStats MappingOwner::cow_stats() const noexcept {
  auto at = [&](CowEvent e) {
    return cow_[static_cast<std::size_t>(e)].load(std::memory_order_relaxed);
  };
  return CowStats{at(CowEvent::file_copy), at(CowEvent::anon_copy), at(CowEvent::anon_reuse),
                  at(CowEvent::pmd_split), at(CowEvent::fork_copy)};
}

void MappingOwner::count_cow(CowEvent e) noexcept {
  cow_[static_cast<std::size_t>(e)].fetch_add(1, std::memory_order_relaxed);
}

std::size_t MappingOwner::nr_vmas() const {
  std::lock_guard<std::mutex> lock(i_mmap_mu_);
  return i_mmap_.size();
}

std::uint64_t MappingOwner::unmap_mapping_range(std::uint64_t pgoff, std::uint64_t npages,
                                                bool even_cows) {
  // Announce the invalidation before looking at any entry: a fault that installs after the walk
  // passed its slot reads the new sequence afterwards and takes its entry out again.
  invalidate_seq_.fetch_add(1, std::memory_order_seq_cst);
  sanitizer::full_fence();
  const std::uint64_t last =
      npages == 0 || npages > std::numeric_limits<std::uint64_t>::max() - pgoff
          ? std::numeric_limits<std::uint64_t>::max()
          : pgoff + npages;
  std::uint64_t zapped = 0;
  // The lock keeps every linked VMA (and so its address space) alive while its entries are zapped;
  // address spaces unlink a VMA before freeing it. mmap_lock is not taken (lock order).
  std::lock_guard<std::mutex> lock(i_mmap_mu_);
  for (Vma* vma : i_mmap_) {
    const std::uint64_t first = vma->pgoff;
    const std::uint64_t end = first + (vma->len() >> kPageShift);
    const std::uint64_t lo = std::max(first, pgoff);
    const std::uint64_t hi = std::min(end, last);
    if (lo >= hi) continue;
    const std::uint64_t start = vma->start + ((lo - first) << kPageShift);
    const std::uint64_t stop = vma->start + ((hi - first) << kPageShift);
    zapped += vma->as->zap_range(*vma, start, stop, even_cows);
  }
  return zapped;
}

}  // namespace pgmap::mm
