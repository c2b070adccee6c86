// Entry: one tagged 64-bit value of a file's entry map (the kernel's fsdax XArray value entries,
// fs/dax.c). Layout: pfn << kShift | flags, with the flags
//   kLocked  the entry is locked by a thread doing a multi-step operation on it (fault insert,
//            layout breaking, deletion); others wait in the entry map's wait table;
//   kPmd     the entry covers 512 pages (2 MiB) starting at a 512-aligned file index, else one;
//   kZero    a hole mapped read-only to the shared zero page (4 KiB) or the 2 MiB zero folio;
//   kEmpty   a placeholder that exists only to be locked while a fault is in progress.
// Zero and empty entries carry no pfn of the device and hold nothing. Call sites use the named
// constructors and accessors below, never shifts or masks.
#pragma once

#include <cstdint>

#include "pgmap/memory/pfn.h"

namespace pgmap::fs {

class Entry {
 public:
  static constexpr std::uint64_t kLocked = std::uint64_t{1} << 0;
  static constexpr std::uint64_t kPmd = std::uint64_t{1} << 1;
  static constexpr std::uint64_t kZero = std::uint64_t{1} << 2;
  static constexpr std::uint64_t kEmpty = std::uint64_t{1} << 3;
  static constexpr unsigned kShift = 4;

  constexpr Entry() = default;
  static constexpr Entry from_raw(std::uint64_t raw) { return Entry(raw); }
  // A device block entry mapping pfn (order 0 or kPmdOrder).
  static constexpr Entry block(Pfn pfn, unsigned order) {
    return Entry((pfn << kShift) | (order == kPmdOrder ? kPmd : 0));
  }
  static constexpr Entry zero(unsigned order) {
    return Entry(kZero | (order == kPmdOrder ? kPmd : 0));
  }
  static constexpr Entry empty(unsigned order) {
    return Entry(kEmpty | (order == kPmdOrder ? kPmd : 0));
  }

  constexpr std::uint64_t raw() const { return v_; }
  constexpr Pfn pfn() const { return v_ >> kShift; }
  constexpr bool locked() const { return (v_ & kLocked) != 0; }
  constexpr bool pmd() const { return (v_ & kPmd) != 0; }
  constexpr bool zero() const { return (v_ & kZero) != 0; }
  constexpr bool empty() const { return (v_ & kEmpty) != 0; }
  // Maps a device block (neither zero nor empty).
  constexpr bool is_block() const { return (v_ & (kZero | kEmpty)) == 0; }
  constexpr unsigned order() const { return pmd() ? kPmdOrder : 0; }
  constexpr std::uint64_t pages() const { return order_pages(order()); }

  constexpr Entry locked_copy() const { return Entry(v_ | kLocked); }
  constexpr Entry unlocked_copy() const { return Entry(v_ & ~kLocked); }

  friend constexpr bool operator==(Entry a, Entry b) { return a.v_ == b.v_; }

 private:
  explicit constexpr Entry(std::uint64_t v) : v_(v) {}
  std::uint64_t v_ = 0;
};

}  // namespace pgmap::fs
