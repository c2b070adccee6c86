#include "gup_floor.h"

#include <array>

namespace pgmap::bench {

struct GupFloor::State {
  alignas(4096) std::array<std::atomic<std::uint64_t>, kEntries> pte{};
  alignas(64) std::array<std::atomic<std::uint32_t>, kEntries> ref{};
  alignas(64) std::array<std::uint64_t, kEntries> out{};
};

GupFloor::GupFloor() : s_(std::make_unique<State>()) {
  for (std::uint64_t i = 0; i < kEntries; ++i) {
    // pfn i, present: the frame in the upper bits as in the simulated page table.
    s_->pte[i].store((i << 12) | 1, std::memory_order_relaxed);
    s_->ref[i].store(1, std::memory_order_relaxed);
  }
}

GupFloor::~GupFloor() = default;

std::uint64_t GupFloor::pin_unpin(std::uint64_t pages) noexcept {
  State& s = *s_;
  std::uint64_t changed = 0;
  if (pages > kEntries) pages = kEntries;
  for (std::uint64_t i = 0; i < pages; ++i) {
    const std::uint64_t e = s.pte[i].load(std::memory_order_acquire);
    const std::uint64_t pfn = e >> 12;
    s.ref[pfn].fetch_add(kPinBias, std::memory_order_acq_rel);
    if (s.pte[i].load(std::memory_order_acquire) != e) [[unlikely]] {
      s.ref[pfn].fetch_sub(kPinBias, std::memory_order_acq_rel);
      ++changed;
      continue;
    }
    s.out[i] = pfn;
  }
  for (std::uint64_t i = 0; i < pages; ++i)
    s.ref[s.out[i]].fetch_sub(kPinBias, std::memory_order_acq_rel);
  return changed;
}

bool GupFloor::balanced() const noexcept {
  for (const auto& r : s_->ref) {
    if (r.load(std::memory_order_relaxed) != 1) return false;
  }
  return true;
}

}  // namespace pgmap::bench
