// MAP_PRIVATE mappings of fsdax files (issue 10 §1): copy-on-write into anonymous pages on the
// first write — at 4 KiB, under a 2 MiB read mapping (split), and on a hole (zeroed page) —
// invisible to the file and to other mappings both ways, fork write-protecting both sides,
// anonymous pages freed at munmap, truncate zapping private copies in the truncated range (Linux:
// unmap_mapping_range with even_cows), GUP FOLL_WRITE breaking COW first, and the per-mapping COW
// statistics. Every safe strategy.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/mm/anon_pool.h"
#include "pgmap/mm/gup.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;

class PrivateMappingTest : public FsTest {
 protected:
  void SetUp() override {
    FsTest::SetUp();
    anon0_ = mm::AnonPool::global().in_use();
  }
  void TearDown() override {
    as_.reset();
    EXPECT_EQ(mm::AnonPool::global().in_use(), anon0_);  // nothing anonymous leaked
    file_.close();
    FsTest::TearDown();
  }

  // A file of `pages` pages with pattern(seed 3), mapped MAP_PRIVATE read-write.
  void setup_file(std::uint64_t pages, bool pmd = false) {
    file_ = must_create("private");
    if (pmd) {
      FallocOptions o;
      o.pmd_aligned = true;
      ASSERT_TRUE(file_.inode().fallocate(FallocMode::allocate, 0, pages * kPageSize, o));
    }
    data_ = pattern(pages * kPageSize, 3);
    ASSERT_TRUE(file_.inode().write(0, data_.data(), data_.size()));
    map_private(pages);
  }
  void map_private(std::uint64_t pages) {
    as_ = std::make_unique<mm::AddressSpace>();
    auto a = as_->mmap(0, pages * kPageSize, kRW, mm::kMapPrivate, file_.mapping(), 0);
    ASSERT_TRUE(a) << a.error().to_string();
    addr_ = *a;
  }
  std::byte mem(mm::AddressSpace& as, std::uint64_t off) {
    std::byte b{};
    mm::SignalInfo sig = as.read(addr_ + off, &b, 1);
    EXPECT_FALSE(sig) << sig.why;
    return b;
  }
  void poke(mm::AddressSpace& as, std::uint64_t off, std::uint8_t v) {
    mm::SignalInfo sig = as.write(addr_ + off, &v, 1);
    EXPECT_FALSE(sig) << sig.why;
  }
  std::byte file_byte(std::uint64_t off) {
    std::byte b{};
    EXPECT_TRUE(file_.inode().read(off, &b, 1));
    return b;
  }
  std::uint64_t anon() const { return mm::AnonPool::global().in_use() - anon0_; }

  File file_;
  std::vector<std::byte> data_;
  std::unique_ptr<mm::AddressSpace> as_;
  std::uint64_t addr_ = 0;
  std::uint64_t anon0_ = 0;
};

// The first write to a 4 KiB page copies it: the page becomes anonymous and writable, the file's
// block keeps its bytes, the other pages stay the file's read-only pages.
TEST_P(PrivateMappingTest, FirstWriteCopiesThePage) {
  setup_file(4);
  EXPECT_EQ(mem(*as_, kPageSize + 1), data_[kPageSize + 1]);
  auto ro = as_->lookup(addr_ + kPageSize);
  ASSERT_TRUE(ro);
  EXPECT_FALSE(ro->writable);
  EXPECT_EQ(ro->pfn, pfn_of_block(*file_.inode().block_of(1)));
  poke(*as_, kPageSize + 1, 0xC1);
  auto rw = as_->lookup(addr_ + kPageSize);
  ASSERT_TRUE(rw);
  EXPECT_TRUE(rw->anon);
  EXPECT_TRUE(rw->writable);
  EXPECT_EQ(mem(*as_, kPageSize + 1), std::byte{0xC1});
  EXPECT_EQ(mem(*as_, kPageSize + 2), data_[kPageSize + 2]);
  EXPECT_EQ(file_byte(kPageSize + 1), data_[kPageSize + 1]);
  EXPECT_EQ(anon(), 1u);
  const mm::CowStats st = file_.inode().cow_stats();
  EXPECT_EQ(st.file_copies, 1u);
  EXPECT_EQ(st.pmd_splits, 0u);
  // The fs saw read faults only: no block became writable, pfn_mkwrite was never asked.
  EXPECT_EQ(file_.inode().fault_stats().mkwrite_refaults, 0u);
  EXPECT_GE(file_.inode().fault_stats().pte(FaultStats::kBlock), 1u);
}

