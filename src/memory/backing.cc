#include "pgmap/memory/backing.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "pgmap/core/sanitizer.h"

namespace pgmap {
namespace {

// Simulated physical memory starts at 1 TiB so that it cannot be mistaken for low RAM and so a
// pfn of 0 is never valid.
constexpr std::uint64_t kSimulatedPhysBase = std::uint64_t{1} << 40;
// Every simulated backing starts on a 1 GiB boundary at least, like a memory section group.
constexpr std::uint64_t kSimulatedGranule = kPudSize;
// 2^52 pfns cover the whole 64-bit physical address space; past that we report exhaustion
// instead of wrapping around into ranges already handed out.
constexpr Pfn kSimulatedPfnLimit = Pfn{1} << (64 - kPageShift);
// Largest size we try to map: keeps size + align and off_t conversions free of overflow.
constexpr std::uint64_t kMaxBackingSize =
    static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()) / 2 + 1;

constexpr std::string_view kDevdaxSysfs = "/sys/bus/dax/devices/";

// ---- formatting -------------------------------------------------------------------------------

constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};

std::string format_size(std::uint64_t bytes) {
  unsigned unit = 0;
  while (unit + 1 < std::size(kUnits) && bytes >= (std::uint64_t{1} << (10 * (unit + 1)))) {
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  const double scaled =
      static_cast<double>(bytes) / static_cast<double>(std::uint64_t{1} << (10 * unit));
  return fmt::format("{:.2f} {}", scaled, kUnits[unit]);
}

// Alignments are powers of two, so they always print exactly in the largest unit dividing them.
std::string format_align(std::uint64_t align) {
  unsigned unit = 0;
  while (unit + 1 < std::size(kUnits) && align >= (std::uint64_t{1} << (10 * (unit + 1))) &&
         is_aligned(align, std::uint64_t{1} << (10 * (unit + 1)))) {
    ++unit;
  }
  return fmt::format("{} {}", align >> (10 * unit), kUnits[unit]);
}

std::string describe_backing(BackingKind kind, std::string_view what, std::uint64_t size,
                             std::uint64_t align, Pfn base, std::string_view suffix) {
  std::string out = backing_kind_name(kind);
  if (!what.empty()) {
    out += ' ';
    out += what;
  }
  out += fmt::format(" {} align {} pfn {:#x}-{:#x}", format_size(size), format_align(align), base,
                     base + (size >> kPageShift));
  out += suffix;
  return out;
}

Error sys_error(Errc code, std::string what, int err) {
  return Error(code, fmt::format("{}: errno {}", what, err), err);
}

// ---- validation -------------------------------------------------------------------------------

std::optional<Error> validate_geometry(std::string_view who, std::uint64_t size,
                                       std::uint64_t align) {
  if (align < kPageSize || (align & (align - 1)) != 0) {
    return Error(Errc::invalid_argument,
                 fmt::format("{}: align {} ({:#x}) must be a power of two >= {}", who, align, align,
                             kPageSize));
  }
  if (size == 0) {
    return Error(Errc::invalid_argument, fmt::format("{}: size 0 is not allowed", who));
  }
  if (!is_aligned(size, align)) {
    return Error(Errc::invalid_argument,
                 fmt::format("{}: size {} ({:#x}) is not a multiple of align {} ({:#x})", who, size,
                             size, align, align));
  }
  if (size > kMaxBackingSize || align > kMaxBackingSize) {
    return Error(Errc::invalid_argument,
                 fmt::format("{}: size {} ({:#x}) with align {} exceeds the largest mappable size "
                             "{:#x}",
                             who, size, size, align, kMaxBackingSize));
  }
  return std::nullopt;
}

// ---- simulated physical address space ---------------------------------------------------------

class SimulatedPhysSpace {
 public:
  Result<Pfn> allocate(std::uint64_t size, std::uint64_t align) {
    const Pfn granule = std::max(align, kSimulatedGranule) >> kPageShift;
    const std::uint64_t pages = size >> kPageShift;
    std::lock_guard<std::mutex> lock(mu_);
    const Pfn start = align_up(next_, granule);
    if (start < next_ || start > kSimulatedPfnLimit || pages > kSimulatedPfnLimit - start) {
      return Error(Errc::no_memory,
                   fmt::format("simulated physical address space exhausted: cannot place {} "
                               "bytes at pfn {:#x}",
                               size, next_));
    }
    next_ = start + pages;
    return start;
  }

  // A real device's pfns must not be handed out again as simulated ones.
  void reserve(Pfn start, std::uint64_t pages) {
    std::lock_guard<std::mutex> lock(mu_);
    if (start <= kSimulatedPfnLimit && pages <= kSimulatedPfnLimit - start) {
      next_ = std::max(next_, start + pages);
    }
  }

 private:
  std::mutex mu_;
  Pfn next_ = kSimulatedPhysBase >> kPageShift;
};

SimulatedPhysSpace& simulated_phys_space() {
  static SimulatedPhysSpace space;
  return space;
}

// ---- sanitizer shadow -------------------------------------------------------------------------

// ASAN_UNPOISON_MEMORY_REGION memsets the shadow, which for a 1 TiB backing would commit 128 GiB
// of shadow memory. Whole shadow pages are instead dropped with MADV_DONTNEED (they read back as
// zero, i.e. addressable), the way ASan clears shadow for large regions itself.
void unpoison_range(const std::byte* p, std::uint64_t n) noexcept {
#ifdef PGMAP_HAVE_ASAN
  constexpr std::uint64_t kDropThreshold = std::uint64_t{64} << 10;  // shadow bytes
  std::size_t scale = 0;
  std::size_t offset = 0;
  __asan_get_shadow_mapping(&scale, &offset);
  const auto mem_beg = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t mem_end = mem_beg + n;
  const std::uintptr_t shadow_beg = align_up((mem_beg >> scale) + offset, kPageSize);
  const std::uintptr_t shadow_end = align_down((mem_end >> scale) + offset, kPageSize);
  if (shadow_end > shadow_beg && shadow_end - shadow_beg >= kDropThreshold) {
    const std::uintptr_t drop_beg = (shadow_beg - offset) << scale;
    const std::uintptr_t drop_end = (shadow_end - offset) << scale;
    if (madvise(reinterpret_cast<void*>(shadow_beg), shadow_end - shadow_beg, MADV_DONTNEED) == 0) {
      sanitizer::unpoison(p, drop_beg - mem_beg);
      sanitizer::unpoison(reinterpret_cast<const void*>(drop_end), mem_end - drop_end);
      return;
    }
  }
#endif
  sanitizer::unpoison(p, n);
}

// ---- mappings ---------------------------------------------------------------------------------

class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  ~UniqueFd() { reset(); }
  int get() const noexcept { return fd_; }
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_;
};

