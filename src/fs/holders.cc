// The page holders besides mappings: direct-I/O requests (dio.h) and pipe buffers (pipe.h).
#include <utility>

#include "memory/device_bytes.h"
#include "pgmap/core/rcu.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/pipe.h"

namespace pgmap::fs {

// ---- DioRequest ---------------------------------------------------------------------------------

Result<std::unique_ptr<DioRequest>> DioRequest::submit(mm::AddressSpace& as, std::uint64_t addr,
                                                       std::uint64_t npages) {
  auto pages = mm::pin_user_pages(as, addr, npages, mm::kFollWrite);
  if (!pages) return pages.error();
  return std::unique_ptr<DioRequest>(new DioRequest(std::move(pages).value()));
}

DioRequest::~DioRequest() {
  if (completion_.joinable()) completion_.join();
  if (in_flight()) (void)complete(std::byte{0});  // unpin errors are reported as misuse
}

Errc DioRequest::complete(std::byte fill) {
  // The "DMA": the pins keep every page (and its pagemap) alive.
  for (const mm::GupPage& p : pages_)
    pgmap::detail::shared_fill(p.pgmap->address_of(p.pfn), fill, kPageSize);
  return mm::unpin_user_pages(pages_);
}

void DioRequest::complete_async(std::byte fill) {
  completion_ = std::thread([this, fill] { result_ = complete(fill); });
}

Errc DioRequest::wait() {
  if (completion_.joinable()) completion_.join();
  return result_;
}

// ---- PipeBuffer ---------------------------------------------------------------------------------

Result<PipeBuffer> PipeBuffer::vmsplice(mm::AddressSpace& as, std::uint64_t addr,
                                        std::uint64_t npages) {
  auto pages = mm::get_user_pages(as, addr, npages, 0);
  if (!pages) return pages.error();
  return PipeBuffer(std::move(pages).value());
}

Result<std::vector<std::byte>> PipeBuffer::consume() {
  std::vector<std::byte> out(pages_.size() * kPageSize);
  for (std::size_t i = 0; i < pages_.size(); ++i) {
    pgmap::detail::shared_copy(out.data() + i * kPageSize,
                               pages_[i].pgmap->address_of(pages_[i].pfn), kPageSize);
  }
  Errc e = mm::put_pages(pages_);
  if (e != Errc::ok) return Error(e, "pipe: dropping the page references");
  return out;
}

}  // namespace pgmap::fs
