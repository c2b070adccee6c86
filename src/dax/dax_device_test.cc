// DaxDevice (drivers/dax/super.c): liveness under the read lock, direct access, kill_dax and the
// holder, in both liveness modes (a separate ALIVE flag, and alloc_event's shared liveness).
#include "pgmap/dax/dax_device.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/error.h"
#include "pgmap/core/rcu.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap::dax {
namespace {

using pgmap::testutil::AsyncMemunmap;
using pgmap::testutil::eventually;
using pgmap::testutil::make_backing;
using pgmap::testutil::make_params;
using pgmap::testutil::MisuseCounter;
using pgmap::testutil::must_memremap;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

std::shared_ptr<DevPagemap> generic_pagemap(Strategy s, std::uint64_t bytes = 4 * kMiB) {
  return must_memremap(make_params(s, make_backing(bytes), 0, PagemapType::generic));
}

std::shared_ptr<DaxDevice> must_create(std::shared_ptr<DevPagemap> pg) {
  auto d = DaxDevice::create(std::move(pg));
  EXPECT_TRUE(d) << d.error().to_string();
  return d ? std::move(d).value() : nullptr;
}

// Records every holder notification.
struct HolderLog {
  struct Call {
    std::uint64_t offset;
    std::uint64_t len;
    int flags;
    bool alive_inside;  // dax_alive() as seen by the holder during the call
  };
  HolderOps ops() {
    HolderOps o;
    o.notify_failure = [this](DaxDevice& dax, void* holder, std::uint64_t off, std::uint64_t len,
                              int flags) {
      std::lock_guard<std::mutex> lock(mu);
      calls.push_back({off, len, flags, dax.alive()});
      last_holder = holder;
      return answer;
    };
    return o;
  }
  std::vector<Call> snapshot() {
    std::lock_guard<std::mutex> lock(mu);
    return calls;
  }
  std::mutex mu;
  std::vector<Call> calls;
  void* last_holder = nullptr;
  Errc answer = Errc::ok;
};

// ---- creation -----------------------------------------------------------------------------------

// alloc_dax + run_dax: a device over a live pagemap starts alive; none over nothing or a dead one.
TEST(DaxDeviceCreate, RejectsNullAndDeadPagemaps) {
  EXPECT_EQ(DaxDevice::create(nullptr).code(), Errc::invalid_argument);
  auto pg = generic_pagemap(Strategy::transition);
  ASSERT_TRUE(pg);
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(DaxDevice::create(pg).code(), Errc::dead);
}

TEST(DaxDeviceCreate, SizeCoversEveryRange) {
  MemremapParams p =
      make_params(Strategy::transition, make_backing(4 * kMiB), 0, PagemapType::generic);
  p.ranges.push_back(PagemapRangeSpec{make_backing(2 * kMiB), 0, 0});
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  auto dax = must_create(pg);
  ASSERT_TRUE(dax);
  EXPECT_EQ(dax->nr_pages(), (6 * kMiB) >> kPageShift);
  EXPECT_EQ(dax->size(), 6 * kMiB);
  EXPECT_FALSE(dax->shares_liveness());
  DaxDevice::ReadLock lock;
  EXPECT_TRUE(dax->alive());
}

// ---- per liveness mode --------------------------------------------------------------------------

class DaxDeviceTest : public ::testing::TestWithParam<Strategy> {
 protected:
  void SetUp() override {
    pg_ = generic_pagemap(GetParam());
    ASSERT_TRUE(pg_);
    dax_ = must_create(pg_);
    ASSERT_TRUE(dax_);
  }
  void TearDown() override {
    // A killed pagemap is torn down by its owner (~DevPagemap only tears down live ones).
    if (pg_ && pg_->state() == DevPagemap::State::dying) {
      auto r = pg_->memunmap();
      EXPECT_TRUE(r) << r.error().to_string();
    }
  }
  bool alive() {
    DaxDevice::ReadLock lock;
    return dax_->alive();
  }
  Pfn base() const { return pg_->range(0).start; }
  bool alloc_event() const { return GetParam() == Strategy::alloc_event; }

