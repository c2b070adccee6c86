#include "pgmap/fs/block_allocator.h"

#include <gtest/gtest.h>

#include "memory/testing/pagemap_fixture.h"

namespace pgmap::fs {
namespace {

TEST(BlockAllocatorTest, AllocFreeAndEnospc) {
  BlockAllocator a(4);
  std::vector<std::uint64_t> got;
  for (int i = 0; i < 4; ++i) {
    auto b = a.alloc();
    ASSERT_TRUE(b);
    got.push_back(*b);
  }
  EXPECT_EQ(a.free_blocks(), 0u);
  EXPECT_EQ(a.alloc().code(), Errc::no_memory);
  auto r = a.release(got[2]);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, 0u);
  EXPECT_EQ(a.free_blocks(), 1u);
  auto again = a.alloc();
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, got[2]);
}

TEST(BlockAllocatorTest, AlignedExtents) {
  BlockAllocator a(2048);
  ASSERT_TRUE(a.alloc());  // block 0 taken: the first aligned extent starts at 512
  auto e = a.alloc_extent(512, 512);
  ASSERT_TRUE(e);
  EXPECT_EQ(*e, 512u);
  EXPECT_EQ(a.free_blocks(), 2048u - 513u);
  EXPECT_EQ(a.alloc_extent(0, 512).code(), Errc::invalid_argument);
  EXPECT_EQ(a.alloc_extent(512, 3).code(), Errc::invalid_argument);
  EXPECT_EQ(a.alloc_extent(4096, 512).code(), Errc::no_memory);
  EXPECT_EQ(a.free_blocks(), 2048u - 513u);  // failures changed nothing
}

TEST(BlockAllocatorTest, ShareCounts) {
  pgmap::testutil::MisuseCounter misuse;
  BlockAllocator a(8);
  auto b = a.alloc();
  ASSERT_TRUE(b);
  EXPECT_EQ(a.share(*b), Errc::ok);
  EXPECT_EQ(a.share_count(*b), 2u);
  EXPECT_EQ(*a.release(*b), 1u);
  EXPECT_EQ(a.free_blocks(), 7u);  // still held by one sharer
  EXPECT_EQ(*a.release(*b), 0u);
  EXPECT_EQ(a.free_blocks(), 8u);
  EXPECT_EQ(a.release(*b).code(), Errc::underflow);
  EXPECT_EQ(misuse.reported(), 1u);
  EXPECT_EQ(a.share(*b), Errc::invalid_argument);  // free block
  EXPECT_EQ(a.share(100), Errc::out_of_range);
  EXPECT_EQ(a.release(100).code(), Errc::out_of_range);
}

// A bad block is never handed out: a free one leaves the pool at once, a shared one when its
// last sharer releases it. Marking is idempotent; a block past the end changes nothing.
TEST(BlockAllocatorTest, BadBlocksLeaveThePool) {
  BlockAllocator a(4);
  auto used = a.alloc();
  ASSERT_TRUE(used);
  ASSERT_EQ(a.share(*used), Errc::ok);
  EXPECT_EQ(a.mark_bad(3), Errc::ok);
  EXPECT_EQ(a.mark_bad(3), Errc::ok);
  EXPECT_EQ(a.mark_bad(*used), Errc::ok);
  EXPECT_EQ(a.mark_bad(4), Errc::out_of_range);
  EXPECT_EQ(a.bad_blocks(), 2u);
  EXPECT_EQ(a.retired_blocks(), 1u);
  EXPECT_EQ(a.free_blocks(), 2u);
  EXPECT_TRUE(a.is_bad(3));
  EXPECT_FALSE(a.is_bad(4));
  EXPECT_EQ(*a.release(*used), 1u);
  EXPECT_EQ(*a.release(*used), 0u);
  EXPECT_EQ(a.retired_blocks(), 2u);
  EXPECT_EQ(a.free_blocks(), 2u);
  EXPECT_FALSE(a.alloc_extent(2, 2)) << "a 2-block extent exists only over a bad block";
  for (int i = 0; i < 2; ++i) {
    auto b = a.alloc();
    ASSERT_TRUE(b);
    EXPECT_FALSE(a.is_bad(*b));
  }
  EXPECT_EQ(a.alloc().code(), Errc::no_memory);
}

}  // namespace
}  // namespace pgmap::fs
