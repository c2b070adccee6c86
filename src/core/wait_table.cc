#include "pgmap/core/wait_table.h"
#include "pgmap/core/sanitizer.h"

#include <bit>

namespace pgmap {

WaitTable& WaitTable::global() {
  static WaitTable table;
  return table;
}

WaitTable::Bucket& WaitTable::bucket(const void* key) noexcept {
  auto k = reinterpret_cast<std::uintptr_t>(key);
  // Fibonacci hashing of the address; the low bits of aligned objects carry no entropy.
  std::uint64_t h = (static_cast<std::uint64_t>(k) >> 3) * 0x9E3779B97F4A7C15ull;
  return buckets_[h >> (64 - std::countr_zero(kBuckets))];
}

const WaitTable::Bucket& WaitTable::bucket(const void* key) const noexcept {
  return const_cast<WaitTable*>(this)->bucket(key);
}

void WaitTable::wake(const void* key) noexcept {
  Bucket& b = bucket(key);
  // Pairs with the waiter's seq_cst registration: the caller's state change is ordered before
  // this load, so a waiter that registered before it is seen here, and one that registers after
  // it sees the new state in its condition check.
  sanitizer::full_fence();
  if (b.waiters.load(std::memory_order_relaxed) == 0) return;
  // Taking the lock orders us after a waiter that is between its check and its sleep.
  std::lock_guard<std::mutex> lock(b.mu);
  b.cv.notify_all();
}

std::uint32_t WaitTable::waiters(const void* key) const noexcept {
  return bucket(key).waiters.load(std::memory_order_relaxed);
}

}  // namespace pgmap