  MisuseCounter misuse_;
  std::shared_ptr<DevPagemap> pg_;
  std::shared_ptr<DaxDevice> dax_;
};

// dax_alive() inside dax_read_lock().
TEST_P(DaxDeviceTest, AliveInsideReadLock) {
  EXPECT_EQ(dax_->shares_liveness(), alloc_event());
  DaxDevice::ReadLock outer;
  EXPECT_TRUE(dax_->alive());
  {
    DaxDevice::ReadLock nested;  // read sections nest
    EXPECT_TRUE(dax_->alive());
  }
  EXPECT_EQ(misuse_.reported(), 0u);
}

// dax_alive() asserts the SRCU read lock (lockdep_assert_held): outside one it is misuse.
TEST_P(DaxDeviceTest, AliveOutsideReadLockIsMisuse) {
  EXPECT_TRUE(dax_->alive());
  EXPECT_EQ(misuse_.reported(), 1u);
  EXPECT_EQ(misuse_.last(), Errc::invalid_argument);
}

// dax_direct_access: pgoff -> pfn and kaddr, min(available, asked) pages.
TEST_P(DaxDeviceTest, DirectAccessTranslatesAndClips) {
  DaxDevice::ReadLock lock;
  auto a = dax_->direct_access(0, 8);
  ASSERT_TRUE(a) << a.error().to_string();
  EXPECT_EQ(a->pfn, base());
  EXPECT_EQ(a->nr, 8u);
  EXPECT_EQ(a->kaddr, pg_->address_of(base()));

  const std::uint64_t last = dax_->nr_pages() - 1;
  auto b = dax_->direct_access(last - 2, 100);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->pfn, base() + last - 2);
  EXPECT_EQ(b->nr, 3u);  // only three pages left
  EXPECT_EQ(b->kaddr, pg_->address_of(base() + last - 2));

  // alloc_event: the access is the allocation event; otherwise nothing is allocated.
  EXPECT_EQ(static_cast<bool>(a->allocation), alloc_event());
  if (alloc_event()) {
    EXPECT_EQ(a->allocation.first(), base());
    EXPECT_EQ(a->allocation.count(), 8u);
    EXPECT_EQ(b->allocation.count(), 3u);
    EXPECT_EQ(a->allocation.pagemap(), pg_.get());
  }
}

// dax_direct_access errors: -EINVAL / -ERANGE, nothing changes.
TEST_P(DaxDeviceTest, DirectAccessRejectsBadRanges) {
  DaxDevice::ReadLock lock;
  EXPECT_EQ(dax_->direct_access(0, 0).code(), Errc::invalid_argument);
  EXPECT_EQ(dax_->direct_access(dax_->nr_pages(), 1).code(), Errc::out_of_range);
  EXPECT_EQ(dax_->direct_access(~std::uint64_t{0}, 1).code(), Errc::out_of_range);
  EXPECT_TRUE(dax_->alive());
  EXPECT_TRUE(dax_->direct_access(0, 1));
}

TEST_P(DaxDeviceTest, DirectAccessOutsideReadLockIsMisuse) {
  auto a = dax_->direct_access(0, 1);
  EXPECT_TRUE(a);
  EXPECT_EQ(misuse_.reported(), 1u);
}

// kill_dax: ALIVE cleared, -ENXIO afterwards; killing twice is an error that changes nothing.
TEST_P(DaxDeviceTest, KillMakesTheDeviceDead) {
  EXPECT_FALSE(dax_->killed());
  EXPECT_EQ(dax_->kill(), Errc::ok);
  EXPECT_TRUE(dax_->killed());
  EXPECT_FALSE(alive());
  {
    DaxDevice::ReadLock lock;
    EXPECT_EQ(dax_->direct_access(0, 1).code(), Errc::dead);
  }
  EXPECT_EQ(dax_->kill(), Errc::already_dead);
  EXPECT_FALSE(alive());
  // Two objects, two kill paths (Linux) — or one liveness object under alloc_event.
  EXPECT_EQ(pg_->state(), alloc_event() ? DevPagemap::State::dying : DevPagemap::State::live);
  EXPECT_EQ(misuse_.reported(), 0u);
}

// synchronize_srcu must not run inside the read section it waits for.
TEST_P(DaxDeviceTest, KillInsideReadLockIsRefused) {
  {
    DaxDevice::ReadLock lock;
    EXPECT_EQ(dax_->kill(), Errc::invalid_argument);
    EXPECT_TRUE(dax_->alive());
  }
  EXPECT_EQ(misuse_.reported(), 1u);
  EXPECT_FALSE(dax_->killed());
  EXPECT_EQ(dax_->kill(), Errc::ok);
}

