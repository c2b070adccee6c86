// Layout breaking and eviction against every holder a DAX page can have besides mappings
// (T4, T6, T7; I7, I8, I16; bugs 5.3, 5.4, 5.16): truncate / punch hole / zero range / collapse
// range wait for pins, GUP references, direct-I/O requests and pipe buffers — whichever drops
// the last reference wakes them, also when they are already asleep — and no block is freed or
// reused while anything still holds its page.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/pipe.h"
#include "pgmap/mm/gup.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class LayoutTest : public FsTest {
 protected:
  // A file of `pages` written pages, mapped shared read-write and faulted in.
  void setup_file(std::uint64_t pages) {
    file_ = must_create("victim");
    data_ = pattern(pages * kPageSize, 7);
    ASSERT_TRUE(file_.inode().write(0, data_.data(), data_.size()));
    as_ = std::make_unique<mm::AddressSpace>();
    auto a = as_->mmap(0, pages * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared,
                       file_.mapping(), 0);
    ASSERT_TRUE(a);
    addr_ = *a;
    std::vector<std::byte> back(data_.size());
    ASSERT_FALSE(as_->read(addr_, back.data(), back.size()));
  }
  void TearDown() override {
    as_.reset();
    file_.close();
    FsTest::TearDown();
  }
  Pfn pfn_of_page(std::uint64_t page) { return pfn_of_block(*file_.inode().block_of(page)); }

  File file_;
  std::vector<std::byte> data_;
  std::unique_ptr<mm::AddressSpace> as_;
  std::uint64_t addr_ = 0;
};

// T4 + T6 (bug 5.4): a DIO pin on a page that is no longer mapped anywhere still blocks truncate;
// the block is freed only after the asynchronous completion unpins it.
TEST_P(LayoutTest, TruncateWaitsForPinOnUnmappedPage) {
  setup_file(2);
  auto dio = DioRequest::submit(*as_, addr_ + kPageSize, 1);
  ASSERT_TRUE(dio) << dio.error().to_string();
  const std::uint64_t block = *file_.inode().block_of(1);
  const Pfn pfn = pfn_of_page(1);
  ASSERT_EQ(as_->munmap(addr_, 2 * kPageSize), Errc::ok);  // unmapped, still pinned
  Status result;
  std::atomic<bool> done{false};
  std::thread t([&] {
    result = file_.inode().truncate(0);
    done.store(true);
  });
  ASSERT_TRUE(waiter_asleep(pfn));
  EXPECT_FALSE(done.load());
  EXPECT_EQ(fs_->allocator().share_count(block), 1u);  // I7: not freed while pinned
  EXPECT_EQ(file_.inode().i_size(), 2 * kPageSize);
  (*dio)->complete_async(std::byte{0xab});
  EXPECT_EQ((*dio)->wait(), Errc::ok);
  t.join();
  EXPECT_TRUE(result) << result.to_string();
  EXPECT_EQ(file_.inode().i_size(), 0u);
  EXPECT_EQ(fs_->allocator().share_count(block), 0u);
  EXPECT_EQ(file_.inode().entries().size(), 0u);
}

TEST_P(LayoutTest, NowaitReturnsBusyAndChangesNothing) {
  setup_file(2);
  auto pins = mm::pin_user_pages(*as_, addr_, 1, 0);
  ASSERT_TRUE(pins);
  BreakOptions o;
  o.nowait = true;
  Status s = file_.inode().truncate(0, o);
  EXPECT_EQ(s.code(), Errc::busy);
  EXPECT_EQ(file_.inode().i_size(), 2 * kPageSize);
  EXPECT_TRUE(file_.inode().block_of(0));
  FallocOptions fo;
  fo.brk.nowait = true;
  EXPECT_EQ(file_.inode().fallocate(FallocMode::punch_hole, 0, kPageSize, fo).code(), Errc::busy);
  EXPECT_TRUE(file_.inode().block_of(0));
  std::vector<std::byte> back(2 * kPageSize);
  ASSERT_TRUE(file_.inode().read(0, back.data(), back.size()));
  EXPECT_EQ(back, data_);
  EXPECT_EQ(mm::unpin_user_pages(*pins), Errc::ok);
  EXPECT_TRUE(file_.inode().truncate(0, o));
}