// An aligned mapping that is unmapped unless release()d into a Backing.
class Mapping {
 public:
  Mapping(std::byte* data, std::uint64_t len) noexcept : data_(data), len_(len) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept : data_(std::exchange(o.data_, nullptr)), len_(o.len_) {}
  Mapping& operator=(Mapping&&) = delete;
  ~Mapping() {
    if (data_ != nullptr) ::munmap(data_, len_);
  }
  std::byte* data() const noexcept { return data_; }
  std::byte* release() noexcept { return std::exchange(data_, nullptr); }

 private:
  std::byte* data_;
  std::uint64_t len_;
};

// Over-reserves by `align` and unmaps the unaligned head and the tail, leaving exactly `size`
// bytes at an aligned address. With fd >= 0 the reservation is PROT_NONE and the file is mapped
// MAP_FIXED over its aligned part, so no other thread's mmap can take the address in between.
Result<Mapping> map_aligned(std::uint64_t size, std::uint64_t align, int fd, std::string_view who) {
  const std::uint64_t reserve_len = size + align;
  const int reserve_prot = fd >= 0 ? PROT_NONE : PROT_READ | PROT_WRITE;
  void* reserved = ::mmap(nullptr, reserve_len, reserve_prot,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED) {
    const int err = errno;
    return sys_error(Errc::no_memory,
                     fmt::format("{}: reserving {} bytes ({}) plus {} for alignment failed", who,
                                 size, format_size(size), format_align(align)),
                     err);
  }
  auto* const base = static_cast<std::byte*>(reserved);
  const auto base_addr = reinterpret_cast<std::uintptr_t>(base);
  std::byte* const data = base + (align_up(base_addr, align) - base_addr);
  const std::uint64_t head = static_cast<std::uint64_t>(data - base);
  const std::uint64_t tail = reserve_len - head - size;

  if (fd >= 0) {
    void* mapped = ::mmap(data, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (mapped == MAP_FAILED) {
      const int err = errno;
      ::munmap(base, reserve_len);
      return sys_error(
          err == ENOMEM ? Errc::no_memory : Errc::system_error,
          fmt::format("{}: shared mmap of {} bytes ({}) failed", who, size, format_size(size)),
          err);
    }
  }
  if (head != 0) ::munmap(base, head);
  if (tail != 0) ::munmap(data + size, tail);
  return Mapping(data, size);
}

void advise_hugepages(const Mapping& m, const BackingOptions& opts) {
  // Only a hint: THP may be disabled or unsupported for the mapping; the backing works anyway.
  if (opts.hugepage_advice && opts.align >= kPmdSize) {
    ::madvise(m.data(), opts.size, MADV_HUGEPAGE);
  }
}

// ---- sysfs ------------------------------------------------------------------------------------

std::optional<std::string> read_sysfs(const std::string& path) {
  std::ifstream in(path);
  std::string value;
  if (!in || !std::getline(in, value)) return std::nullopt;
  return value;
}

std::optional<std::uint64_t> parse_u64(const std::string& text, int base) {
  if (text.empty()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, base);
  if (errno != 0 || end == text.c_str() || text[0] == '-') return std::nullopt;
  while (*end == ' ' || *end == '\n')
    ++end;
  if (*end != '\0') return std::nullopt;
  return static_cast<std::uint64_t>(v);
}

std::string basename_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

// ---- Backing ----------------------------------------------------------------------------------

const char* backing_kind_name(BackingKind k) noexcept {
  switch (k) {
    case BackingKind::anonymous:
      return "anonymous";
    case BackingKind::memfd:
      return "memfd";
    case BackingKind::file:
      return "file";
    case BackingKind::devdax:
      return "devdax";
  }
  return "unknown";
}

Backing::~Backing() {
  if (map_base_ != nullptr) {
    // The shadow outlives the mapping: a revoked range left poisoned would turn the next
    // mapping at this address into false use-after-revoke reports.
    unpoison_range(data_, size_);
    if (kind_ != BackingKind::anonymous) ::msync(data_, size_, MS_SYNC);
    ::munmap(map_base_, map_len_);
  }
  if (fd_ >= 0) ::close(fd_);
}

Errc Backing::revoke(std::uint64_t offset, std::uint64_t len) const noexcept {
  if (len > size_ || offset > size_ - len) return Errc::out_of_range;
  sanitizer::poison(data_ + offset, len);
  return Errc::ok;
}

Errc Backing::restore(std::uint64_t offset, std::uint64_t len) const noexcept {
  if (len > size_ || offset > size_ - len) return Errc::out_of_range;
  unpoison_range(data_ + offset, len);
  return Errc::ok;
}

// Builds Backings: the only code allowed to call the protected constructor.
class BackingFactory {
 public:
  static Result<std::unique_ptr<Backing>> anonymous(const BackingOptions& opts) {
    if (auto err = validate_geometry("anonymous backing", opts.size, opts.align)) return *err;
    auto mapping = map_aligned(opts.size, opts.align, -1, "anonymous backing");
    if (!mapping) return mapping.error();
    advise_hugepages(*mapping, opts);
    return finish(BackingKind::anonymous, "", std::move(*mapping), opts.size, opts.align,
                  UniqueFd(), std::nullopt, "");
  }

  static Result<std::unique_ptr<Backing>> memfd(const BackingOptions& opts) {
    const std::string who = fmt::format("memfd backing '{}'", opts.name);
    if (auto err = validate_geometry(who, opts.size, opts.align)) return *err;
    UniqueFd fd(::memfd_create(opts.name.c_str(), MFD_CLOEXEC));
    if (fd.get() < 0) {
      const int err = errno;
      return sys_error(Errc::system_error, fmt::format("{}: memfd_create failed", who), err);
    }
    if (::ftruncate(fd.get(), static_cast<off_t>(opts.size)) != 0) {
      const int err = errno;
      return sys_error(Errc::system_error,
                       fmt::format("{}: ftruncate to {} bytes failed", who, opts.size), err);
    }
    auto mapping = map_aligned(opts.size, opts.align, fd.get(), who);
    if (!mapping) return mapping.error();
    advise_hugepages(*mapping, opts);
    return finish(BackingKind::memfd, opts.name, std::move(*mapping), opts.size, opts.align,
                  std::move(fd), std::nullopt, "");
  }

  static Result<std::unique_ptr<Backing>> file(const std::string& path,
                                               const BackingOptions& opts) {
    const std::string who = fmt::format("file backing {}", path);
    if (auto err = validate_geometry(who, opts.size, opts.align)) return *err;

    // On failure the file is put back as it was: removed if we created it, shrunk back if we
    // extended it.
    bool created = false;
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (fd.get() < 0 && errno == ENOENT) {
      fd = UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
      created = fd.get() >= 0;
    }
    if (fd.get() < 0) {
      const int err = errno;
      return sys_error(Errc::system_error, fmt::format("{}: open failed", who), err);
    }
    auto undo = [&](off_t old_size) {
      if (created) {
        ::unlink(path.c_str());
      } else if (old_size >= 0) {
        [[maybe_unused]] const int rc = ::truncate(path.c_str(), old_size);
      }
    };

    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) {
      const int err = errno;
      undo(-1);
      return sys_error(Errc::system_error, fmt::format("{}: fstat failed", who), err);
    }
    if (!S_ISREG(st.st_mode)) {
      undo(-1);
      return Error(Errc::invalid_argument, fmt::format("{}: not a regular file", who));
    }
    const off_t old_size = st.st_size;
    if (static_cast<std::uint64_t>(old_size) < opts.size) {
      if (::ftruncate(fd.get(), static_cast<off_t>(opts.size)) != 0) {
        const int err = errno;
        undo(old_size);
        return sys_error(Errc::system_error,
                         fmt::format("{}: extending to {} bytes failed", who, opts.size), err);
      }
    }
    auto mapping = map_aligned(opts.size, opts.align, fd.get(), who);
    if (!mapping) {
      undo(old_size);
      return mapping.error();
    }
    auto backing = finish(BackingKind::file, path, std::move(*mapping), opts.size, opts.align,
                          std::move(fd), std::nullopt, "");
    if (!backing) undo(old_size);
    return backing;
  }

  static Result<std::unique_ptr<Backing>> devdax(const std::string& path,
                                                 const BackingOptions& opts) {
    const std::string who = fmt::format("devdax backing {}", path);
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      const int err = errno;
      if (err == ENOENT || err == ENOTDIR) {
        return Error(Errc::not_found, fmt::format("{}: no such device", who), err);
      }
      return sys_error(Errc::system_error, fmt::format("{}: stat failed", who), err);
    }
    if (!S_ISCHR(st.st_mode)) {
      return Error(Errc::invalid_argument, fmt::format("{}: not a character device", who));
    }

    // The sysfs directory is named after the device; fall back to the dev_t link for device
    // nodes that were created under another name.
    std::string sysfs = std::string(kDevdaxSysfs) + basename_of(path);
    auto size_text = read_sysfs(sysfs + "/size");
    if (!size_text) {
      sysfs = fmt::format("/sys/dev/char/{}:{}", major(st.st_rdev), minor(st.st_rdev));
      size_text = read_sysfs(sysfs + "/size");
    }
    const auto dev_size = size_text ? parse_u64(*size_text, 10) : std::nullopt;
    if (!dev_size) {
      return Error(Errc::invalid_argument,
                   fmt::format("{}: not a device-dax device (no readable {}{}/size)", who,
                               kDevdaxSysfs, basename_of(path)));
    }
    std::uint64_t align = kPmdSize;
    if (auto align_text = read_sysfs(sysfs + "/align")) {
      const auto parsed = parse_u64(*align_text, 10);
      if (!parsed) {
        return Error(Errc::invalid_argument,
                     fmt::format("{}: unparsable {}/align '{}'", who, sysfs, *align_text));
      }
      align = *parsed;
    }
    const std::uint64_t size = opts.size == 0 ? *dev_size : opts.size;
    if (auto err = validate_geometry(who, size, align)) return *err;
    if (size > *dev_size) {
      return Error(Errc::invalid_argument,
                   fmt::format("{}: size {} exceeds the device size {}", who, size, *dev_size));
    }
    // The physical base is shown to root only; others see 0 or cannot read it.
    std::optional<Pfn> real_base;
    if (auto res_text = read_sysfs(sysfs + "/resource")) {
      const auto phys = parse_u64(*res_text, 16);
      if (phys && *phys != 0 && is_aligned(*phys, kPageSize)) real_base = *phys >> kPageShift;
    }

    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (fd.get() < 0) {
      const int err = errno;
      return sys_error(Errc::system_error, fmt::format("{}: open failed", who), err);
    }
    auto mapping = map_aligned(size, align, fd.get(), who);
    if (!mapping) return mapping.error();
    return finish(BackingKind::devdax, path, std::move(*mapping), size, align, std::move(fd),
                  real_base, real_base ? "" : " (simulated pfn)");
  }

 private:
  // Last step of every factory: nothing after the pfn allocation can fail except allocation of
  // the object, so failed creations never consume simulated physical address space.
  static Result<std::unique_ptr<Backing>> finish(BackingKind kind, std::string_view what,
                                                 Mapping mapping, std::uint64_t size,
                                                 std::uint64_t align, UniqueFd fd,
                                                 std::optional<Pfn> real_base,
                                                 std::string_view suffix) {
    Pfn base = 0;
    if (real_base) {
      base = *real_base;
      simulated_phys_space().reserve(base, size >> kPageShift);
    } else {
      auto allocated = simulated_phys_space().allocate(size, align);
      if (!allocated) return allocated.error();
      base = *allocated;
    }
    std::string description = describe_backing(kind, what, size, align, base, suffix);
    std::byte* data = mapping.data();
    std::unique_ptr<Backing> backing(
        new Backing(kind, data, size, align, base, std::move(description), data, size, fd.get()));
    mapping.release();
    fd.release();
    return backing;
  }
};

