// A DaxFs must not be destroyed under its open Files and mappings: inodes point at it. Files and
// the mappings made from them keep it alive (shared ownership), so dropping every other
// reference defers the unmount to the last File close or munmap (regression test for the
// use-after-free ASan reported when the last outside reference went first).
#include <gtest/gtest.h>

#include <memory>

#include "fs/testing/fs_fixture.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class LifetimeTest : public FsTest {};

TEST_P(LifetimeTest, OpenFileKeepsFilesystemAlive) {
  File f = must_create("f");
  auto data = pattern(kPageSize, 3);
  ASSERT_TRUE(f.inode().write(0, data.data(), data.size()));
  std::weak_ptr<DaxFs> weak = fs_;
  fs_.reset();  // the mounter lets go first
  ASSERT_FALSE(weak.expired());
  std::vector<std::byte> back(kPageSize);
  auto n = f.inode().read(0, back.data(), back.size());
  ASSERT_TRUE(n);
  EXPECT_EQ(back, data);
  f.close();  // the last reference: the filesystem unmounts and goes
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(dax_->holder(), nullptr);
}

TEST_P(LifetimeTest, MappingKeepsFilesystemAlive) {
  File f = must_create("m");
  ASSERT_TRUE(f.inode().truncate(2 * kPageSize));
  mm::AddressSpace as;
  auto addr =
      as.mmap(0, 2 * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  const char x = 'x';
  ASSERT_FALSE(as.write(*addr, &x, 1));
  ASSERT_EQ(fs_->unlink("m"), Errc::ok);
  f.close();
  std::weak_ptr<DaxFs> weak = fs_;
  fs_.reset();
  ASSERT_FALSE(weak.expired());  // the VMA still holds it
  char y = 0;
  ASSERT_FALSE(as.read(*addr, &y, 1));
  EXPECT_EQ(y, 'x');
  // munmap: the VMA's close evicts the unlinked inode (deferred to the worker) and drops the
  // last reference, which unmounts after the eviction ran.
  ASSERT_EQ(as.munmap(*addr, 2 * kPageSize), Errc::ok);
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(dax_->holder(), nullptr);
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, LifetimeTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
