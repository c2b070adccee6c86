#include "pgmap/memory/backing.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "pgmap/core/sanitizer.h"

namespace pgmap {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint64_t kTiB = std::uint64_t{1} << 40;
constexpr Pfn kGiBPages = kGiB >> kPageShift;

BackingOptions options(std::uint64_t size, std::uint64_t align = kPmdSize) {
  BackingOptions o;
  o.size = size;
  o.align = align;
  return o;
}

std::unique_ptr<Backing> must(Result<std::unique_ptr<Backing>> r) {
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().to_string());
  return r.ok() ? std::move(r).value() : nullptr;
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
    ++n;
  return n;
}

// The first pfn the simulated allocator will hand out next: probing consumes one granule, so two
// probes with nothing in between are exactly 1 GiB of pfns apart.
Pfn probe_next_pfn() {
  auto b = must(make_anonymous_backing(options(kPageSize, kPageSize)));
  return b ? b->base_pfn() : 0;
}

// Fills `len` bytes at `p` with a pattern that depends on the position and `seed`.
std::byte pattern_byte(std::uint64_t i, unsigned seed) {
  return static_cast<std::byte>((i * 131 + seed) & 0xff);
}

void fill(std::byte* p, std::uint64_t len, unsigned seed) {
  for (std::uint64_t i = 0; i < len; ++i)
    p[i] = pattern_byte(i, seed);
}

bool has_pattern(const std::byte* p, std::uint64_t len, unsigned seed) {
  for (std::uint64_t i = 0; i < len; ++i) {
    if (p[i] != pattern_byte(i, seed)) return false;
  }
  return true;
}

// A scratch directory removed with everything in it at the end of each test.
class BackingFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "pgmap-backing-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << "mkdtemp: errno " << errno;
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

// ---- names and description --------------------------------------------------------------------

TEST(BackingKindNameTest, NamesEveryKind) {
  EXPECT_STREQ(backing_kind_name(BackingKind::anonymous), "anonymous");
  EXPECT_STREQ(backing_kind_name(BackingKind::memfd), "memfd");
  EXPECT_STREQ(backing_kind_name(BackingKind::file), "file");
  EXPECT_STREQ(backing_kind_name(BackingKind::devdax), "devdax");
}

TEST(BackingDescribeTest, AnonymousNamesSizeAlignAndPfns) {
  auto b = must(make_anonymous_backing(options(64 * kMiB)));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->describe(), fmt::format("anonymous 64.00 MiB align 2 MiB pfn {:#x}-{:#x}",
                                       b->base_pfn(), b->pfns().end()));
}

TEST(BackingDescribeTest, OtherKindsNameTheirObject) {
  BackingOptions o = options(4 * kMiB, kPageSize);
  o.name = "describe-me";
  auto m = must(make_memfd_backing(o));
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->describe(), fmt::format("memfd describe-me 4.00 MiB align 4 KiB pfn {:#x}-{:#x}",
                                       m->base_pfn(), m->pfns().end()));
}

// ---- anonymous --------------------------------------------------------------------------------

TEST(AnonymousBackingTest, ReportsGeometryAndHoldsData) {
  auto b = must(make_anonymous_backing(options(16 * kMiB)));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->kind(), BackingKind::anonymous);
  EXPECT_EQ(b->size(), 16 * kMiB);
  EXPECT_EQ(b->align(), kPmdSize);
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), kPmdSize));
  EXPECT_EQ(b->pfns().start, b->base_pfn());
  EXPECT_EQ(b->pfns().count, (16 * kMiB) >> kPageShift);
  fill(b->data(), b->size(), 7);
  EXPECT_TRUE(has_pattern(b->data(), b->size(), 7));
}