// kill_dax's synchronize_srcu: "any fault handlers or operations that might have seen dax_alive()
// have completed" when it returns; none that starts afterwards sees it alive (I10).
TEST_P(DaxDeviceTest, KillWaitsForReadersThatSawItAlive) {
  std::atomic<bool> inside{false};
  std::atomic<bool> let_go{false};
  std::atomic<bool> reader_left{false};
  std::atomic<bool> saw_alive{false};
  std::atomic<bool> access_ok{false};
  std::thread reader([&] {
    {
      DaxDevice::ReadLock lock;
      saw_alive = dax_->alive();
      auto a = dax_->direct_access(0, 1);
      access_ok = static_cast<bool>(a);
      inside = true;
      while (!let_go.load())
        std::this_thread::yield();
      reader_left = true;  // still inside the section
    }
  });
  ASSERT_TRUE(eventually([&] { return inside.load(); }));
  std::atomic<bool> kill_returned{false};
  std::atomic<bool> left_before_return{false};
  std::thread killer([&] {
    EXPECT_EQ(dax_->kill(), Errc::ok);
    left_before_return = reader_left.load();
    kill_returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(kill_returned.load()) << "kill returned while a reader that saw alive is inside";
  let_go = true;
  reader.join();
  killer.join();
  EXPECT_TRUE(saw_alive.load());
  EXPECT_TRUE(access_ok.load());
  EXPECT_TRUE(left_before_return.load());
  // Every later read section sees the device dead.
  DaxDevice::ReadLock lock;
  EXPECT_FALSE(dax_->alive());
  EXPECT_EQ(dax_->direct_access(0, 1).code(), Errc::dead);
}

// ---- holder (fs_dax_get_by_bdev / fs_put_dax / dax_holder_notify_failure) ----------------------

TEST_P(DaxDeviceTest, OneHolderAtATime) {
  HolderLog log;
  HolderOps ops = log.ops();
  int a = 0;
  int b = 0;
  EXPECT_EQ(dax_->set_holder(nullptr, &ops), Errc::invalid_argument);
  EXPECT_EQ(dax_->set_holder(&a, nullptr), Errc::invalid_argument);
  EXPECT_EQ(dax_->set_holder(&a, &ops), Errc::ok);
  EXPECT_EQ(dax_->holder(), &a);
  EXPECT_EQ(dax_->set_holder(&b, &ops), Errc::busy);  // cmpxchg lost: nothing changed
  EXPECT_EQ(dax_->holder(), &a);
  EXPECT_EQ(dax_->clear_holder(&b), Errc::not_found);
  EXPECT_EQ(dax_->holder(), &a);
  EXPECT_EQ(dax_->clear_holder(&a), Errc::ok);
  EXPECT_EQ(dax_->holder(), nullptr);
  EXPECT_EQ(dax_->clear_holder(&a), Errc::not_found);
  EXPECT_EQ(dax_->set_holder(&b, &ops), Errc::ok);
  EXPECT_EQ(dax_->holder(), &b);
  EXPECT_EQ(dax_->clear_holder(&b), Errc::ok);
}

TEST_P(DaxDeviceTest, NotifyFailureReachesTheHolder) {
  EXPECT_EQ(dax_->notify_failure(0, kPageSize, kMfActionRequired), Errc::not_supported);
  HolderLog log;
  HolderOps ops = log.ops();
  int holder = 0;
  ASSERT_EQ(dax_->set_holder(&holder, &ops), Errc::ok);
  EXPECT_EQ(dax_->notify_failure(3 * kPageSize, kPageSize, kMfActionRequired), Errc::ok);
  log.answer = Errc::poisoned;
  EXPECT_EQ(dax_->notify_failure(0, 2 * kPageSize, 0), Errc::poisoned);  // the holder's answer
  auto calls = log.snapshot();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].offset, 3 * kPageSize);
  EXPECT_EQ(calls[0].len, kPageSize);
  EXPECT_EQ(calls[0].flags, kMfActionRequired);
  EXPECT_TRUE(calls[0].alive_inside);
  EXPECT_EQ(log.last_holder, &holder);
  ASSERT_EQ(dax_->clear_holder(&holder), Errc::ok);
  EXPECT_EQ(dax_->notify_failure(0, kPageSize, 0), Errc::not_supported);
  EXPECT_EQ(misuse_.reported(), 0u);
}

// kill_dax: dax_holder_notify_failure(dax_dev, 0, U64_MAX, MF_MEM_PRE_REMOVE) while still alive,
// then ALIVE cleared, then the holder cleared.
TEST_P(DaxDeviceTest, KillNotifiesHolderPreRemove) {
  HolderLog log;
  HolderOps ops = log.ops();
  int holder = 0;
  ASSERT_EQ(dax_->set_holder(&holder, &ops), Errc::ok);
  ASSERT_EQ(dax_->kill(), Errc::ok);
  auto calls = log.snapshot();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].offset, 0u);
  EXPECT_EQ(calls[0].len, kWholeDevice);
  EXPECT_EQ(calls[0].flags, kMfMemPreRemove);
  EXPECT_TRUE(calls[0].alive_inside);  // notified before ALIVE is cleared
  EXPECT_EQ(dax_->holder(), nullptr);
  // Dead: no registration, no notification (-ENXIO).
  EXPECT_EQ(dax_->set_holder(&holder, &ops), Errc::dead);
  EXPECT_EQ(dax_->notify_failure(0, kPageSize, 0), Errc::dead);
  EXPECT_EQ(log.snapshot().size(), 1u);
}

