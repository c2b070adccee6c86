#include "pgmap/fs/block_allocator.h"

#include <fmt/format.h>

namespace pgmap::fs {

BlockAllocator::BlockAllocator(std::uint64_t nr_blocks)
    : nr_(nr_blocks), shares_(nr_blocks, 0), bad_(nr_blocks, false), free_(nr_blocks) {}

std::uint64_t BlockAllocator::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return free_;
}

Result<std::uint64_t> BlockAllocator::alloc() {
  std::lock_guard<std::mutex> lock(mu_);
  for (std::uint64_t i = 0; i < nr_; ++i) {
    const std::uint64_t b = (hint_ + i) % nr_;
    if (shares_[b] == 0 && !bad_[b]) {
      shares_[b] = 1;
      --free_;
      hint_ = (b + 1) % nr_;
      return b;
    }
  }
  return Error(Errc::no_memory, "block allocator: no free block (ENOSPC)");
}

Result<std::uint64_t> BlockAllocator::alloc_extent(std::uint64_t count, std::uint64_t align) {
  if (count == 0 || align == 0 || (align & (align - 1)) != 0) {
    return Error(Errc::invalid_argument, "block allocator: bad extent size or alignment");
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (std::uint64_t start = 0; start + count <= nr_; start += align) {
    bool all_free = true;
    for (std::uint64_t b = start; b < start + count && all_free; ++b)
      all_free = shares_[b] == 0 && !bad_[b];
    if (!all_free) continue;
    for (std::uint64_t b = start; b < start + count; ++b)
      shares_[b] = 1;
    free_ -= count;
    return start;
  }
  return Error(Errc::no_memory,
               fmt::format("block allocator: no free {}-block extent aligned to {}", count, align));
}

Errc BlockAllocator::share(std::uint64_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  if (block >= nr_) return Errc::out_of_range;
  if (shares_[block] == 0) return Errc::invalid_argument;
  ++shares_[block];
  return Errc::ok;
}

Result<std::uint32_t> BlockAllocator::release(std::uint64_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  if (block >= nr_) return Error(Errc::out_of_range, "block allocator: block past the end");
  if (shares_[block] == 0) {
    report_misuse(Errc::underflow, "BlockAllocator::release of a free block");
    return Error(Errc::underflow, fmt::format("block {} is already free", block));
  }
  if (--shares_[block] == 0) {
    if (bad_[block]) {
      ++retired_;  // out of service: never back in the free pool
    } else {
      ++free_;
    }
  }
  return shares_[block];
}

Errc BlockAllocator::mark_bad(std::uint64_t block) {
  std::lock_guard<std::mutex> lock(mu_);
  if (block >= nr_) return Errc::out_of_range;
  if (bad_[block]) return Errc::ok;
  bad_[block] = true;
  ++bad_count_;
  if (shares_[block] == 0) {
    --free_;
    ++retired_;
  }
  return Errc::ok;
}

bool BlockAllocator::is_bad(std::uint64_t block) const {
  std::lock_guard<std::mutex> lock(mu_);
  return block < nr_ && bad_[block];
}

std::uint64_t BlockAllocator::bad_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bad_count_;
}

std::uint64_t BlockAllocator::retired_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return retired_;
}

std::uint32_t BlockAllocator::share_count(std::uint64_t block) const {
  std::lock_guard<std::mutex> lock(mu_);
  return block < nr_ ? shares_[block] : 0;
}

}  // namespace pgmap::fs