TEST(AnonymousBackingTest, HonoursEveryAlignment) {
  for (std::uint64_t align : {kPageSize, 64 * kPageSize, kPmdSize, kPudSize}) {
    SCOPED_TRACE(align);
    auto b = must(make_anonymous_backing(options(align, align)));
    ASSERT_NE(b, nullptr);
    EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), align));
    EXPECT_EQ(b->align(), align);
    b->data()[0] = std::byte{1};
    b->data()[align - 1] = std::byte{2};
    EXPECT_EQ(b->data()[0], std::byte{1});
    EXPECT_EQ(b->data()[align - 1], std::byte{2});
  }
}

TEST(AnonymousBackingTest, WithoutHugepageAdviceStillWorks) {
  BackingOptions o = options(4 * kMiB);
  o.hugepage_advice = false;
  auto b = must(make_anonymous_backing(o));
  ASSERT_NE(b, nullptr);
  fill(b->data(), b->size(), 3);
  EXPECT_TRUE(has_pattern(b->data(), b->size(), 3));
}

// Costs nothing until touched: three touched pages out of 1 TiB on a machine with far less RAM.
// Under ASan this also proves the destructor clears 128 GiB of shadow without committing it.
// ThreadSanitizer accepts mappings only inside its application ranges (1.5 TiB each on x86-64),
// and ASLR can place the binary or the libraries so that no free piece of them holds 1 TiB (about
// one run in six here, reported as ENOMEM): there the same test reserves 256 GiB.
TEST(AnonymousBackingTest, OneTebibyteFitsOnASmallMachine) {
  constexpr std::uint64_t kSize = sanitizer::kThread ? 256 * kGiB : kTiB;
  auto b = must(make_anonymous_backing(options(kSize, kPmdSize)));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->size(), kSize);
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), kPmdSize));
  const std::uint64_t offsets[] = {0, kSize / 2, kSize - 1};
  unsigned v = 0x11;
  for (std::uint64_t off : offsets)
    b->data()[off] = static_cast<std::byte>(v++);
  v = 0x11;
  for (std::uint64_t off : offsets)
    EXPECT_EQ(b->data()[off], static_cast<std::byte>(v++));
  EXPECT_EQ(b->describe(), fmt::format("anonymous {} align 2 MiB pfn {:#x}-{:#x}",
                                       kSize == kTiB ? "1.00 TiB" : "256.00 GiB", b->base_pfn(),
                                       b->base_pfn() + (kSize >> kPageShift)));
  EXPECT_EQ(b->address_of(b->base_pfn() + (kSize >> kPageShift) - 1),
            b->data() + kSize - kPageSize);
  b.reset();
}

TEST(AnonymousBackingTest, AddressOfMapsPfnsToBytes) {
  auto b = must(make_anonymous_backing(options(8 * kMiB)));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->address_of(b->base_pfn()), b->data());
  EXPECT_EQ(b->address_of(b->base_pfn() + 5), b->data() + 5 * kPageSize);
  EXPECT_EQ(b->address_of(b->pfns().end() - 1), b->data() + b->size() - kPageSize);
}

TEST(AnonymousBackingTest, UnmappableSizeIsNoMemoryAndLeaksNothing) {
  const Pfn before = probe_next_pfn();
  // 4 EiB of address space is far beyond the 47- or 56-bit user address space.
  auto r = make_anonymous_backing(options(std::uint64_t{1} << 62));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::no_memory);
  EXPECT_NE(r.error().sys_errno(), 0);
  EXPECT_THAT(r.error().message(), HasSubstr(std::to_string(std::uint64_t{1} << 62)));
  EXPECT_EQ(probe_next_pfn(), before + kGiBPages) << "a failed creation consumed pfns";
}

// ---- memfd ------------------------------------------------------------------------------------

// The fd is private to the backing; find it through /proc/self/fd by its unique memfd name.
int find_memfd(const std::string& name) {
  const std::string want = "/memfd:" + name + " (deleted)";
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec);
    if (!ec && target.string() == want) return std::stoi(e.path().filename().string());
  }
  return -1;
}

