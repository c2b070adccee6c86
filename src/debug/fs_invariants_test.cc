// The fs extension of the invariant checker: silent on a consistent filesystem (mapped PTE and
// PMD entries, a zero entry, a reflinked file, a pipe buffer and a DIO request held) under every
// strategy, and each fs check fires when the state is corrupted on purpose (then undone, so the
// teardown succeeds).
#include "pgmap/debug/fs_invariants.h"

#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/pipe.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::debug {
namespace {

using fs::FallocMode;
using fs::FallocOptions;
using fs::File;

class FsInvariantsTest : public fs::testutil::FsTest {
 protected:
  void SetUp() override {
    FsTest::SetUp();
    a_ = must_create("a");
    b_ = must_create("b");
    c_ = must_create("c");
    auto data = pattern(4 * kPageSize, 7);
    ASSERT_TRUE(a_.inode().write(0, data.data(), data.size()));  // blocks 0..3
    ASSERT_TRUE(c_.inode().write(0, data.data(), kPageSize));    // block 4
    FallocOptions o;
    o.pmd_aligned = true;
    ASSERT_TRUE(b_.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
    ASSERT_EQ(fs_->reflink(a_.inode(), c_.inode()), Errc::ok);  // c shares a's 4 blocks
    ASSERT_TRUE(a_.inode().truncate(8 * kPageSize));            // pages 4..7: a hole
    auto ma =
        as_.mmap(0, 8 * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, a_.mapping(), 0);
    ASSERT_TRUE(ma);
    addr_a_ = *ma;
    auto mb =
        as_.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, b_.mapping(), 0);
    ASSERT_TRUE(mb);
    addr_b_ = *mb;
    auto mc = as_.mmap(0, 4 * kPageSize, mm::kProtRead, mm::kMapShared, c_.mapping(), 0);
    ASSERT_TRUE(mc);
    addr_c_ = *mc;
    char x = 0;
    for (std::uint64_t p = 0; p < 4; ++p) {
      ASSERT_FALSE(as_.read(addr_a_ + p * kPageSize, &x, 1));  // shared blocks: read only
      ASSERT_FALSE(as_.read(addr_c_ + p * kPageSize, &x, 1));
    }
    ASSERT_FALSE(as_.read(addr_a_ + 5 * kPageSize, &x, 1));  // zero entry
    ASSERT_FALSE(as_.write(addr_b_ + 100, &x, 1));           // PMD block entry
    auto pipe = fs::PipeBuffer::vmsplice(as_, addr_a_ + kPageSize, 1);
    ASSERT_TRUE(pipe);
    pipe_.emplace(std::move(pipe).value());
    auto dio = fs::DioRequest::submit(as_, addr_b_ + 3 * kPageSize, 2);
    ASSERT_TRUE(dio);
    dio_ = std::move(dio).value();
  }

  void TearDown() override {
    if (dio_) {
      EXPECT_EQ(dio_->complete(std::byte{1}), Errc::ok);
    }
    dio_.reset();
    pipe_.reset();
    EXPECT_EQ(as_.munmap(addr_a_, 8 * kPageSize), Errc::ok);
    EXPECT_EQ(as_.munmap(addr_b_, kPmdSize), Errc::ok);
    EXPECT_EQ(as_.munmap(addr_c_, 4 * kPageSize), Errc::ok);
    a_.close();
    b_.close();
    c_.close();
    FsTest::TearDown();
  }

  Report check() const {
    Universe u;
    u.address_spaces.push_back(&as_);
    u.complete = true;
    FsUniverse f;
    f.filesystems.push_back(fs_.get());
    if (pipe_) f.pipes.push_back(&*pipe_);
    if (dio_) f.dios.push_back(dio_.get());
    return check_fs_invariants(u, f);
  }

  PageArray& arr() const { return *pgmap_->array_for(pgmap_->range(0).start); }
  std::uint64_t head_of_block(std::uint64_t block) const {
    return arr().head_of(arr().index_of(pfn_of_block(block)));
  }

