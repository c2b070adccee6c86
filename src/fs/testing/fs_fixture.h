// Test helpers for the fs layer: a DaxFs mounted on a fresh FS_DAX pagemap of a given strategy
// (64 MiB, 2 MiB-aligned pfns), torn down in the order a driver would (unmount, kill_dax,
// memunmap), plus small helpers to read a folio's metadata.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/inode.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::fs::testutil {

using pgmap::testutil::eventually;

inline constexpr std::uint64_t kDeviceSize = 64ull << 20;

class FsTest : public ::testing::TestWithParam<Strategy> {
 protected:
  void SetUp() override { mount(GetParam()); }
  void TearDown() override { teardown(); }

  void mount(Strategy s, MountOptions opts = {}) {
    backing_ = pgmap::testutil::make_backing(kDeviceSize);
    ASSERT_TRUE(backing_);
    pgmap_ = pgmap::testutil::must_memremap(pgmap::testutil::make_params(s, backing_));
    ASSERT_TRUE(pgmap_);
    auto d = dax::DaxDevice::create(pgmap_, "pmem0");
    ASSERT_TRUE(d) << d.error().to_string();
    dax_ = *d;
    auto f = DaxFs::mount(dax_, std::move(opts));
    ASSERT_TRUE(f) << f.error().to_string();
    fs_ = *f;
  }

  void teardown() {
    if (fs_) {
      if (fs_->mounted()) {
        EXPECT_EQ(fs_->unmount(), Errc::ok);
      }
      fs_.reset();
    }
    if (dax_ && !dax_->killed()) {
      EXPECT_EQ(dax_->kill(), Errc::ok);
    }
    if (pgmap_ && pgmap_->state() != DevPagemap::State::dead) {
      MemunmapOptions o;
      o.timeout = std::chrono::seconds(30);
      auto r = pgmap_->memunmap(o);
      EXPECT_TRUE(r) << r.error().to_string();
    }
    dax_.reset();
    pgmap_.reset();
  }

  File must_create(const std::string& name) {
    auto f = fs_->create(name);
    EXPECT_TRUE(f) << f.error().to_string();
    return f ? std::move(f).value() : File{};
  }

  static std::vector<std::byte> pattern(std::size_t n, std::uint8_t seed) {
    std::vector<std::byte> v(n);
    for (std::size_t i = 0; i < n; ++i)
      v[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
    return v;
  }

  // The folio metadata of pfn in the device pagemap.
  PageArray& array(Pfn pfn) const { return *pgmap_->array_for(pfn); }
  std::uint64_t entry(Pfn pfn) const { return array(pfn).index_of(pfn); }
  std::atomic<std::uint32_t>& ref_of(Pfn pfn) const {
    PageArray& a = array(pfn);
    return a.ref(a.head_of(a.index_of(pfn)));
  }
  Pfn pfn_of_block(std::uint64_t block) const { return pgmap_->range(0).start + block; }

  // Waits until a thread sleeps on pfn's folio refcount (the break_layout / eviction waiter).
  bool waiter_asleep(Pfn pfn) const {
    return eventually([&] { return WaitTable::global().waiters(&ref_of(pfn)) > 0; },
                      std::chrono::seconds(30));
  }

  std::shared_ptr<Backing> backing_;
  std::shared_ptr<DevPagemap> pgmap_;
  std::shared_ptr<dax::DaxDevice> dax_;
  std::shared_ptr<DaxFs> fs_;
};

inline std::string strategy_name_of(const ::testing::TestParamInfo<Strategy>& info) {
  return std::string(strategy_name(info.param));
}

}  // namespace pgmap::fs::testutil