TEST(MemfdBackingTest, ReportsGeometryAndSharesBytesWithTheFd) {
  const std::size_t fds_before = open_fd_count();
  BackingOptions o = options(8 * kMiB);
  o.name = fmt::format("pgmap-test-{}", ::getpid());
  auto b = must(make_memfd_backing(o));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->kind(), BackingKind::memfd);
  EXPECT_EQ(b->size(), 8 * kMiB);
  EXPECT_EQ(b->align(), kPmdSize);
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), kPmdSize));
  fill(b->data(), b->size(), 5);
  EXPECT_TRUE(has_pattern(b->data(), b->size(), 5));

  const int fd = find_memfd(o.name);
  ASSERT_GE(fd, 0) << "memfd " << o.name << " not found in /proc/self/fd";
  EXPECT_NE(::fcntl(fd, F_GETFD) & FD_CLOEXEC, 0);
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), 8 * kMiB);
  // MAP_SHARED: the file sees writes through the mapping and the mapping sees writes to the file.
  std::vector<std::byte> buf(4096);
  const off_t off = static_cast<off_t>(3 * kMiB);
  ASSERT_EQ(::pread(fd, buf.data(), buf.size(), off), static_cast<ssize_t>(buf.size()));
  EXPECT_TRUE(std::equal(buf.begin(), buf.end(), b->data() + 3 * kMiB));
  const std::byte marker{0x5a};
  ASSERT_EQ(::pwrite(fd, &marker, 1, off), 1);
  EXPECT_EQ(b->data()[3 * kMiB], marker);

  b.reset();
  EXPECT_EQ(find_memfd(o.name), -1) << "destroying the backing must close its memfd";
  EXPECT_EQ(open_fd_count(), fds_before);
}

TEST(MemfdBackingTest, UnmappableSizeClosesTheFd) {
  const std::size_t fds_before = open_fd_count();
  const Pfn before = probe_next_pfn();
  auto r = make_memfd_backing(options(std::uint64_t{1} << 62));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.code(), ::testing::AnyOf(Errc::no_memory, Errc::system_error));
  EXPECT_NE(r.error().sys_errno(), 0);
  EXPECT_EQ(open_fd_count(), fds_before);
  EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
}

// ---- file -------------------------------------------------------------------------------------

TEST_F(BackingFileTest, CreatesFileAndPersistsWrites) {
  const std::string p = path("dev0");
  const std::size_t fds_before = open_fd_count();
  {
    auto b = must(make_file_backing(p, options(4 * kMiB)));
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(b->kind(), BackingKind::file);
    EXPECT_EQ(b->size(), 4 * kMiB);
    EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), kPmdSize));
    EXPECT_THAT(b->describe(), StartsWith("file " + p + " 4.00 MiB align 2 MiB pfn 0x"));
    fill(b->data(), b->size(), 9);
  }
  EXPECT_EQ(open_fd_count(), fds_before);
  struct stat st {};
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), 4 * kMiB);

  std::ifstream in(p, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_EQ(bytes.size(), 4 * kMiB);
  EXPECT_TRUE(has_pattern(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size(), 9));
}

TEST_F(BackingFileTest, ReusesExistingContentAndNeverShrinks) {
  const std::string p = path("existing");
  {
    std::vector<char> content(6 * kMiB);
    fill(reinterpret_cast<std::byte*>(content.data()), content.size(), 4);
    std::ofstream out(p, std::ios::binary);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
  }
  {
    auto b = must(make_file_backing(p, options(4 * kMiB)));
    ASSERT_NE(b, nullptr);
    EXPECT_TRUE(has_pattern(b->data(), b->size(), 4));
  }
  EXPECT_EQ(std::filesystem::file_size(p), 6 * kMiB);
}