Result<std::unique_ptr<Backing>> make_anonymous_backing(const BackingOptions& opts) {
  return BackingFactory::anonymous(opts);
}

Result<std::unique_ptr<Backing>> make_memfd_backing(const BackingOptions& opts) {
  return BackingFactory::memfd(opts);
}

Result<std::unique_ptr<Backing>> make_file_backing(const std::string& path,
                                                   const BackingOptions& opts) {
  return BackingFactory::file(path, opts);
}

Result<std::unique_ptr<Backing>> open_devdax_backing(const std::string& path,
                                                     const BackingOptions& opts) {
  return BackingFactory::devdax(path, opts);
}

Result<std::string> find_devdax_device() {
  glob_t matches{};
  const int rc = ::glob("/dev/dax*.*", 0, nullptr, &matches);
  std::optional<std::string> found;
  if (rc == 0) {
    for (std::size_t i = 0; i < matches.gl_pathc && !found; ++i) {
      struct stat st {};
      if (::stat(matches.gl_pathv[i], &st) == 0 && S_ISCHR(st.st_mode)) {
        found = matches.gl_pathv[i];
      }
    }
  }
  ::globfree(&matches);
  if (found) return *found;
  if (rc != 0 && rc != GLOB_NOMATCH) {
    return Error(Errc::system_error, fmt::format("glob(/dev/dax*.*) failed with code {}", rc));
  }
  return Error(Errc::not_found, "no /dev/dax device on this machine (no /dev/dax*.* found)");
}

}  // namespace pgmap