TEST_P(LayoutTest, InterruptibleWaitCanBeInterrupted) {
  setup_file(1);
  auto pins = mm::pin_user_pages(*as_, addr_, 1, 0);
  ASSERT_TRUE(pins);
  const Pfn pfn = pfn_of_page(0);
  Interrupt intr;
  Status result;
  std::thread t([&] {
    BreakOptions o;
    o.interrupt = &intr;
    result = file_.inode().truncate(0, o);
  });
  ASSERT_TRUE(waiter_asleep(pfn));
  intr.raise();
  t.join();
  EXPECT_EQ(result.code(), Errc::interrupted);
  EXPECT_EQ(file_.inode().i_size(), kPageSize);
  EXPECT_TRUE(file_.inode().block_of(0));
  EXPECT_EQ(mm::unpin_user_pages(*pins), Errc::ok);
}

TEST_P(LayoutTest, BoundedWaitTimesOutWithHolderReport) {
  setup_file(1);
  auto pins = mm::pin_user_pages(*as_, addr_, 1, 0);
  ASSERT_TRUE(pins);
  BreakOptions o;
  o.timeout = std::chrono::milliseconds(20);
  Status s = file_.inode().truncate(0, o);
  ASSERT_EQ(s.code(), Errc::timed_out);
  ASSERT_NE(s.error().holders(), nullptr);
  EXPECT_GE(s.error().holders()->total_busy, 1u);
  EXPECT_EQ(file_.inode().i_size(), kPageSize);
  EXPECT_EQ(mm::unpin_user_pages(*pins), Errc::ok);
}

// A fault while break_layout sleeps (the wait drops the invalidate lock) maps the busy page again,
// and then the pin goes: the refcount comes down to the new mapping's reference, not to 0, so no
// put wakes the waiter although the page is idle for it (refcount = mapcount). The wait must see
// it anyway, and its next round unmaps the page and finds it idle. (pgmap-stress --fs hung there:
// a reflink's wait without a deadline on a folio of refcount 1, mapcount 1.) The bound only turns
// a hang into a failure.
TEST_P(LayoutTest, BreakLayoutSeesIdleWhenARefaultHoldsTheLastReference) {
  setup_file(1);
  auto dio = DioRequest::submit(*as_, addr_, 1);
  ASSERT_TRUE(dio) << dio.error().to_string();
  const Pfn pfn = pfn_of_page(0);
  Interrupt intr;  // frees the thread if the break never returns (the test fails then)
  Status result;
  std::atomic<bool> done{false};
  std::thread t([&] {
    BreakOptions o;
    o.interrupt = &intr;
    result = file_.inode().break_layout(0, 1, o);
    done.store(true);
  });
  ASSERT_TRUE(waiter_asleep(pfn));
  EXPECT_FALSE(as_->lookup(addr_));  // the break unmapped it before it slept
  std::byte b{};
  EXPECT_FALSE(as_->read(addr_, &b, 1));  // faulted in again under the sleeping break
  EXPECT_TRUE(as_->lookup(addr_));
  EXPECT_EQ((*dio)->complete(std::byte{0xcd}), Errc::ok);  // unpins: the mapping's ref is left
  const bool returned = testutil::eventually([&] { return done.load(); });
  EXPECT_TRUE(returned) << "break_layout still asleep 10 s after its page went idle";
  if (!returned) intr.raise();
  t.join();
  EXPECT_TRUE(result) << result.to_string();
  EXPECT_FALSE(as_->lookup(addr_));   // its next round unmapped the page again
  EXPECT_EQ(ref_of(pfn).load(), 0u);  // no mapping, no pin
}

// A store through a mapping caught between its look-up of the entry and its copy (yield point
// access.before_copy) while truncate frees the block and another file gets it. The kernel's zap
// returns after the TLB flush, so such a store lands before the block is freed; here the break
// waits for the access's read section. Without that wait the store landed in the other file's
// block (pgmap-stress --fs, seed 23519509765207: a record of one file read back in another).
std::atomic<std::thread::id> g_caught_writer;
std::atomic<bool> g_writer_caught{false};
std::atomic<bool> g_writer_released{false};