TEST_F(BackingFileTest, ExtendsAShorterFile) {
  const std::string p = path("short");
  { std::ofstream(p, std::ios::binary) << "hello"; }
  auto b = must(make_file_backing(p, options(2 * kMiB)));
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(std::filesystem::file_size(p), 2 * kMiB);
  EXPECT_EQ(b->data()[0], std::byte{'h'});
  EXPECT_EQ(b->data()[4], std::byte{'o'});
  EXPECT_EQ(b->data()[5], std::byte{0});
}

TEST_F(BackingFileTest, MissingDirectoryIsSystemErrorWithErrno) {
  const std::size_t fds_before = open_fd_count();
  const Pfn before = probe_next_pfn();
  const std::string p = path("no-such-dir/dev0");
  auto r = make_file_backing(p, options(2 * kMiB));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::system_error);
  EXPECT_EQ(r.error().sys_errno(), ENOENT);
  EXPECT_THAT(r.error().message(), HasSubstr(p));
  EXPECT_FALSE(std::filesystem::exists(path("no-such-dir")));
  EXPECT_EQ(open_fd_count(), fds_before);
  EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
}

TEST_F(BackingFileTest, DirectoryIsRejected) {
  auto r = make_file_backing(dir_.string(), options(2 * kMiB));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::system_error);
  EXPECT_EQ(r.error().sys_errno(), EISDIR);
}

// ext4 and friends refuse a 4 EiB file; tmpfs accepts it and the mapping fails instead. Either
// way the failure must leave the directory as it was.
TEST_F(BackingFileTest, FailureAfterCreateRemovesTheFile) {
  const std::size_t fds_before = open_fd_count();
  const std::string p = path("huge");
  auto r = make_file_backing(p, options(std::uint64_t{1} << 62));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().sys_errno(), 0);
  EXPECT_FALSE(std::filesystem::exists(p));
  EXPECT_EQ(open_fd_count(), fds_before);
}

TEST_F(BackingFileTest, FailureRestoresTheSizeOfAnExistingFile) {
  const std::string p = path("small");
  { std::ofstream(p, std::ios::binary) << "0123456789"; }
  auto r = make_file_backing(p, options(std::uint64_t{1} << 62));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(std::filesystem::file_size(p), 10u);
}

// ---- validation -------------------------------------------------------------------------------

struct InvalidCase {
  const char* what;
  std::uint64_t size;
  std::uint64_t align;
  std::string expect_in_message;
};

std::vector<InvalidCase> invalid_cases() {
  const std::uint64_t huge = std::numeric_limits<std::uint64_t>::max() - kPmdSize + 1;
  return {
      {"size 0", 0, kPmdSize, "size 0"},
      {"align 0", kPmdSize, 0, "align 0"},
      {"align not a power of two", 12 * kPageSize, 3 * kPageSize, "align 12288"},
      {"align below 4 KiB", 2048, 2048, "align 2048"},
      {"size not a multiple of align", 3 * kMiB, kPmdSize, "size 3145728"},
      {"size + align overflows", huge, kPmdSize, std::to_string(huge)},
  };
}

class BackingValidationTest : public BackingFileTest {};

TEST_F(BackingValidationTest, AnonymousRejectsBadGeometryAndChangesNothing) {
  for (const auto& c : invalid_cases()) {
    SCOPED_TRACE(c.what);
    const Pfn before = probe_next_pfn();
    auto r = make_anonymous_backing(options(c.size, c.align));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.code(), Errc::invalid_argument);
    EXPECT_THAT(r.error().message(), HasSubstr(c.expect_in_message));
    EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
  }
}

TEST_F(BackingValidationTest, MemfdRejectsBadGeometryAndChangesNothing) {
  const std::size_t fds_before = open_fd_count();
  for (const auto& c : invalid_cases()) {
    SCOPED_TRACE(c.what);
    const Pfn before = probe_next_pfn();
    auto r = make_memfd_backing(options(c.size, c.align));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.code(), Errc::invalid_argument);
    EXPECT_THAT(r.error().message(), HasSubstr(c.expect_in_message));
    EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
  }
  EXPECT_EQ(open_fd_count(), fds_before);
}

