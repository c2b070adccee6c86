// T3 (kernel-semantics.md §7.3): nrpages accounting across faults (PTE, PMD, a hole's zero entry
// replaced on write, colliding PTE and PMD faults on one 2 MiB range), truncate, punch hole and
// eviction. nrpages counts the pages of block entries (a PMD entry 512); zero and empty entries
// count nothing. Every step is cross-checked by the invariant checker (fs_nrpages and the rest).
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/debug/fs_invariants.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class NrpagesTest : public FsTest {
 protected:
  void expect_consistent(const mm::AddressSpace& as, const char* where) {
    fs_->flush_evictions();
    debug::Universe u;
    u.address_spaces.push_back(&as);
    u.complete = true;
    debug::FsUniverse f;
    f.filesystems.push_back(fs_.get());
    debug::Report r = debug::check_fs_invariants(u, f);
    EXPECT_TRUE(r.ok()) << where << ": " << r.to_string();
  }
};

TEST_P(NrpagesTest, FaultTruncatePunchEvict) {
  File f = must_create("t3");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
  ASSERT_TRUE(f.inode().truncate(kPmdSize + 16 * kPageSize));  // pages 512..527: holes
  std::shared_ptr<Inode> keep = f.mapping();
  mm::AddressSpace as;
  auto addr = as.mmap(0, 2 * kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, keep, 0);
  ASSERT_TRUE(addr);
  EXPECT_EQ(f.inode().nrpages(), 0u);
  char x = 1;
  // A PMD fault on the aligned extent: one entry of 512 pages.
  ASSERT_FALSE(as.read(*addr, &x, 1));
  EXPECT_EQ(f.inode().nrpages(), 512u);
  // Reads of holes: zero entries, nothing counted.
  ASSERT_FALSE(as.read(*addr + kPmdSize, &x, 1));
  ASSERT_FALSE(as.read(*addr + kPmdSize + kPageSize, &x, 1));
  EXPECT_EQ(f.inode().nrpages(), 512u);
  EXPECT_EQ(f.inode().entries().size(), 3u);
  expect_consistent(as, "after reads");
  // A write to a zero page replaces its zero entry by a block entry.
  ASSERT_FALSE(as.write(*addr + kPmdSize, &x, 1));
  EXPECT_EQ(f.inode().nrpages(), 513u);
  // A write fault into a hole never read.
  ASSERT_FALSE(as.write(*addr + kPmdSize + 5 * kPageSize, &x, 1));
  EXPECT_EQ(f.inode().nrpages(), 514u);
  expect_consistent(as, "after writes");
  // Punch hole over one PTE block entry.
  ASSERT_TRUE(f.inode().fallocate(FallocMode::punch_hole, kPmdSize + 5 * kPageSize, kPageSize));
  EXPECT_EQ(f.inode().nrpages(), 513u);
  expect_consistent(as, "after punch");
  // Truncate away the PMD entry and everything after it.
  ASSERT_TRUE(f.inode().truncate(0));
  EXPECT_EQ(f.inode().nrpages(), 0u);
  EXPECT_EQ(f.inode().entries().size(), 0u);
  expect_consistent(as, "after truncate");
  // Map again, then evict: unlink, close, munmap.
  ASSERT_TRUE(f.inode().truncate(8 * kPageSize));
  for (std::uint64_t p = 0; p < 8; p += 2)
    ASSERT_FALSE(as.write(*addr + p * kPageSize, &x, 1));
  EXPECT_EQ(f.inode().nrpages(), 4u);
  ASSERT_EQ(fs_->unlink("t3"), Errc::ok);
  f.close();
  EXPECT_EQ(keep->nrpages(), 4u);  // still mapped: not evicted
  ASSERT_EQ(as.munmap(*addr, 2 * kPmdSize), Errc::ok);
  fs_->flush_evictions();
  EXPECT_EQ(keep->state(), Inode::State::evicted);
  EXPECT_EQ(keep->nrpages(), 0u);
  expect_consistent(as, "after eviction");
}

// Colliding PTE and PMD faults on one 2 MiB range (I6, generic/437): whichever kind wins,
// nrpages matches the entries (512 for the PMD entry, one per PTE entry).
TEST_P(NrpagesTest, CollidingPteAndPmdFaults) {
  File f = must_create("collide");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
  mm::AddressSpace pmd_as;
  mm::AddressSpace pte_as;
  auto pa =
      pmd_as.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(pa);
  // A VMA whose start is not 2 MiB aligned: PTE faults only.
  const std::uint64_t base = mm::AddressSpace::kMmapBase + (std::uint64_t{8} << 30) + kPageSize;
  auto ta = pte_as.mmap(base, kPmdSize, mm::kProtRead | mm::kProtWrite,
                        mm::kMapShared | mm::kMapFixed, f.mapping(), 0);
  ASSERT_TRUE(ta);
  for (int round = 0; round < 20; ++round) {
    const std::uint64_t off1 = static_cast<std::uint64_t>(round * 7919) % kPmdSize;
    const std::uint64_t off2 = (off1 + kPmdSize / 2) % kPmdSize;
    char c1 = 0;
    char c2 = 0;
    std::thread t1([&] { EXPECT_FALSE(pmd_as.read(*pa + off1, &c1, 1)); });
    std::thread t2([&] { EXPECT_FALSE(pte_as.read(*ta + off2, &c2, 1)); });
    t1.join();
    t2.join();
    std::uint64_t pages = 0;
    for (const EntryMap::Slot& s : f.inode().entries().snapshot()) {
      if (s.entry.is_block()) pages += s.entry.pages();
    }
    EXPECT_GE(pages, 1u);
    EXPECT_EQ(f.inode().nrpages(), pages);
    // Break the layout and drop the entries, keeping the blocks: the next round collides again.
    ASSERT_EQ(pmd_as.munmap(*pa, kPmdSize), Errc::ok);
    ASSERT_EQ(pte_as.munmap(*ta, kPmdSize), Errc::ok);
    ASSERT_TRUE(f.inode().truncate(0));
    EXPECT_EQ(f.inode().nrpages(), 0u);
    ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
    pa = pmd_as.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
    ASSERT_TRUE(pa);
    ta = pte_as.mmap(base, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared | mm::kMapFixed,
                     f.mapping(), 0);
    ASSERT_TRUE(ta);
  }
  ASSERT_EQ(pmd_as.munmap(*pa, kPmdSize), Errc::ok);
  ASSERT_EQ(pte_as.munmap(*ta, kPmdSize), Errc::ok);
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, NrpagesTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
