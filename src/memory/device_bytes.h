// Moving the bytes of memory that simulated processes, devices and the filesystem share (device
// pages, anonymous pages): every byte is loaded and stored by a relaxed atomic access, 8 bytes
// at a time where both sides are aligned alike, as a CPU's loads and stores to shared memory are.
//
// Two processes racing on one shared page is legal on real hardware: each aligned word lands
// whole and a larger record can tear. Between threads, with memcpy, it is a data race in C++
// terms, which ThreadSanitizer rightly reported between two `pgmap-stress --fs` workers, one
// writing a record through its mapping while the other read the page through its own. With these
// copies the race is what it is on hardware, and ThreadSanitizer keeps watching everything else.
// On x86-64 a relaxed 8-byte access is a plain mov, so the cost is memcpy's without its vector
// instructions (every hot path moves a byte or none).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pgmap::detail {

inline std::uint64_t load_word(const std::byte* p) noexcept {
  return std::atomic_ref<std::uint64_t>(
             *reinterpret_cast<std::uint64_t*>(const_cast<std::byte*>(p)))
      .load(std::memory_order_relaxed);
}

inline void store_word(std::byte* p, std::uint64_t v) noexcept {
  std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(p))
      .store(v, std::memory_order_relaxed);
}

inline std::byte load_byte(const std::byte* p) noexcept {
  return std::atomic_ref<std::byte>(*const_cast<std::byte*>(p)).load(std::memory_order_relaxed);
}

inline void store_byte(std::byte* p, std::byte v) noexcept {
  std::atomic_ref<std::byte>(*p).store(v, std::memory_order_relaxed);
}

inline bool word_aligned(const std::byte* p) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % sizeof(std::uint64_t) == 0;
}

// memcpy, either side shared.
inline void shared_copy(std::byte* dst, const std::byte* src, std::size_t n) noexcept {
  std::size_t i = 0;
  if ((reinterpret_cast<std::uintptr_t>(dst) ^ reinterpret_cast<std::uintptr_t>(src)) %
          sizeof(std::uint64_t) ==
      0) {
    for (; i < n && !word_aligned(dst + i); ++i)
      store_byte(dst + i, load_byte(src + i));
    for (; i + sizeof(std::uint64_t) <= n; i += sizeof(std::uint64_t))
      store_word(dst + i, load_word(src + i));
  }
  for (; i < n; ++i)
    store_byte(dst + i, load_byte(src + i));
}

inline void shared_copy(void* dst, const void* src, std::size_t n) noexcept {
  shared_copy(static_cast<std::byte*>(dst), static_cast<const std::byte*>(src), n);
}

// memset of shared memory.
inline void shared_fill(std::byte* dst, std::byte v, std::size_t n) noexcept {
  const std::uint64_t word = 0x0101010101010101ull * std::to_integer<std::uint64_t>(v);
  std::size_t i = 0;
  for (; i < n && !word_aligned(dst + i); ++i)
    store_byte(dst + i, v);
  for (; i + sizeof(std::uint64_t) <= n; i += sizeof(std::uint64_t))
    store_word(dst + i, word);
  for (; i < n; ++i)
    store_byte(dst + i, v);
}

}  // namespace pgmap::detail