TEST_F(BackingValidationTest, FileRejectsBadGeometryAndCreatesNothing) {
  const std::size_t fds_before = open_fd_count();
  const std::string p = path("never");
  for (const auto& c : invalid_cases()) {
    SCOPED_TRACE(c.what);
    const Pfn before = probe_next_pfn();
    auto r = make_file_backing(p, options(c.size, c.align));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.code(), Errc::invalid_argument);
    EXPECT_THAT(r.error().message(), HasSubstr(c.expect_in_message));
    EXPECT_FALSE(std::filesystem::exists(p));
    EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
  }
  EXPECT_EQ(open_fd_count(), fds_before);
}

// ---- simulated physical address space ---------------------------------------------------------

TEST(SimulatedPfnTest, BackingsGetDisjointAlignedRangesAboveOneTebibyte) {
  auto a = must(make_anonymous_backing(options(64 * kMiB)));
  auto b = must(make_memfd_backing(options(3 * kGiB, kPudSize)));
  auto c = must(make_anonymous_backing(options(8 * kMiB, kPageSize)));
  ASSERT_TRUE(a && b && c);
  const Backing* all[] = {a.get(), b.get(), c.get()};
  for (const Backing* x : all) {
    SCOPED_TRACE(x->describe());
    EXPECT_GE(x->base_pfn() << kPageShift, kTiB);
    EXPECT_TRUE(is_aligned(x->base_pfn() << kPageShift, x->align()));
    EXPECT_TRUE(is_aligned(x->base_pfn() << kPageShift, kGiB));
    EXPECT_EQ(x->pfns().bytes(), x->size());
    for (const Backing* y : all) {
      if (x != y) {
        EXPECT_FALSE(x->pfns().overlaps(y->pfns())) << y->describe();
      }
    }
  }
}

TEST(SimulatedPfnTest, ConcurrentCreationsGetDisjointRanges) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 16;
  std::vector<std::vector<PfnRange>> ranges(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&ranges, t] {
      for (int i = 0; i < kPerThread; ++i) {
        auto r = make_anonymous_backing(options(2 * kMiB));
        if (r.ok()) ranges[static_cast<std::size_t>(t)].push_back((*r)->pfns());
      }
    });
  }
  for (auto& th : threads)
    th.join();
  std::vector<PfnRange> all;
  for (const auto& v : ranges)
    all.insert(all.end(), v.begin(), v.end());
  ASSERT_EQ(all.size(), static_cast<std::size_t>(kThreads * kPerThread));
  std::sort(all.begin(), all.end(),
            [](const PfnRange& a, const PfnRange& b) { return a.start < b.start; });
  for (std::size_t i = 1; i < all.size(); ++i) {
    EXPECT_LE(all[i - 1].end(), all[i].start) << "ranges " << i - 1 << " and " << i << " overlap";
  }
}

TEST(SimulatedPfnTest, PfnsAreNeverReused) {
  auto a = must(make_anonymous_backing(options(4 * kMiB)));
  ASSERT_NE(a, nullptr);
  const PfnRange old = a->pfns();
  a.reset();
  auto b = must(make_anonymous_backing(options(4 * kMiB)));
  ASSERT_NE(b, nullptr);
  EXPECT_GE(b->base_pfn(), old.end());
}

TEST(SimulatedPfnTest, LargeAlignmentAlignsThePfnRange) {
  // 4 GiB alignment exceeds the 1 GiB granule, so the physical base must honour it too.
  const std::uint64_t align = 4 * kGiB;
  auto filler = must(make_anonymous_backing(options(kPageSize, kPageSize)));
  auto b = must(make_anonymous_backing(options(align, align)));
  ASSERT_TRUE(filler && b);
  EXPECT_TRUE(is_aligned(b->base_pfn() << kPageShift, align));
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b->data()), align));
}

