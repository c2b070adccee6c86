// BlockAllocator: the DAX filesystem's free-space map over a device of 4 KiB blocks, with a share
// count per block (reflink, I12).
//
// A block is free at share count 0. alloc() hands out free blocks only: a block whose last file
// let go of it is freed by the filesystem only after the file's layout was broken (no mapping,
// reference or pin on its page, I7), so the allocator never sees a busy block. alloc_aligned()
// returns 512 contiguous blocks starting at a 512-aligned device block (a 2 MiB extent a PMD can
// map when the device's pfns are 2 MiB-aligned too).
//
// Thread-safe (one internal mutex, a leaf in the lock order).
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "pgmap/core/error.h"

namespace pgmap::fs {

class BlockAllocator {
 public:
  explicit BlockAllocator(std::uint64_t nr_blocks);

  std::uint64_t nr_blocks() const noexcept { return nr_; }
  std::uint64_t free_blocks() const;

  // One free block (share count 1 afterwards), or Errc::no_memory (ENOSPC).
  Result<std::uint64_t> alloc();
  // `count` contiguous free blocks starting at a multiple of `align` blocks (share count 1 each),
  // or Errc::no_memory. Errc::invalid_argument for count 0 or align not a power of two.
  Result<std::uint64_t> alloc_extent(std::uint64_t count, std::uint64_t align);

  // Adds a sharer to an allocated block (reflink). Errc::out_of_range, Errc::invalid_argument
  // (the block is free).
  Errc share(std::uint64_t block);
  // Drops one sharer; the block is free again at zero. Returns the remaining share count.
  // Errc::out_of_range, Errc::underflow (the block is free: misuse reported).
  Result<std::uint32_t> release(std::uint64_t block);
  std::uint32_t share_count(std::uint64_t block) const;

 private:
  const std::uint64_t nr_;
  mutable std::mutex mu_;
  std::vector<std::uint32_t> shares_;  // per block; 0 = free
  std::uint64_t free_ = 0;
  std::uint64_t hint_ = 0;  // next block to try (first fit from here, then wrap)
};

}  // namespace pgmap::fs