void hold_caught_writer(const char* name) noexcept {
  if (std::strcmp(name, "access.before_copy") != 0 ||
      std::this_thread::get_id() != g_caught_writer.load()) {
    return;
  }
  g_writer_caught.store(true);
  // Bounded: with the wait in place, truncate cannot return before this store is done.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (!g_writer_released.load() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

TEST_P(LayoutTest, TruncateWaitsForAStoreCaughtBetweenLookupAndCopy) {
  if (!kYieldPointsEnabled) GTEST_SKIP() << "needs yield points (debug, asan, tsan presets)";
  setup_file(1);
  const std::uint64_t block = *file_.inode().block_of(0);
  g_writer_caught.store(false);
  g_writer_released.store(false);
  const YieldHook old_hook = set_yield_hook(hold_caught_writer);
  std::thread writer([&] {
    g_caught_writer.store(std::this_thread::get_id());
    const std::vector<std::byte> stale(64, std::byte{0xab});
    EXPECT_FALSE(as_->write(addr_, stale.data(), stale.size()));
  });
  ASSERT_TRUE(testutil::eventually([] { return g_writer_caught.load(); }));
  EXPECT_TRUE(file_.inode().truncate(0));
  File other = must_create("other");
  FallocOptions o;
  o.pmd_aligned = true;
  EXPECT_TRUE(other.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
  g_writer_released.store(true);
  writer.join();
  (void)set_yield_hook(old_hook);
  // The other file got the freed block (else this test proves nothing), and reads it as zeros.
  std::optional<std::uint64_t> page;
  for (const auto& [pg, b] : other.inode().snapshot().blocks) {
    if (b == block) page = pg;
  }
  ASSERT_TRUE(page) << "block " << block << " was not reallocated to the other file";
  std::vector<std::byte> back(kPageSize);
  ASSERT_TRUE(other.inode().read(*page * kPageSize, back.data(), back.size()));
  EXPECT_EQ(back, std::vector<std::byte>(kPageSize)) << "the stale store landed in block " << block;
}

// The break's wait for in-flight accesses is not a grace period of the global RCU: a global read
// section may itself wait for the inode lock the break holds (kill's pre-remove takes inode locks
// inside the device's read lock), so truncate must not wait for one. It did, in a first version
// of the wait (ctest stress_fs_per_lookup hung under ASan).
TEST_P(LayoutTest, TruncateDoesNotWaitForAGlobalReadSection) {
  setup_file(1);
  std::atomic<bool> in_section{false};
  std::atomic<bool> truncated{false};
  bool waited_out = false;
  std::thread reader([&] {
    dax::DaxDevice::ReadLock lock;  // the device's read lock is a global read section
    in_section.store(true);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (!truncated.load() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    waited_out = !truncated.load();
  });
  ASSERT_TRUE(testutil::eventually([&] { return in_section.load(); }));
  EXPECT_TRUE(file_.inode().truncate(0));  // zaps the mapped page: the break waits for accesses
  truncated.store(true);
  reader.join();
  EXPECT_FALSE(waited_out) << "truncate waited for the read section to end";
}

// I16: whichever holder drops the last reference wakes a break_layout that is already asleep.
// A lost wake-up makes the bounded wait time out (the test then fails instead of hanging).
enum class Holder { dio, pipe, gup_ref, gup_pin };

TEST_P(LayoutTest, EveryReleasePathWakesSleepingBreakLayout) {
  for (Holder h : {Holder::dio, Holder::pipe, Holder::gup_ref, Holder::gup_pin}) {
    for (FallocMode mode :
         {FallocMode::punch_hole, FallocMode::zero_range, FallocMode::collapse_range}) {
      SCOPED_TRACE(::testing::Message()
                   << "holder " << static_cast<int>(h) << " mode " << static_cast<int>(mode));
      setup_file(3);
      const Pfn pfn = pfn_of_page(1);
      const std::uint64_t block = *file_.inode().block_of(1);
      std::unique_ptr<DioRequest> dio;
      std::optional<PipeBuffer> pipe;
      mm::ReferencedPages refs;
      mm::PinnedPages pins;
      switch (h) {
        case Holder::dio:
          dio = std::move(DioRequest::submit(*as_, addr_ + kPageSize, 1).value());
          break;
        case Holder::pipe:
          pipe.emplace(std::move(PipeBuffer::vmsplice(*as_, addr_ + kPageSize, 1).value()));
          break;
        case Holder::gup_ref:
          refs = std::move(mm::get_user_pages(*as_, addr_ + kPageSize, 1, 0).value());
          break;
        case Holder::gup_pin:
          pins = std::move(mm::pin_user_pages(*as_, addr_ + kPageSize, 1, 0).value());
          break;
      }
      Status result;
      std::thread t([&] {
        FallocOptions o;
        o.brk.timeout = std::chrono::seconds(120);
        result = file_.inode().fallocate(mode, kPageSize, kPageSize, o);
      });
      ASSERT_TRUE(waiter_asleep(pfn));
      EXPECT_EQ(fs_->allocator().share_count(block), 1u);
      switch (h) {
        case Holder::dio:
          dio->complete_async(std::byte{1});
          EXPECT_EQ(dio->wait(), Errc::ok);
          break;
        case Holder::pipe: {
          auto bytes = pipe->consume();
          ASSERT_TRUE(bytes);
          EXPECT_EQ(std::memcmp(bytes->data(), data_.data() + kPageSize, kPageSize), 0);
          break;
        }
        case Holder::gup_ref:
          EXPECT_EQ(mm::put_pages(refs), Errc::ok);
          break;
        case Holder::gup_pin:
          EXPECT_EQ(mm::unpin_user_pages(pins), Errc::ok);
          break;
      }
      t.join();
      EXPECT_TRUE(result) << result.to_string();
      EXPECT_EQ(fs_->allocator().share_count(block), 0u);
      as_.reset();
      file_.close();
      ASSERT_EQ(fs_->unlink("victim"), Errc::ok);
    }
  }
}

// ---- eviction (I8, T7, bug 5.3, bug 5.16)
// ---------------------------------------------------------

class EvictionTest : public LayoutTest {
 protected:
  void SetUp() override {
    MountOptions o;
    o.evict_report_every = std::chrono::milliseconds(20);
    o.on_evict_report = [this](const Inode&, const HolderReport& rep) {
      std::lock_guard<std::mutex> lock(mu_);
      reports_.push_back(rep);
    };
    mount(GetParam(), std::move(o));
  }
  std::mutex mu_;
  std::vector<HolderReport> reports_;
};

// The blocks of an evicted file are not handed to another file while a pipe still references
// one: the pipe's reader sees the old file's bytes, never the new file's.
TEST_P(EvictionTest, EvictionWaitsForPipeAndBlockIsNotReused) {
  setup_file(2);
  const Pfn pfn = pfn_of_page(1);
  const std::uint64_t block = *file_.inode().block_of(1);
  auto pipe = PipeBuffer::vmsplice(*as_, addr_ + kPageSize, 1);
  ASSERT_TRUE(pipe);
  as_.reset();  // every mapping gone
  ASSERT_EQ(fs_->unlink("victim"), Errc::ok);
  std::atomic<bool> closed{false};
  std::thread t([&] {
    file_.close();  // the final iput: evicts, waiting uninterruptibly
    closed.store(true);
  });
  ASSERT_TRUE(waiter_asleep(pfn));
  EXPECT_FALSE(closed.load());
  // Another file takes every free block: never the one the pipe holds.
  File g = must_create("new");
  const std::uint64_t free_blocks = fs_->allocator().free_blocks();
  ASSERT_TRUE(g.inode().fallocate(FallocMode::allocate, 0, free_blocks * kPageSize));
  auto fm = g.inode().fiemap();
  ASSERT_TRUE(fm);
  for (const FiemapExtent& e : *fm) {
    const std::uint64_t b0 = e.physical >> kPageShift;
    EXPECT_FALSE(block >= b0 && block < b0 + (e.length >> kPageShift));
  }
  auto fill = pattern(kPageSize, 99);
  for (std::uint64_t off = 0; off < free_blocks * kPageSize; off += kPageSize)
    ASSERT_TRUE(g.inode().write(off, fill.data(), kPageSize));
  ASSERT_TRUE(testutil::eventually([&] {
    std::lock_guard<std::mutex> lock(mu_);
    return !reports_.empty();
  }));
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSERT_FALSE(reports_.front().busy.empty());
    EXPECT_EQ(reports_.front().busy.front().pfn, pfn);  // the report names the held page
  }
  auto bytes = pipe->consume();
  ASSERT_TRUE(bytes);
  EXPECT_EQ(std::memcmp(bytes->data(), data_.data() + kPageSize, kPageSize), 0);
  t.join();
  EXPECT_EQ(fs_->allocator().share_count(block), 0u);
  EXPECT_EQ(fs_->nr_inodes(), 1u);  // only "new"
}

// The last mapping of an unlinked, closed file going away evicts it (on the eviction worker:
// munmap holds mmap_lock).
TEST_P(EvictionTest, LastMunmapEvictsThroughWorker) {
  setup_file(1);
  std::shared_ptr<Inode> ino = file_.mapping();
  file_.close();
  ASSERT_EQ(fs_->unlink("victim"), Errc::ok);
  EXPECT_EQ(ino->state(), Inode::State::live);  // still mapped
  const std::uint64_t free0 = fs_->allocator().free_blocks();
  ASSERT_EQ(as_->munmap(addr_, kPageSize), Errc::ok);
  fs_->flush_evictions();
  EXPECT_EQ(ino->state(), Inode::State::evicted);
  EXPECT_EQ(fs_->allocator().free_blocks(), free0 + 1);
}

INSTANTIATE_TEST_SUITE_P(Strategies, LayoutTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);
INSTANTIATE_TEST_SUITE_P(Strategies, EvictionTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
