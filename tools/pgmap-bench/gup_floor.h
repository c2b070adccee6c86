// gup/floor_batched: the minimum work of a batched pin_user_pages + unpin_user_pages of 4 KiB
// folios, measured in the same run as the real GUP so that its cost can be read as a ratio.
//
// Per call over one 512-entry PTE table: for each entry load the PTE, one locked add of the pin
// bias on the folio's dense refcount, re-load the PTE (the re-check against the same table page),
// store the pfn in the result array; then unpin: one locked sub per page. No page-table walk
// above the table, no pagemap lookup, no strategy, no error handling: the floor, not a design.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace pgmap::bench {

class GupFloor {
 public:
  static constexpr std::uint64_t kEntries = 512;
  static constexpr std::uint32_t kPinBias = 1024;

  GupFloor();
  ~GupFloor();
  GupFloor(const GupFloor&) = delete;
  GupFloor& operator=(const GupFloor&) = delete;
  // One pin+unpin call of `pages` (<= kEntries) entries from entry 0. Returns the number of
  // entries whose re-check failed (0: nothing races here; returned so the work cannot be elided).
  std::uint64_t pin_unpin(std::uint64_t pages) noexcept;
  // Every refcount back at its starting value (1, the mapping's reference).
  bool balanced() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace pgmap::bench
