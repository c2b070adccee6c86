// PipeBuffer: pages held by a pipe (vmsplice of a user buffer, possibly a DAX mmap): it takes a
// plain page reference (FOLL_GET) on every page at splice time and holds it until the reader
// consumes the buffer, copying the pages' bytes then — whatever the pages hold at that moment. A
// page referenced by a pipe is busy: its file's blocks cannot be freed (break_layout, eviction)
// until the pipe is consumed, so the reader sees the old file's bytes and never those of a file
// that reused the block (bug 5.16, Linux before 6.15).
//
// Not thread-safe as an object (one owner).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::fs {

class PipeBuffer {
 public:
  PipeBuffer() = default;
  PipeBuffer(PipeBuffer&& o) noexcept = default;
  PipeBuffer& operator=(PipeBuffer&&) = delete;
  PipeBuffer(const PipeBuffer&) = delete;
  PipeBuffer& operator=(const PipeBuffer&) = delete;
  // Drops the references unread (the page set releases itself).
  ~PipeBuffer() = default;

  // vmsplice: references the pages of [addr, addr + npages * 4 KiB). Errors as
  // mm::get_user_pages (nothing referenced on error).
  static Result<PipeBuffer> vmsplice(mm::AddressSpace& as, std::uint64_t addr,
                                     std::uint64_t npages);
  // The reader: the bytes of every page, in order, then the references are dropped. Empty after.
  Result<std::vector<std::byte>> consume();
  bool empty() const noexcept { return pages_.empty(); }
  std::span<const mm::GupPage> pages() const noexcept { return pages_.pages(); }

 private:
  explicit PipeBuffer(mm::ReferencedPages pages) : pages_(std::move(pages)) {}
  mm::ReferencedPages pages_;
};

}  // namespace pgmap::fs