// Invisibility both ways: read() and a shared mapping never see the private copy; a later file
// write is not seen through the copied page but is through a page not yet copied.
TEST_P(PrivateMappingTest, CopiesAreInvisibleBothWays) {
  setup_file(2);
  poke(*as_, 10, 0xAA);
  mm::AddressSpace other;
  auto s = other.mmap(0, 2 * kPageSize, kRW, mm::kMapShared, file_.mapping(), 0);
  ASSERT_TRUE(s);
  std::byte b{};
  ASSERT_FALSE(other.read(*s + 10, &b, 1));
  EXPECT_EQ(b, data_[10]);
  EXPECT_EQ(file_byte(10), data_[10]);
  // The file changes (write() and a write through the shared mapping).
  const std::byte x{0x5E};
  ASSERT_TRUE(file_.inode().write(11, &x, 1));
  ASSERT_TRUE(file_.inode().write(kPageSize + 11, &x, 1));
  const std::byte y{0x6F};
  ASSERT_FALSE(other.write(*s + kPageSize + 12, &y, 1));
  EXPECT_EQ(mem(*as_, 11), data_[11]);      // copied before: the old bytes
  EXPECT_EQ(mem(*as_, kPageSize + 11), x);  // not copied: the file's bytes
  EXPECT_EQ(mem(*as_, kPageSize + 12), y);
  poke(*as_, kPageSize + 13, 0x01);  // copying now takes the current bytes
  EXPECT_EQ(mem(*as_, kPageSize + 11), x);
  EXPECT_EQ(file_byte(kPageSize + 13), data_[kPageSize + 13]);
}

// A write under a 2 MiB read mapping (fallocated, 2 MiB-aligned extent): the PMD is split, only the
// written 4 KiB page becomes anonymous, the others map the file's pages at 4 KiB.
TEST_P(PrivateMappingTest, WriteUnderPmdReadSplits) {
  setup_file(kPmdSize / kPageSize, /*pmd=*/true);
  EXPECT_EQ(mem(*as_, 5 * kPageSize), data_[5 * kPageSize]);
  auto huge = as_->lookup(addr_);
  ASSERT_TRUE(huge);
  ASSERT_EQ(huge->level, mm::Level::pmd) << "the fallocated extent should map with a PMD";
  EXPECT_FALSE(huge->writable);
  EXPECT_EQ(file_.inode().fault_stats().pmd(FaultStats::kBlock), 1u);
  poke(*as_, 5 * kPageSize + 7, 0x99);
  auto w = as_->lookup(addr_ + 5 * kPageSize);
  ASSERT_TRUE(w);
  EXPECT_EQ(w->level, mm::Level::pte);
  EXPECT_TRUE(w->anon);
  EXPECT_EQ(anon(), 1u);
  EXPECT_EQ(file_.inode().cow_stats().pmd_splits, 1u);
  EXPECT_EQ(mem(*as_, 6 * kPageSize + 7), data_[6 * kPageSize + 7]);
  auto n = as_->lookup(addr_ + 6 * kPageSize);
  ASSERT_TRUE(n);
  EXPECT_EQ(n->level, mm::Level::pte);
  EXPECT_FALSE(n->anon);
  EXPECT_EQ(mem(*as_, 5 * kPageSize + 7), std::byte{0x99});
  EXPECT_EQ(mem(*as_, 5 * kPageSize + 8), data_[5 * kPageSize + 8]);
  EXPECT_EQ(file_byte(5 * kPageSize + 7), data_[5 * kPageSize + 7]);
}

