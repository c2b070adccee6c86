// Backings: the memory behind a device. A backing is a contiguous, aligned mapping of real bytes
// with a simulated physical address (base pfn). Four kinds:
//
//   anonymous  MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE: costs nothing until touched, so a 1 TiB
//              device fits on a small machine (the default device of pgmap-bench).
//   memfd      memfd_create + ftruncate + MAP_SHARED: shareable, survives remapping.
//   file       a regular file (created/extended to the size) mapped MAP_SHARED.
//   devdax     a real /dev/daxX.Y character device mapped MAP_SHARED at its alignment; size,
//              alignment and physical base are read from sysfs (/sys/bus/dax/devices/daxX.Y).
//
// Every backing reports its size, alignment and base pfn; base pfns of simulated backings are
// allocated from one process-wide simulated physical address space (starting at 1 TiB, aligned to
// the larger of the backing's alignment and 1 GiB) and never reused, so a stale pfn can never
// resolve to a newer device.
//
// revoke()/restore() mark ranges of the bytes as not addressable in sanitizer builds
// (use-after-revoke is an ASan report); they do nothing otherwise. Thread-safe: the object is
// immutable after creation except for revoke/restore, which only touch ASan shadow memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "pgmap/core/error.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {

enum class BackingKind { anonymous, memfd, file, devdax };
const char* backing_kind_name(BackingKind k) noexcept;

struct BackingOptions {
  std::uint64_t size = 0;          // bytes; multiple of `align`
  std::uint64_t align = kPmdSize;  // 4 KiB, 2 MiB or 1 GiB
  bool hugepage_advice = true;     // madvise(MADV_HUGEPAGE) where it applies
  std::string name = "pgmap";      // memfd name / description
};

class Backing {
 public:
  virtual ~Backing();
  Backing(const Backing&) = delete;
  Backing& operator=(const Backing&) = delete;

  BackingKind kind() const noexcept { return kind_; }
  std::byte* data() const noexcept { return data_; }
  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t align() const noexcept { return align_; }
  Pfn base_pfn() const noexcept { return base_pfn_; }
  PfnRange pfns() const noexcept { return {base_pfn_, size_ >> kPageShift}; }
  const std::string& describe() const noexcept { return description_; }

  // Address of the byte at physical pfn `pfn` (must be inside pfns()).
  std::byte* address_of(Pfn pfn) const noexcept {
    return data_ + ((pfn - base_pfn_) << kPageShift);
  }

  // ASan-poison / unpoison [offset, offset + len) of the bytes. Errc::out_of_range if outside.
  Errc revoke(std::uint64_t offset, std::uint64_t len) const noexcept;
  Errc restore(std::uint64_t offset, std::uint64_t len) const noexcept;

 protected:
  Backing(BackingKind kind, std::byte* data, std::uint64_t size, std::uint64_t align, Pfn base_pfn,
          std::string description, void* map_base, std::uint64_t map_len, int fd)
      : kind_(kind),
        data_(data),
        size_(size),
        align_(align),
        base_pfn_(base_pfn),
        description_(std::move(description)),
        map_base_(map_base),
        map_len_(map_len),
        fd_(fd) {}

 private:
  BackingKind kind_;
  std::byte* data_;
  std::uint64_t size_;
  std::uint64_t align_;
  Pfn base_pfn_;
  std::string description_;
  void* map_base_;  // what to munmap (may start before data_ to honour alignment)
  std::uint64_t map_len_;
  int fd_;  // -1 for anonymous

  friend class BackingFactory;
};

// Errors: Errc::invalid_argument (size 0, align not a power of two >= 4 KiB, size not a multiple
// of align), Errc::no_memory (mmap failed), Errc::system_error (open/ftruncate/memfd_create
// failed; errno in the Error), Errc::not_found (open_devdax on a missing device).
Result<std::unique_ptr<Backing>> make_anonymous_backing(const BackingOptions& opts);
Result<std::unique_ptr<Backing>> make_memfd_backing(const BackingOptions& opts);
Result<std::unique_ptr<Backing>> make_file_backing(const std::string& path,
                                                   const BackingOptions& opts);
// Opens /dev/daxX.Y (e.g. "/dev/dax0.0"); size and alignment come from sysfs, opts.size = 0
// maps the whole device.
Result<std::unique_ptr<Backing>> open_devdax_backing(const std::string& path,
                                                     const BackingOptions& opts = {});
// The first /dev/dax*.* present, or Errc::not_found.
Result<std::string> find_devdax_device();

}  // namespace pgmap