  mm::AddressSpace as_;
  File a_, b_, c_;
  std::uint64_t addr_a_ = 0, addr_b_ = 0, addr_c_ = 0;
  std::optional<fs::PipeBuffer> pipe_;
  std::unique_ptr<fs::DioRequest> dio_;
};

TEST_P(FsInvariantsTest, SilentOnConsistentFilesystem) {
  Report r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
  EXPECT_GT(r.entries_checked, 0u);
  EXPECT_EQ(r.held_checked, 3u);  // one piped page, two DIO pages
}

TEST_P(FsInvariantsTest, EntryFolioOrderAndMapping) {
  // I11: the PMD entry's folio loses its mapping (as if disassociated under the entry).
  const std::uint64_t pmd_block = *b_.inode().block_of(0);
  std::atomic<const void*>& m = arr().mapping(head_of_block(pmd_block));
  const void* saved = m.load();
  m.store(nullptr);
  Report r = check();
  EXPECT_GE(r.count(Check::fs_entry_folio), 1u) << r.to_string();
  m.store(saved);
  // Bug 5.8: a folio associated with no entry keeps a large order.
  const std::uint64_t idle = head_of_block(1024);
  ASSERT_EQ(arr().set_folio_order(idle, kPmdOrder), Errc::ok);
  r = check();
  EXPECT_EQ(r.count(Check::fs_entry_folio), 1u) << r.to_string();
  ASSERT_EQ(arr().set_folio_order(idle, 0), Errc::ok);
  r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
}

TEST_P(FsInvariantsTest, SplitOwedAtTheLastPut) {
  // An unassociated large folio owed a split is legal only while it is held (folio_order_test
  // checks that side): idle, its last put should have split it.
  const std::uint64_t idle = head_of_block(1024);
  ASSERT_EQ(arr().set_folio_order(idle, kPmdOrder), Errc::ok);
  arr().flags(idle).fetch_or(kPageSplitOwed);
  Report r = check();
  EXPECT_EQ(r.count(Check::fs_entry_folio), 1u) << r.to_string();
  EXPECT_NE(r.to_string().find("split is owed but it is idle"), std::string::npos);
  // The owner's next look at it settles the debt: it is idle, so it is split.
  EXPECT_EQ(arr().settle_split(idle, 0, 0), Errc::ok);
  EXPECT_EQ(arr().order(idle), 0u);
  EXPECT_EQ(arr().flags(idle).load() & (kPageSplitOwed | kPageSplitting), 0);
  r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
  // An associated folio must not stay owed a split (its last put would split it under its entry).
  const std::uint64_t pmd = head_of_block(*b_.inode().block_of(0));
  arr().flags(pmd).fetch_or(kPageSplitOwed);
  r = check();
  EXPECT_EQ(r.count(Check::fs_entry_folio), 1u) << r.to_string();
  arr().flags(pmd).fetch_and(static_cast<std::uint8_t>(~kPageSplitOwed));
}

TEST_P(FsInvariantsTest, BlockFreedUnderEntryAndPipe) {
  // I7/I8: page 1 of a (a block c shares, piped) loses both its sharers in the allocator.
  const std::uint64_t blk = *a_.inode().block_of(1);
  ASSERT_EQ(fs_->allocator().share_count(blk), 2u);
  ASSERT_TRUE(fs_->allocator().release(blk));
  ASSERT_TRUE(fs_->allocator().release(blk));
  Report r = check();
  EXPECT_GE(r.count(Check::fs_block_in_use_free), 3u) << r.to_string();  // map, a's, c's entry
  EXPECT_GE(r.count(Check::freed_unreferenced), 1u) << r.to_string();    // the pipe's page
  // Undo: the lowest free block is this one (blocks are handed out first-fit from 0).
  auto again = fs_->allocator().alloc_extent(1, 1);
  ASSERT_TRUE(again);
  ASSERT_EQ(*again, blk);
  ASSERT_EQ(fs_->allocator().share(blk), Errc::ok);
  r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
}

TEST_P(FsInvariantsTest, ShareCounts) {
  // I12, allocator side: a shared block loses one sharer.
  const std::uint64_t blk = *a_.inode().block_of(2);
  ASSERT_TRUE(fs_->allocator().release(blk));
  Report r = check();
  EXPECT_EQ(r.count(Check::fs_share_count), 1u) << r.to_string();
  ASSERT_EQ(fs_->allocator().share(blk), Errc::ok);
  // I12, folio side: the shared folio counts one association too many.
  std::atomic<std::uint64_t>& share = arr().index_or_share(head_of_block(blk));
  ASSERT_EQ(share.load(), 2u);
  share.fetch_add(1);
  r = check();
  EXPECT_EQ(r.count(Check::fs_share_count), 1u) << r.to_string();
  share.fetch_sub(1);
  r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
}

TEST_P(FsInvariantsTest, EntryPagemapReferences) {
  switch (GetParam()) {
    case Strategy::alloc_event: {
      // The PMD entry's allocation goes missing (as if the entry dropped it early).
      DevPagemap::Allocation held = b_.inode().testing_swap_allocation(0, {});
      ASSERT_TRUE(held);
      Report r = check();
      EXPECT_EQ(r.count(Check::fs_entry_pagemap_refs), 1u) << r.to_string();
      EXPECT_EQ(r.count(Check::strategy_ref_count), 1u) << r.to_string();
      EXPECT_FALSE(b_.inode().testing_swap_allocation(0, std::move(held)));
      break;
    }
    case Strategy::per_lookup:
    case Strategy::transition: {
      // Entries' references vanish: the count drops below one per entry page.
      const std::int64_t n = pgmap_->ref_count_snapshot();
      for (std::int64_t i = 0; i < n - 1; ++i)
        ASSERT_EQ(pgmap_->put_ref(), Errc::ok);
      Report r = check();
      EXPECT_EQ(r.count(Check::fs_entry_pagemap_refs), 1u) << r.to_string();
      EXPECT_EQ(r.count(Check::strategy_ref_count), 1u) << r.to_string();
      for (std::int64_t i = 0; i < n - 1; ++i)
        ASSERT_TRUE(pgmap_->tryget_live());
      break;
    }
    case Strategy::none:
    case Strategy::sweep:
      GTEST_SKIP() << "entries hold no pagemap reference under this strategy";
  }
  Report r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
}

TEST_P(FsInvariantsTest, Nrpages) {
  // T3: 4 PTE entries of a, 512 of b's PMD entry, 4 of c; zero entries count nothing.
  EXPECT_EQ(a_.inode().nrpages(), 4u);
  EXPECT_EQ(b_.inode().nrpages(), 512u);
  EXPECT_EQ(c_.inode().nrpages(), 4u);
  a_.inode().testing_adjust_nrpages(1);
  Report r = check();
  EXPECT_EQ(r.count(Check::fs_nrpages), 1u) << r.to_string();
  a_.inode().testing_adjust_nrpages(-1);
  r = check();
  EXPECT_TRUE(r.ok()) << r.to_string();
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, FsInvariantsTest,
                         ::testing::Values(Strategy::none, Strategy::per_lookup,
                                           Strategy::transition, Strategy::sweep,
                                           Strategy::alloc_event),
                         fs::testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::debug