// ---- revoke / restore -------------------------------------------------------------------------

TEST(RevokeTest, OutOfRangeIsRejected) {
  auto b = must(make_anonymous_backing(options(4 * kMiB)));
  ASSERT_NE(b, nullptr);
  const std::uint64_t size = b->size();
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  for (auto [off, len] : {std::pair{size, std::uint64_t{1}}, std::pair{size - 4096, 8192ul},
                          std::pair{std::uint64_t{0}, size + 1}, std::pair{max, std::uint64_t{2}},
                          std::pair{std::uint64_t{4096}, max}, std::pair{max, max}}) {
    SCOPED_TRACE(fmt::format("offset {:#x} len {:#x}", off, len));
    EXPECT_EQ(b->revoke(off, len), Errc::out_of_range);
    EXPECT_EQ(b->restore(off, len), Errc::out_of_range);
  }
  EXPECT_FALSE(sanitizer::is_poisoned(b->data(), b->size()));
  EXPECT_EQ(b->revoke(size, 0), Errc::ok);
  EXPECT_EQ(b->revoke(0, size), Errc::ok);
  EXPECT_EQ(b->restore(0, size), Errc::ok);
  EXPECT_FALSE(sanitizer::is_poisoned(b->data(), b->size()));
}

TEST(RevokeTest, RevokePoisonsAndRestoreClears) {
  auto b = must(make_anonymous_backing(options(4 * kMiB)));
  ASSERT_NE(b, nullptr);
  std::byte* const d = b->data();
  ASSERT_EQ(b->revoke(kMiB, 2 * kPageSize), Errc::ok);
  if constexpr (sanitizer::kAddress) {
    EXPECT_TRUE(sanitizer::is_poisoned(d + kMiB, 1));
    EXPECT_TRUE(sanitizer::is_poisoned(d + kMiB + 2 * kPageSize - 1, 1));
    EXPECT_FALSE(sanitizer::is_poisoned(d + kMiB - 1, 1));
    EXPECT_FALSE(sanitizer::is_poisoned(d + kMiB + 2 * kPageSize, 1));
  }
  ASSERT_EQ(b->restore(kMiB, 2 * kPageSize), Errc::ok);
  EXPECT_FALSE(sanitizer::is_poisoned(d, b->size()));
  d[kMiB] = std::byte{1};  // an ASan report here would mean restore did not unpoison
  EXPECT_EQ(d[kMiB], std::byte{1});
}

// Large restores take a different path (whole shadow pages are dropped); its unaligned edges must
// still be exact.
TEST(RevokeTest, RestoringALargeRangeIsExactAtItsEdges) {
  auto b = must(make_anonymous_backing(options(64 * kGiB)));
  ASSERT_NE(b, nullptr);
  std::byte* const d = b->data();
  const std::uint64_t size = b->size();
  ASSERT_EQ(b->revoke(0, kPageSize), Errc::ok);
  ASSERT_EQ(b->revoke(size / 2, kMiB), Errc::ok);
  ASSERT_EQ(b->revoke(size - kPageSize, kPageSize), Errc::ok);
  if constexpr (sanitizer::kAddress) {
    EXPECT_TRUE(sanitizer::is_poisoned(d, 1));
    EXPECT_TRUE(sanitizer::is_poisoned(d + size / 2, 1));
    EXPECT_TRUE(sanitizer::is_poisoned(d + size - 1, 1));
  }
  const std::uint64_t edge = kPageSize / 2;
  ASSERT_EQ(b->restore(edge, size - 2 * edge), Errc::ok);
  for (std::uint64_t off : {edge, kPageSize - 1, size / 2, size / 2 + kMiB - 1, size - edge - 1}) {
    EXPECT_FALSE(sanitizer::is_poisoned(d + off, 1)) << off;
  }
  if constexpr (sanitizer::kAddress) {
    EXPECT_TRUE(sanitizer::is_poisoned(d + edge - 1, 1));
    EXPECT_TRUE(sanitizer::is_poisoned(d + size - edge, 1));
  }
  ASSERT_EQ(b->restore(0, size), Errc::ok);
  EXPECT_FALSE(sanitizer::is_poisoned(d, edge));
  EXPECT_FALSE(sanitizer::is_poisoned(d + size - edge, edge));
}

