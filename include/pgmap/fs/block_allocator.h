// BlockAllocator: the DAX filesystem's free-space map over a device of 4 KiB blocks, with a share
// count per block (reflink, I12).
//
// A block is free at share count 0. alloc() hands out free blocks only: a block whose last file
// let go of it is freed by the filesystem only after the file's layout was broken (no mapping,
// reference or pin on its page, I7), so the allocator never sees a busy block. alloc_aligned()
// returns 512 contiguous blocks starting at a 512-aligned device block (a 2 MiB extent a PMD can
// map when the device's pfns are 2 MiB-aligned too).
//
// Bad blocks (memory failure): mark_bad() takes a block out of service for good. A free bad block
// leaves the free pool at once; an allocated one keeps its sharers and is retired, not freed, when
// the last of them releases it. alloc() and alloc_extent() never hand a bad block out, so a
// poisoned block's next user is never a file that did not own it when it failed.
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

  // Takes `block` out of service (see "Bad blocks" above); idempotent. Errc::out_of_range.
  Errc mark_bad(std::uint64_t block);
  bool is_bad(std::uint64_t block) const;
  std::uint64_t bad_blocks() const;      // marked bad, in use or retired
  std::uint64_t retired_blocks() const;  // bad and released by every sharer: out of the pool

 private:
  const std::uint64_t nr_;
  mutable std::mutex mu_;
  std::vector<std::uint32_t> shares_;  // per block; 0 = free (or retired, if bad)
  std::vector<bool> bad_;              // per block: marked bad (never allocated again)
  std::uint64_t free_ = 0;
  std::uint64_t bad_count_ = 0;
  std::uint64_t retired_ = 0;
  std::uint64_t hint_ = 0;  // next block to try (first fit from here, then wrap)
};

}  // namespace pgmap::fs
