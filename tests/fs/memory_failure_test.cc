// Memory failure on fsdax blocks (issue 10 §3, kernel-semantics.md §3.10, §3.13, T11; xfstests
// xfs/550-552): a media error the device reports through its holder reaches EVERY file that maps
// the failed block — each sharer of a reflinked block records it and each of its mapping users
// gets SIGBUS BUS_MCEERR_AR at its next access — and only those pages.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/debug/fs_invariants.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class MemoryFailureTest : public FsTest {};

TEST_P(MemoryFailureTest, SharedBlockNotifiesEveryOwner) {
  File a = must_create("a");
  auto data = pattern(2 * kPageSize, 9);
  ASSERT_TRUE(a.inode().write(0, data.data(), data.size()));
  File b = must_create("b");
  File c = must_create("c");
  ASSERT_EQ(fs_->reflink(a.inode(), b.inode()), Errc::ok);
  ASSERT_EQ(fs_->reflink(a.inode(), c.inode()), Errc::ok);
  File other = must_create("other");  // an unshared file: not an owner of the failed block
  ASSERT_TRUE(other.inode().write(0, data.data(), data.size()));
  const std::uint64_t block = *a.inode().block_of(0);
  ASSERT_EQ(fs_->allocator().share_count(block), 3u);

  std::vector<std::unique_ptr<mm::AddressSpace>> as;
  std::vector<std::uint64_t> addrs;
  File* files[] = {&a, &b, &c, &other};
  for (File* f : files) {
    as.push_back(std::make_unique<mm::AddressSpace>());
    auto addr = as.back()->mmap(0, 2 * kPageSize, mm::kProtRead, mm::kMapShared, f->mapping(), 0);
    ASSERT_TRUE(addr);
    addrs.push_back(*addr);
    char x = 0;
    ASSERT_FALSE(as.back()->read(*addr, &x, 1));
    ASSERT_FALSE(as.back()->read(*addr + kPageSize, &x, 1));
  }

  // The device reports the failure of one block to its holder, the filesystem.
  ASSERT_EQ(dax_->notify_failure(block << kPageShift, kPageSize, dax::kMfActionRequired), Errc::ok);

  for (std::size_t i = 0; i < 3; ++i) {
    const auto fails = files[i]->inode().memory_failures();
    ASSERT_EQ(fails.size(), 1u) << i;
    EXPECT_EQ(fails[0].page, 0u);
    EXPECT_EQ(fails[0].block, block);
    EXPECT_EQ(fails[0].mf_flags, dax::kMfActionRequired);
    EXPECT_EQ(fails[0].zapped, 1u) << "the owner's mapping of the page was zapped";
    EXPECT_FALSE(as[i]->lookup(addrs[i]));
    char x = 0;
    mm::SignalInfo s = as[i]->read(addrs[i], &x, 1);
    EXPECT_EQ(s.signal, mm::Signal::sigbus) << i;
    EXPECT_EQ(s.code, mm::SigCode::bus_mceerr_ar) << i;
    EXPECT_EQ(s.addr_lsb, 12u);
    // The other page of the same files is unaffected.
    EXPECT_FALSE(as[i]->read(addrs[i] + kPageSize, &x, 1)) << i;
  }
  EXPECT_TRUE(other.inode().memory_failures().empty());
  char x = 0;
  EXPECT_FALSE(as[3]->read(addrs[3], &x, 1));
  EXPECT_TRUE(as[3]->lookup(addrs[3]));

  // A failure of the unshared file's block reaches that file only; the direct call reports the
  // number of (file, page) owners.
  auto owners = fs_->memory_failure(*other.inode().block_of(0) << kPageShift, 1, 0);
  ASSERT_TRUE(owners);
  EXPECT_EQ(*owners, 1u);
  EXPECT_EQ(other.inode().memory_failures().size(), 1u);
  EXPECT_EQ(a.inode().memory_failures().size(), 1u);
  EXPECT_EQ(as[3]->read(addrs[3], &x, 1).code, mm::SigCode::bus_mceerr_ar);

  debug::Universe u;
  for (const auto& s : as)
    u.address_spaces.push_back(s.get());
  u.complete = true;
  debug::FsUniverse fu;
  fu.filesystems.push_back(fs_.get());
  debug::Report r = debug::check_fs_invariants(u, fu);
  EXPECT_TRUE(r.ok()) << r.to_string();

  for (std::size_t i = 0; i < as.size(); ++i)
    ASSERT_EQ(as[i]->munmap(addrs[i], 2 * kPageSize), Errc::ok);
  // Bad input: past the device.
  EXPECT_EQ(fs_->memory_failure(testutil::kDeviceSize, kPageSize, 0).code(), Errc::out_of_range);
}

