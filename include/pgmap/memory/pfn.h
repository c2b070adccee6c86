// Page frame numbers and sizes. A pfn is a simulated physical address >> 12: every backing gets a
// disjoint pfn range (the real one for /dev/dax when the kernel shows it), so pfn -> pagemap lookup
// behaves as in the kernel.
#pragma once

#include <cstdint>

namespace pgmap {

using Pfn = std::uint64_t;

inline constexpr unsigned kPageShift = 12;
inline constexpr std::uint64_t kPageSize = std::uint64_t{1} << kPageShift;
inline constexpr unsigned kPmdOrder = 9;   // 2 MiB folio
inline constexpr unsigned kPudOrder = 18;  // 1 GiB folio
inline constexpr std::uint64_t kPmdSize = kPageSize << kPmdOrder;
inline constexpr std::uint64_t kPudSize = kPageSize << kPudOrder;

inline constexpr std::uint64_t order_bytes(unsigned order) {
  return kPageSize << order;
}
inline constexpr std::uint64_t order_pages(unsigned order) {
  return std::uint64_t{1} << order;
}
inline constexpr bool is_aligned(std::uint64_t v, std::uint64_t a) {
  return (v & (a - 1)) == 0;
}
inline constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t a) {
  return v & ~(a - 1);
}
inline constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) & ~(a - 1);
}

// Half-open [start, start + count) range of pfns.
struct PfnRange {
  Pfn start = 0;
  std::uint64_t count = 0;
  constexpr Pfn end() const { return start + count; }
  constexpr bool contains(Pfn p) const { return p >= start && p < end(); }
  constexpr bool overlaps(const PfnRange& o) const { return start < o.end() && o.start < end(); }
  constexpr std::uint64_t bytes() const { return count << kPageShift; }
};

}  // namespace pgmap