// A write to a hole gives a zeroed anonymous page; the file stays a hole (no block allocated).
TEST_P(PrivateMappingTest, HoleWriteMakesZeroedAnonymousPage) {
  file_ = must_create("sparse");
  ASSERT_TRUE(file_.inode().truncate(4 * kPageSize));
  map_private(4);
  EXPECT_EQ(mem(*as_, 2 * kPageSize + 3), std::byte{0});  // the zero page, read-only
  poke(*as_, 2 * kPageSize + 3, 0x12);
  EXPECT_EQ(mem(*as_, 2 * kPageSize + 3), std::byte{0x12});
  EXPECT_EQ(mem(*as_, 2 * kPageSize + 4), std::byte{0});
  EXPECT_TRUE(as_->lookup(addr_ + 2 * kPageSize)->anon);
  poke(*as_, 3 * kPageSize, 0x13);  // a hole never read: zeroed too
  EXPECT_EQ(mem(*as_, 3 * kPageSize + 1), std::byte{0});
  EXPECT_FALSE(file_.inode().block_of(2));
  EXPECT_FALSE(file_.inode().block_of(3));
  EXPECT_EQ(file_byte(2 * kPageSize + 3), std::byte{0});
  EXPECT_EQ(anon(), 2u);
  EXPECT_EQ(file_.inode().cow_stats().file_copies, 2u);
}

// fork: both sides write-protected; each side's write copies, the other keeps the old bytes.
TEST_P(PrivateMappingTest, ForkWriteProtectsBothSides) {
  setup_file(2);
  poke(*as_, 0, 0x01);
  std::unique_ptr<mm::AddressSpace> child = as_->fork();
  auto p = as_->lookup(addr_);
  auto c = child->lookup(addr_);
  ASSERT_TRUE(p && c);
  EXPECT_FALSE(p->writable);
  EXPECT_FALSE(c->writable);
  EXPECT_EQ(p->pfn, c->pfn);
  poke(*child, 0, 0x02);
  EXPECT_EQ(mem(*as_, 0), std::byte{0x01});
  EXPECT_EQ(mem(*child, 0), std::byte{0x02});
  poke(*as_, 0, 0x03);
  EXPECT_EQ(mem(*child, 0), std::byte{0x02});
  // The file page shared read-only by both: the child's write copies, the parent reads the file.
  EXPECT_EQ(mem(*as_, kPageSize), data_[kPageSize]);
  poke(*child, kPageSize, 0x04);
  EXPECT_EQ(mem(*as_, kPageSize), data_[kPageSize]);
  EXPECT_EQ(file_byte(kPageSize), data_[kPageSize]);
  const mm::CowStats st = file_.inode().cow_stats();
  EXPECT_EQ(st.anon_copies, 1u);
  EXPECT_EQ(st.anon_reuses, 1u);
  EXPECT_EQ(st.file_copies, 2u);
  EXPECT_EQ(anon(), 3u);
  child.reset();
  EXPECT_EQ(anon(), 1u);
}

// munmap frees the anonymous pages (counted), exit (address space destruction) the rest.
TEST_P(PrivateMappingTest, MunmapFreesAnonymousPages) {
  setup_file(8);
  for (std::uint64_t i = 0; i < 8; ++i)
    poke(*as_, i * kPageSize, static_cast<std::uint8_t>(i));
  EXPECT_EQ(anon(), 8u);
  ASSERT_EQ(as_->munmap(addr_, 4 * kPageSize), Errc::ok);
  EXPECT_EQ(anon(), 4u);
  as_.reset();
  EXPECT_EQ(anon(), 0u);
}

// truncate zaps private copies in the truncated range (even_cows), not outside it; an access
// past the new EOF gets SIGBUS.
TEST_P(PrivateMappingTest, TruncateZapsPrivateCopiesInRange) {
  setup_file(4);
  poke(*as_, 0, 0x21);
  poke(*as_, 3 * kPageSize, 0x22);
  EXPECT_EQ(anon(), 2u);
  ASSERT_TRUE(file_.inode().truncate(2 * kPageSize));
  EXPECT_EQ(anon(), 1u);
  std::byte b{};
  EXPECT_EQ(as_->read(addr_ + 3 * kPageSize, &b, 1).signal, mm::Signal::sigbus);
  EXPECT_EQ(mem(*as_, 0), std::byte{0x21});
}