TEST(RevokeTest, DestructorUnpoisonsTheWholeRange) {
  auto b = must(make_anonymous_backing(options(8 * kMiB)));
  ASSERT_NE(b, nullptr);
  const std::byte* const d = b->data();
  const std::uint64_t size = b->size();
  ASSERT_EQ(b->revoke(0, size), Errc::ok);
  b.reset();
  // Only the shadow is inspected, so the unmapped address is fine to ask about.
  EXPECT_FALSE(sanitizer::is_poisoned(d, size));
  // A new mapping landing on the same addresses must be usable.
  auto again = must(make_anonymous_backing(options(8 * kMiB)));
  ASSERT_NE(again, nullptr);
  fill(again->data(), again->size(), 1);
  EXPECT_TRUE(has_pattern(again->data(), again->size(), 1));
}

// ---- devdax -----------------------------------------------------------------------------------

TEST(DevdaxTest, MissingDeviceIsNotFound) {
  const std::size_t fds_before = open_fd_count();
  const Pfn before = probe_next_pfn();
  const std::string p = "/dev/dax-pgmap-missing.0";
  auto r = open_devdax_backing(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::not_found);
  EXPECT_THAT(r.error().message(), HasSubstr(p));
  EXPECT_EQ(open_fd_count(), fds_before);
  EXPECT_EQ(probe_next_pfn(), before + kGiBPages);
}

TEST(DevdaxTest, MissingParentDirectoryIsNotFound) {
  auto r = open_devdax_backing("/no-such-dir-pgmap/dax0.0");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::not_found);
}

TEST_F(BackingFileTest, DevdaxRejectsARegularFile) {
  const std::string p = path("dax0.0");
  { std::ofstream(p) << "not a device"; }
  auto r = open_devdax_backing(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::invalid_argument);
  EXPECT_THAT(r.error().message(), HasSubstr("not a character device"));
}

TEST(DevdaxTest, RejectsACharacterDeviceThatIsNotDax) {
  const std::size_t fds_before = open_fd_count();
  auto r = open_devdax_backing("/dev/null");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::invalid_argument);
  EXPECT_THAT(r.error().message(), HasSubstr("/dev/null"));
  EXPECT_EQ(open_fd_count(), fds_before);
}

TEST(DevdaxTest, FindReportsNotFoundOrADevice) {
  auto r = find_devdax_device();
  if (r.ok()) {
    EXPECT_THAT(*r, StartsWith("/dev/dax"));
  } else {
    EXPECT_EQ(r.code(), Errc::not_found);
    EXPECT_THAT(r.error().message(), HasSubstr("no /dev/dax device"));
  }
}

TEST(DevdaxTest, MapsARealDevice) {
  auto dev = find_devdax_device();
  if (!dev.ok()) GTEST_SKIP() << "no /dev/dax device on this machine";
  auto r = open_devdax_backing(*dev);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const Backing& b = **r;
  EXPECT_EQ(b.kind(), BackingKind::devdax);
  EXPECT_GT(b.size(), 0u);
  EXPECT_TRUE(is_aligned(b.size(), b.align()));
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(b.data()), b.align()));
  EXPECT_THAT(b.describe(), StartsWith("devdax " + *dev));
  // Read only: the device may hold someone's data.
  [[maybe_unused]] volatile std::byte first = b.data()[0];
}

}  // namespace
}  // namespace pgmap
