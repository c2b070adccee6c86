// Device-dax scenarios of kernel-semantics.md §7: S3 (ndctl dax-pmd.c test_dax_remap), S4 (ndctl
// device-dax.c), T1 (pagemap lifecycle) and the devdax half of T10 (device removal), end to end
// through address spaces, GUP, DevDax, DaxDevice and DevPagemap.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "mm/testing/fake_owner.h"
#include "pgmap/core/error.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/dax/devdax.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::dax {
namespace {

using mm::AddressSpace;
using mm::Signal;
using pgmap::testutil::eventually;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;

struct Device {
  std::shared_ptr<DevPagemap> pg;
  std::shared_ptr<DevDax> dev;
};

std::shared_ptr<DevPagemap> make_pagemap(Strategy s, unsigned order, std::uint64_t bytes) {
  return pgmap::testutil::must_memremap(pgmap::testutil::make_params(
      s, pgmap::testutil::make_backing(bytes, std::max(kPmdSize, order_bytes(order))), order,
      PagemapType::generic));
}

Device make_device(Strategy s, unsigned order, std::uint64_t bytes) {
  Device d;
  d.pg = make_pagemap(s, order, bytes);
  if (!d.pg) return d;
  auto dev = DevDax::create(d.pg);
  EXPECT_TRUE(dev) << dev.error().to_string();
  if (dev) d.dev = std::move(dev).value();
  return d;
}

std::vector<std::uint8_t> pattern(std::uint64_t len, std::uint8_t seed) {
  std::vector<std::uint8_t> v(len);
  for (std::uint64_t i = 0; i < len; ++i)
    v[i] = static_cast<std::uint8_t>(seed ^ (i * 31 + i / 4096));
  return v;
}

std::string strategy_name_of(const ::testing::TestParamInfo<Strategy>& info) {
  return std::string(strategy_name(info.param));
}

class AsyncUnbind : public testutil::AsyncTeardown {
 public:
  void start(DevDax& dev, MemunmapOptions opts = {}) {
    start_with([&dev, opts] { return dev.unbind(opts); });
  }
};

// ---- S3: ndctl dax-pmd.c test_dax_remap
// -----------------------------------------------------------
//
// ndctl maps 2 x align of the device, fills it with 'i', then mremap()s its first 4 KiB over an
// anonymous region (MREMAP_MAYMOVE | MREMAP_FIXED) and touches it: for device-dax with align >
// 4 KiB it expected SIGBUS. Since kernel commit 73d5e0629919 ("mremap: check if it's possible to
// split original vma") mremap asks vm_ops->may_split first, and drivers/dax/device.c's
// dev_dax_may_split refuses a cut off the alignment (-EINVAL); ndctl accepts that ("mremap failed,
// that's ok too"). We mirror the current kernel: the 4 KiB mremap is refused and nothing changes.
// The older outcome is still reachable with cuts the device accepts: moving a whole aligned folio
// to a destination that is not aligned leaves a VMA that check_vma rejects at fault time — SIGBUS.
class S3RemapTest : public ::testing::Test {
 protected:
  // The "anonymous region" of the ndctl test: 16 KiB of another mapping, filled with 'a'.
  std::uint64_t map_anon(AddressSpace& as) {
    anon_ = mm::testutil::make_fake_device(2 * kMiB);
    auto a = as.mmap(0, 4 * kPageSize, kRW, mm::kMapShared, anon_.owner, 0);
    EXPECT_TRUE(a) << a.error().to_string();
    std::vector<std::uint8_t> fill(4 * kPageSize, 'a');
    EXPECT_FALSE(as.write(*a, fill.data(), fill.size()));
    return *a;
  }
  void TearDown() override {
    if (anon_.pgmap) {
      EXPECT_EQ(anon_.memunmap_refuse(), Errc::ok);
    }
  }
  mm::testutil::FakeDevice anon_;
};

TEST_F(S3RemapTest, FourKiBPieceOfHugeDevdaxMappingIsRefusedByMaySplit) {
  Device d = make_device(Strategy::transition, kPmdOrder, 8 * kMiB);
  ASSERT_TRUE(d.dev);
  {
    AddressSpace as;
    const std::uint64_t anon = map_anon(as);
    auto addr = as.mmap(0, 2 * kPmdSize, kRW, mm::kMapShared, d.dev, 0);
    ASSERT_TRUE(addr);
    std::vector<std::uint8_t> fill(2 * kPmdSize, 'i');
    ASSERT_FALSE(as.write(*addr, fill.data(), fill.size()));

    auto remap =
        as.mremap(*addr, kPageSize, kPageSize, mm::kMremapMayMove | mm::kMremapFixed, anon);
    ASSERT_FALSE(remap);
    EXPECT_EQ(remap.code(), Errc::invalid_argument);  // dev_dax_may_split: -EINVAL
    // Nothing changed: the devdax VMA is whole, the anonymous region still holds 'a'.
    auto v = as.find_vma(*addr);
    ASSERT_TRUE(v);
    EXPECT_EQ(v->start, *addr);
    EXPECT_EQ(v->end, *addr + 2 * kPmdSize);
    int val = 0;
    ASSERT_FALSE(as.read(anon, &val, 1));
    EXPECT_EQ(val, 'a');
    ASSERT_FALSE(as.read(*addr, &val, 1));
    EXPECT_EQ(val, 'i');

    // Aligned cuts are accepted: the whole first folio moves to anon + 4 KiB, an address off the
    // alignment. Touching it is the SIGBUS ndctl expected (check_vma: unaligned vma).
    auto moved = as.mremap(*addr, kPmdSize, kPmdSize, mm::kMremapMayMove | mm::kMremapFixed,
                           anon + kPageSize);
    ASSERT_TRUE(moved) << moved.error().to_string();
    EXPECT_EQ(*moved, anon + kPageSize);
    mm::SignalInfo sig = as.read(anon + kPageSize, &val, 1);
    EXPECT_EQ(sig.signal, Signal::sigbus) << "touching a misaligned devdax VMA must SIGBUS";
    EXPECT_GT(as.nr_entries(), 0u);  // the rest of the anonymous region is still mapped
  }
  auto r = d.dev->unbind();
  EXPECT_TRUE(r) << r.error().to_string();
}

// With a 4 KiB device the same mremap succeeds and the moved page reads back 'i' (ndctl: a
// SIGBUS there would be "unexpected").
TEST_F(S3RemapTest, FourKiBDeviceRemapsAndReads) {
  Device d = make_device(Strategy::transition, 0, 4 * kMiB);
  ASSERT_TRUE(d.dev);
  {
    AddressSpace as;
    const std::uint64_t anon = map_anon(as);
    auto addr = as.mmap(0, 2 * kPageSize, kRW, mm::kMapShared, d.dev, 0);
    ASSERT_TRUE(addr);
    std::vector<std::uint8_t> fill(2 * kPageSize, 'i');
    ASSERT_FALSE(as.write(*addr, fill.data(), fill.size()));
    auto remap =
        as.mremap(*addr, kPageSize, kPageSize, mm::kMremapMayMove | mm::kMremapFixed, anon);
    ASSERT_TRUE(remap) << remap.error().to_string();
    EXPECT_EQ(*remap, anon);
    int val = 0;
    ASSERT_FALSE(as.read(anon, &val, 1));
    EXPECT_EQ(val, 'i');
    *reinterpret_cast<std::uint8_t*>(&val) = 0xAA;
    ASSERT_FALSE(as.write(anon, &val, 1));
    EXPECT_EQ(*reinterpret_cast<std::uint8_t*>(d.pg->address_of(d.pg->range(0).start)), 0xAA);
  }
  auto r = d.dev->unbind();
  EXPECT_TRUE(r) << r.error().to_string();
}

// ---- S4: ndctl device-dax.c ---------------------------------------------------------------------
//
// Seed data (ndctl: through fsdax before reconfiguring the namespace to devdax; here: straight
// into the device bytes before the device-dax instance exists), MAP_PRIVATE must fail, a
// MAP_SHARED read sees the data, a RW mapping works; then disable the device and touch the memory:
// SIGBUS (kill_dax + unmap_mapping_range on unbind, kernel >= 4.9).
class S4DeviceDaxTest : public ::testing::TestWithParam<Strategy> {};

TEST_P(S4DeviceDaxTest, SeedMapPrivateFailsSharedReadsDisableThenSigbus) {
  auto pg = make_pagemap(GetParam(), kPmdOrder, 8 * kMiB);
  ASSERT_TRUE(pg);
  const auto seed = pattern(2 * kPmdSize, 0x3c);
  std::memcpy(pg->address_of(pg->range(0).start), seed.data(), seed.size());
  auto made = DevDax::create(pg);
  ASSERT_TRUE(made) << made.error().to_string();
  std::shared_ptr<DevDax> dev = std::move(made).value();

  AddressSpace as;
  // MAP_PRIVATE: check_vma refuses private mappings.
  EXPECT_EQ(as.mmap(0, 2 * kPmdSize, mm::kProtRead, mm::kMapPrivate, dev, 0).code(),
            Errc::invalid_argument);
  // MAP_SHARED read verifies the seeded data.
  auto ro = as.mmap(0, 2 * kPmdSize, mm::kProtRead, mm::kMapShared, dev, 0);
  ASSERT_TRUE(ro) << ro.error().to_string();
  std::vector<std::uint8_t> back(seed.size());
  ASSERT_FALSE(as.read(*ro, back.data(), back.size()));
  EXPECT_EQ(back, seed);
  std::uint8_t byte = 1;
  EXPECT_EQ(as.write(*ro, &byte, 1).signal, Signal::sigsegv);  // read-only mapping
  // Establish a RW mapping and use it.
  auto rw = as.mmap(0, 2 * kPmdSize, kRW, mm::kMapShared, dev, 2 * kPmdSize);
  ASSERT_TRUE(rw) << rw.error().to_string();
  const auto data = pattern(2 * kPmdSize, 0x77);
  ASSERT_FALSE(as.write(*rw, data.data(), data.size()));
  ASSERT_FALSE(as.read(*rw, back.data(), back.size()));
  EXPECT_EQ(back, data);

  // Disable the device (ndctl disable-namespace), then touch the memory.
  auto r = dev->unbind();
  ASSERT_TRUE(r) << r.error().to_string();
  mm::SignalInfo sig = as.write(*rw + kPageSize, &byte, 1);
  EXPECT_EQ(sig.signal, Signal::sigbus);
  EXPECT_EQ(sig.addr, *rw + kPageSize);
  EXPECT_EQ(sig.code, mm::SigCode::bus_adrerr);
  EXPECT_EQ(sig.addr_lsb, 0u);  // Linux sets si_addr_lsb only for memory failures
  EXPECT_EQ(as.read(*rw, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(as.read(*ro + kPmdSize, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(as.nr_entries(), 0u);
  EXPECT_EQ(pg->state(), DevPagemap::State::dead);
  EXPECT_EQ(as.mmap(0, kPmdSize, kRW, mm::kMapShared, dev, 0).code(), Errc::dead);
}

INSTANTIATE_TEST_SUITE_P(Strategies, S4DeviceDaxTest, ::testing::ValuesIn(kSafeStrategies),
                         strategy_name_of);

// ---- T1: pagemap lifecycle through devdax -------------------------------------------------------
//
// Lookups succeed while the device is bound; once unbind has killed the pagemap they fail; the
// teardown waits for a transient lookup taken before (get_dev_pagemap / put_dev_pagemap), and
// nothing dereferences the freed pagemap (ASan).
class T1LifecycleTest : public ::testing::TestWithParam<Strategy> {};

TEST_P(T1LifecycleTest, LookupsSucceedThenFailAndUnbindWaitsForTransientLookups) {
  Device d = make_device(GetParam(), kPmdOrder, 8 * kMiB);
  ASSERT_TRUE(d.dev);
  const Pfn first = d.pg->range(0).start;
  const Pfn last = d.pg->range(0).end() - 1;
  const std::size_t published = pagemap_count();
  {
    PagemapRef a = get_dev_pagemap(first);
    PagemapRef b = get_dev_pagemap(last);
    ASSERT_TRUE(a);
    ASSERT_TRUE(b);
    EXPECT_EQ(a.get(), d.pg.get());
    EXPECT_EQ(b.get(), d.pg.get());
  }
  AddressSpace as;
  auto m = as.mmap(0, 2 * kPmdSize, kRW, mm::kMapShared, d.dev, 0);
  ASSERT_TRUE(m);
  std::uint8_t byte = 5;
  ASSERT_FALSE(as.write(*m, &byte, 1));

  PagemapRef transient = get_dev_pagemap(first + 7);
  ASSERT_TRUE(transient);
  AsyncUnbind un;
  un.start(*d.dev);
  ASSERT_TRUE(eventually([&] { return d.pg->state() == DevPagemap::State::dying; }));
  EXPECT_FALSE(get_dev_pagemap(first));  // killed: new lookups fail
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(un.done()) << "memunmap must wait for the transient lookup";
  transient.reset();  // put_dev_pagemap
  auto r = un.join();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(d.pg->state(), DevPagemap::State::dead);
  EXPECT_FALSE(get_dev_pagemap(first));
  EXPECT_FALSE(get_dev_pagemap(last));
  EXPECT_EQ(pagemap_count(), published - 1);
  EXPECT_EQ(as.read(*m, &byte, 1).signal, Signal::sigbus);
}

INSTANTIATE_TEST_SUITE_P(Strategies, T1LifecycleTest, ::testing::ValuesIn(kSafeStrategies),
                         strategy_name_of);

// ---- T10 (devdax half): device removal
// ------------------------------------------------------------
//
// unbind = kill_dax (holder told MF_MEM_PRE_REMOVE) + unmap_mapping_range -> faults SIGBUS ->
// memunmap completes. A long-term pin holds the teardown in its last stage so each step can be
// observed in order.
class T10RemovalTest : public ::testing::TestWithParam<Strategy> {};

TEST_P(T10RemovalTest, KillDaxThenZapThenFaultsSigbusThenMemunmapCompletes) {
  Device d = make_device(GetParam(), kPmdOrder, 8 * kMiB);
  ASSERT_TRUE(d.dev);
  std::mutex mu;
  std::vector<int> notified;
  HolderOps ops;
  ops.notify_failure = [&](DaxDevice&, void*, std::uint64_t off, std::uint64_t len, int flags) {
    std::lock_guard<std::mutex> lock(mu);
    if (off == 0 && len == kWholeDevice) notified.push_back(flags);
    return Errc::ok;
  };
  int holder = 0;
  ASSERT_EQ(d.dev->dax_device().set_holder(&holder, &ops), Errc::ok);

  AddressSpace p1;
  AddressSpace p2;
  auto a1 = p1.mmap(0, 2 * kPmdSize, kRW, mm::kMapShared, d.dev, 0);
  auto a2 = p2.mmap(0, 2 * kPmdSize, kRW, mm::kMapShared, d.dev, 0);
  ASSERT_TRUE(a1 && a2);
  std::uint8_t byte = 3;
  ASSERT_FALSE(p1.write(*a1, &byte, 1));
  ASSERT_FALSE(p2.write(*a2 + kPmdSize, &byte, 1));
  auto pins = mm::pin_user_pages(p1, *a1, 1, mm::kFollLongterm);
  ASSERT_TRUE(pins) << pins.error().to_string();

  AsyncUnbind un;
  un.start(*d.dev);
  ASSERT_TRUE(eventually([&] { return d.dev->dax_device().killed(); }));
  ASSERT_TRUE(eventually([&] { return d.pg->state() == DevPagemap::State::dying; }));
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(notified.size(), 1u);
    EXPECT_EQ(notified[0], kMfMemPreRemove);
  }
  // kill_dax clears the holder last, after its grace period; we watch it from another thread.
  EXPECT_TRUE(eventually([&] { return d.dev->dax_device().holder() == nullptr; }));
  // Every user mapping zapped (under alloc_event the pagemap dies with kill_dax, before the zap).
  ASSERT_TRUE(eventually([&] { return p1.nr_entries() == 0 && p2.nr_entries() == 0; }));
  EXPECT_EQ(p1.read(*a1, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(p2.write(*a2, &byte, 1).signal, Signal::sigbus);
  EXPECT_FALSE(un.done());  // the pinned folio holds the last stage
  EXPECT_EQ(d.pg->state(), DevPagemap::State::dying);

  EXPECT_EQ(mm::unpin_user_pages(*pins), Errc::ok);
  auto r = un.join();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_GT(r->total_seconds, 0.0);
  EXPECT_EQ(d.pg->state(), DevPagemap::State::dead);
  EXPECT_EQ(d.pg->late_accesses(), 0u);
  EXPECT_EQ(p2.read(*a2 + kPmdSize, &byte, 1).signal, Signal::sigbus);
}

INSTANTIATE_TEST_SUITE_P(Strategies, T10RemovalTest, ::testing::ValuesIn(kSafeStrategies),
                         strategy_name_of);

}  // namespace
}  // namespace pgmap::dax