TEST_P(DaxDeviceTest, KillWithoutHolderNotifiesNobody) {
  HolderLog log;
  HolderOps ops = log.ops();
  int holder = 0;
  ASSERT_EQ(dax_->set_holder(&holder, &ops), Errc::ok);
  ASSERT_EQ(dax_->clear_holder(&holder), Errc::ok);
  ASSERT_EQ(dax_->kill(), Errc::ok);
  EXPECT_TRUE(log.snapshot().empty());
}

INSTANTIATE_TEST_SUITE_P(Modes, DaxDeviceTest,
                         ::testing::Values(Strategy::transition, Strategy::sweep,
                                           Strategy::alloc_event),
                         pgmap::testutil::strategy_param_name);

// ---- alloc_event: one liveness object
// --------------------------------------------------------------

class DaxAllocEventTest : public DaxDeviceTest {};

// Dan's proposal: kill_dax kills the pagemap, so no new allocation (request) or lookup succeeds.
TEST_P(DaxAllocEventTest, KillMakesRequestsAndLookupsFail) {
  ASSERT_TRUE(pg_->request(base(), 1));
  ASSERT_TRUE(get_dev_pagemap(base()));
  ASSERT_EQ(dax_->kill(), Errc::ok);
  EXPECT_EQ(pg_->state(), DevPagemap::State::dying);
  EXPECT_EQ(pg_->request(base(), 1).code(), Errc::dead);
  EXPECT_FALSE(get_dev_pagemap(base()));
  EXPECT_EQ(pg_->get_folio(base()), Errc::dead);  // no idle folio becomes busy
  // The pagemap itself is torn down by its owner afterwards.
  auto r = pg_->memunmap();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg_->state(), DevPagemap::State::dead);
}

// The allocation from direct_access keeps the pagemap: memunmap waits for it, and a bounded
// memunmap times out naming it, leaving the pagemap killed.
TEST_P(DaxAllocEventTest, AllocationFromDirectAccessKeepsMemunmapWaiting) {
  DevPagemap::Allocation kept;
  {
    DaxDevice::ReadLock lock;
    auto a = dax_->direct_access(4, 2);
    ASSERT_TRUE(a);
    kept = std::move(a->allocation);  // used beyond the read section
  }
  ASSERT_TRUE(kept);
  ASSERT_EQ(dax_->kill(), Errc::ok);

  MemunmapOptions bounded;
  bounded.timeout = std::chrono::milliseconds(30);
  auto timed = pg_->memunmap(bounded);
  ASSERT_FALSE(timed);
  EXPECT_EQ(timed.code(), Errc::timed_out);
  ASSERT_NE(timed.error().holders(), nullptr);
  EXPECT_GE(timed.error().holders()->pagemap_refs, 1);
  EXPECT_EQ(pg_->state(), DevPagemap::State::dying);  // stays killed

  AsyncMemunmap un;
  un.start(*pg_);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(un.done());
  kept.reset();
  auto r = un.join();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg_->state(), DevPagemap::State::dead);
}

// The separate-flag strategies keep two objects: killing the device leaves the pagemap live.
TEST(DaxSeparateLiveness, KillLeavesPagemapLive) {
  auto pg = generic_pagemap(Strategy::per_lookup);
  ASSERT_TRUE(pg);
  auto dax = must_create(pg);
  ASSERT_TRUE(dax);
  ASSERT_EQ(dax->kill(), Errc::ok);
  EXPECT_EQ(pg->state(), DevPagemap::State::live);
  EXPECT_TRUE(pg->request(pg->range(0).start, 1));
  {
    DaxDevice::ReadLock lock;
    EXPECT_FALSE(dax->alive());
  }
  ASSERT_TRUE(pg->memunmap());
}

INSTANTIATE_TEST_SUITE_P(AllocEvent, DaxAllocEventTest, ::testing::Values(Strategy::alloc_event),
                         pgmap::testutil::strategy_param_name);

}  // namespace
}  // namespace pgmap::dax