// Operations that only invalidate the file's mappings keep private data (even_cows false): a
// write() that fills a hole the private mapping already copied, and a hole punch over a copied
// page. Regression: both used to zap the anonymous copy (the process lost its private bytes and
// read the file's new bytes instead).
TEST_P(PrivateMappingTest, FileWritesAndHolePunchKeepPrivateCopies) {
  file_ = must_create("sparse");
  ASSERT_TRUE(file_.inode().truncate(4 * kPageSize));
  map_private(4);
  EXPECT_EQ(mem(*as_, 0), std::byte{0});  // the zero page read-only (a zero entry in the file)
  poke(*as_, 0, 0x31);                    // private copy of the zero page
  mm::AddressSpace other;
  auto s = other.mmap(0, 4 * kPageSize, kRW, mm::kMapShared, file_.mapping(), 0);
  ASSERT_TRUE(s);
  std::byte b{};
  ASSERT_FALSE(other.read(*s, &b, 1));  // the zero page mapped shared too
  const std::vector<std::byte> fill(kPageSize, std::byte{0x44});
  ASSERT_TRUE(file_.inode().write(0, fill.data(), kPageSize));  // allocates: zero mappings go
  EXPECT_EQ(mem(*as_, 0), std::byte{0x31});
  EXPECT_EQ(mem(*as_, 1), std::byte{0});
  ASSERT_FALSE(other.read(*s, &b, 1));
  EXPECT_EQ(b, std::byte{0x44});
  // A hole punch over the copied page: the file reads zeros, the private copy stays.
  ASSERT_TRUE(file_.inode().write(kPageSize, fill.data(), kPageSize));
  poke(*as_, kPageSize, 0x32);
  ASSERT_TRUE(file_.inode().fallocate(FallocMode::punch_hole, 0, 2 * kPageSize));
  EXPECT_EQ(file_byte(kPageSize), std::byte{0});
  EXPECT_EQ(mem(*as_, kPageSize), std::byte{0x32});
  EXPECT_EQ(mem(*as_, kPageSize + 1), std::byte{0x44});
  EXPECT_EQ(mem(*as_, 0), std::byte{0x31});
  EXPECT_EQ(anon(), 2u);
}

// GUP FOLL_WRITE on a private mapping breaks COW first: the pin is on the anonymous copy, so a
// truncate of the file does not wait for it (the file's block is not pinned) and DMA data is
// what the process sees.
TEST_P(PrivateMappingTest, GupWritePinsAnonymousCopy) {
  setup_file(2);
  auto pins = mm::pin_user_pages(*as_, addr_, 1, mm::kFollWrite);
  ASSERT_TRUE(pins) << pins.error().to_string();
  EXPECT_TRUE(mm::AnonPool::is_anon((*pins)[0].pgmap));
  const Pfn block_pfn = pfn_of_block(*file_.inode().block_of(0));
  EXPECT_FALSE(pgmap_->folio_maybe_dma_pinned(block_pfn));
  (*pins)[0].pgmap->address_of((*pins)[0].pfn)[0] = std::byte{0xD0};
  EXPECT_EQ(mem(*as_, 0), std::byte{0xD0});
  EXPECT_EQ(file_byte(0), data_[0]);
  BreakOptions nowait;
  nowait.nowait = true;
  EXPECT_TRUE(file_.inode().truncate(kPageSize, nowait));  // page 1: not busy
  EXPECT_EQ(pins->release(), Errc::ok);
  // A shared mapping keeps GUP's behaviour: the pin is on the file's page.
  mm::AddressSpace shared;
  auto s = shared.mmap(0, kPageSize, kRW, mm::kMapShared, file_.mapping(), 0);
  ASSERT_TRUE(s);
  auto spins = mm::pin_user_pages(shared, *s, 1, mm::kFollWrite);
  ASSERT_TRUE(spins) << spins.error().to_string();
  EXPECT_EQ((*spins)[0].pfn, block_pfn);
  EXPECT_EQ(spins->release(), Errc::ok);
}

INSTANTIATE_TEST_SUITE_P(Strategies, PrivateMappingTest, ::testing::ValuesIn(kSafeStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
