// DioRequest: a direct-I/O-like request whose data buffer is user memory (possibly a DAX mmap):
// it pins the buffer's pages with GUP (FOLL_PIN, as iov_iter_extract_pages does) at submission,
// "DMAs" into them on completion and unpins them from the completing thread — the asynchronous
// completion that t_mmap_collision (xfstests generic/503) races against truncate and hole
// punching. While it is in flight its pins keep the pages busy: break_layout and eviction wait
// for it, and the unpin at completion wakes them (I16).
//
// Not thread-safe as an object: one thread submits, complete_async() hands completion to one
// other thread, wait() joins it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::fs {

class DioRequest {
 public:
  // Pins [addr, addr + npages * 4 KiB) of `as` for writing (a read from the device into memory).
  // Errors as mm::pin_user_pages (nothing pinned on error).
  static Result<std::unique_ptr<DioRequest>> submit(mm::AddressSpace& as, std::uint64_t addr,
                                                    std::uint64_t npages);
  // Completes synchronously if still in flight.
  ~DioRequest();
  DioRequest(const DioRequest&) = delete;
  DioRequest& operator=(const DioRequest&) = delete;

  // Completes now on this thread: fills every pinned page with `fill`, then unpins.
  Errc complete(std::byte fill);
  // Completes on a new thread (the interrupt handler of the simulation).
  void complete_async(std::byte fill);
  // Joins an asynchronous completion; returns its unpin status.
  Errc wait();
  bool in_flight() const noexcept { return !pages_.empty(); }
  std::span<const mm::GupPage> pages() const noexcept { return pages_.pages(); }

 private:
  explicit DioRequest(mm::PinnedPages pages) : pages_(std::move(pages)) {}
  mm::PinnedPages pages_;
  std::thread completion_;
  Errc result_ = Errc::ok;
};

}  // namespace pgmap::fs