// A poisoned block is never handed out again: one in use leaves service when its file frees it,
// a free one at once (the allocator used to put the first back in the free pool, and hand either
// to the next file, whose first access then consumed the poison). FsStats reports both.
TEST_P(MemoryFailureTest, PoisonedBlocksAreNeverAllocatedAgain) {
  File f = must_create("victim");
  auto data = pattern(2 * kPageSize, 3);
  ASSERT_TRUE(f.inode().write(0, data.data(), data.size()));
  const std::uint64_t used = *f.inode().block_of(1);
  const FsStats s0 = fs_->stats();
  // A free block: the first one the allocator would hand out next.
  auto probe = fs_->allocator().alloc();
  ASSERT_TRUE(probe);
  ASSERT_TRUE(fs_->allocator().release(*probe));
  const std::uint64_t spare = *probe;
  ASSERT_TRUE(fs_->memory_failure(used << kPageShift, kPageSize, 0));
  ASSERT_TRUE(fs_->memory_failure(spare << kPageShift, kPageSize, 0));
  FsStats s = fs_->stats();
  EXPECT_EQ(s.bad_blocks, s0.bad_blocks + 2);
  EXPECT_EQ(s.retired_blocks, s0.retired_blocks + 1);  // the free one; the used one is still f's
  EXPECT_EQ(s.free_blocks, s0.free_blocks - 1);
  // Bad input changes nothing.
  EXPECT_EQ(fs_->memory_failure(testutil::kDeviceSize, kPageSize, 0).code(), Errc::out_of_range);
  EXPECT_EQ(fs_->stats().bad_blocks, s.bad_blocks);
  // The file lets go of its poisoned block (truncate frees it): it is retired, not freed.
  ASSERT_TRUE(f.inode().truncate(kPageSize));
  s = fs_->stats();
  EXPECT_EQ(s.retired_blocks, s0.retired_blocks + 2);
  EXPECT_EQ(s.free_blocks, s0.free_blocks - 1);
  // Another file takes every block left: never a poisoned one.
  File g = must_create("taker");
  std::vector<std::uint64_t> got;
  for (;;) {
    auto b = fs_->allocator().alloc();
    if (!b) {
      EXPECT_EQ(b.code(), Errc::no_memory);
      break;
    }
    got.push_back(*b);
    EXPECT_NE(*b, used) << "the freed poisoned block was handed out again";
    EXPECT_NE(*b, spare) << "the free poisoned block was handed out";
  }
  EXPECT_EQ(got.size(), s.free_blocks);
  EXPECT_FALSE(fs_->allocator().alloc_extent(1, 1)) << "an extent of a poisoned block";
  for (std::uint64_t b : got)
    ASSERT_TRUE(fs_->allocator().release(b));
  EXPECT_EQ(fs_->stats().free_blocks, s.free_blocks);
  mm::AddressSpace as;
  debug::Universe u;
  u.address_spaces.push_back(&as);
  u.complete = true;
  debug::FsUniverse fu;
  fu.filesystems.push_back(fs_.get());
  debug::Report r = debug::check_fs_invariants(u, fu);
  EXPECT_TRUE(r.ok()) << r.to_string();
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, MemoryFailureTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
