// fs scenarios: reflink share counts (T8, I12), removal under a mounted filesystem (T10 fs half,
// bug 5.9), colliding PTE and PMD faults (generic/437, I6) and pinned DIO racing truncate and
// hole punching with checksums (the idea of generic/503, t_mmap_collision; I7).
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/fs/dio.h"
#include "pgmap/mm/gup.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class ScenarioTest : public FsTest {};

// T8: one block mapped through three reflinked files: no single mapping, share count 3; writes
// through a mapping are refused, write() breaks the share; the last sharer resets the folio.
TEST_P(ScenarioTest, ReflinkShareCounts) {
  File a = must_create("a");
  auto data = pattern(kPageSize, 5);
  ASSERT_TRUE(a.inode().write(0, data.data(), data.size()));
  File b = must_create("b");
  File c = must_create("c");
  ASSERT_EQ(fs_->reflink(a.inode(), b.inode()), Errc::ok);
  ASSERT_EQ(fs_->reflink(a.inode(), c.inode()), Errc::ok);
  const std::uint64_t block = *a.inode().block_of(0);
  EXPECT_EQ(b.inode().block_of(0), block);
  EXPECT_EQ(fs_->allocator().share_count(block), 3u);
  EXPECT_TRUE(a.inode().fiemap()->front().shared);
  EXPECT_TRUE(c.inode().iomap(0)->shared);
  std::vector<std::unique_ptr<mm::AddressSpace>> as;
  std::vector<std::uint64_t> addrs;
  for (File* f : {&a, &b, &c}) {
    as.push_back(std::make_unique<mm::AddressSpace>());
    auto addr = as.back()->mmap(0, kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared,
                                f->mapping(), 0);
    ASSERT_TRUE(addr);
    addrs.push_back(*addr);
    std::vector<std::byte> back(kPageSize);
    ASSERT_FALSE(as.back()->read(*addr, back.data(), back.size()));
    EXPECT_EQ(back, data);
  }
  const Pfn pfn = pfn_of_block(block);
  PageArray& pa = array(pfn);
  const std::uint64_t e = entry(pfn);
  EXPECT_EQ(pa.mapping(e).load(), nullptr);
  EXPECT_EQ(pa.index_or_share(e).load(), 3u);
  EXPECT_NE(pa.flags(e).load() & kPageShared, 0);
  EXPECT_EQ(pa.mapcount(e).load(), 3);
  // A write through b's mapping to the shared block is refused.
  const char w = 'w';
  EXPECT_EQ(as[1]->write(addrs[1], &w, 1).signal, mm::Signal::sigbus);
  // write() to b breaks the share: b gets its own block; a and c keep theirs.
  ASSERT_TRUE(b.inode().write(0, &w, 1));
  EXPECT_NE(b.inode().block_of(0), block);
  EXPECT_EQ(fs_->allocator().share_count(block), 2u);
  EXPECT_EQ(pa.index_or_share(e).load(), 2u);
  char got = 0;
  ASSERT_TRUE(a.inode().read(0, &got, 1));
  EXPECT_EQ(static_cast<std::byte>(got), data[0]);
  ASSERT_TRUE(b.inode().read(0, &got, 1));
  EXPECT_EQ(got, 'w');
  // The remaining sharers go: the folio returns to order 0, no mapping, no share, idle.
  as.clear();
  ASSERT_TRUE(a.inode().truncate(0));
  EXPECT_EQ(pa.index_or_share(e).load(), 1u);
  ASSERT_TRUE(c.inode().truncate(0));
  EXPECT_EQ(pa.mapping(e).load(), nullptr);
  EXPECT_EQ(pa.index_or_share(e).load(), 0u);
  EXPECT_EQ(pa.flags(e).load() & kPageShared, 0);
  EXPECT_EQ(pa.order(e), 0u);
  EXPECT_EQ(pa.ref(e).load(), 0u);
  EXPECT_EQ(fs_->allocator().share_count(block), 0u);
}

// T10 (fs half), bug 5.9: the device goes away under a mounted filesystem with a file open and
// mapped: pre-remove notification, SIGBUS for the mapping, EIO (Errc::dead) for operations, the
// pagemap teardown completes, unmount afterwards is clean.
TEST_P(ScenarioTest, DeviceRemovalUnderMountedFilesystem) {
  File f = must_create("busy");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, kPmdSize, kPageSize));
  auto as = std::make_unique<mm::AddressSpace>();
  auto addr =
      as->mmap(0, 2 * kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  const char w = 'w';
  ASSERT_FALSE(as->write(*addr, &w, 1));
  ASSERT_FALSE(as->write(*addr + kPmdSize, &w, 1));
  EXPECT_EQ(as->nr_entries(), 2u);
  // The driver's unbind: kill_dax (notifies the holder), then memunmap_pages.
  ASSERT_EQ(dax_->kill(), Errc::ok);
  EXPECT_TRUE(fs_->shut_down());
  EXPECT_EQ(as->nr_entries(), 0u);  // every user mapping zapped
  EXPECT_EQ(f.inode().entries().size(), 0u);
  MemunmapOptions mo;
  mo.timeout = std::chrono::seconds(30);
  auto torn = pgmap_->memunmap(mo);
  ASSERT_TRUE(torn) << torn.error().to_string();
  // Mapping users get SIGBUS; operations fail with the shut-down error.
  std::byte b;
  EXPECT_EQ(as->read(*addr, &b, 1).signal, mm::Signal::sigbus);
  EXPECT_EQ(f.inode().read(0, &b, 1).code(), Errc::dead);
  EXPECT_EQ(f.inode().write(0, &b, 1).code(), Errc::dead);
  EXPECT_EQ(f.inode().truncate(0).code(), Errc::dead);
  EXPECT_EQ(fs_->create("more").code(), Errc::dead);
  EXPECT_EQ(fs_->open("busy").code(), Errc::dead);
  mm::AddressSpace as2;
  EXPECT_EQ(as2.mmap(0, kPageSize, mm::kProtRead, mm::kMapShared, f.mapping(), 0).code(),
            Errc::dead);
  EXPECT_EQ(fs_->unmount(), Errc::busy);  // the file is still open and mapped
  as.reset();
  f.close();
  EXPECT_EQ(fs_->unmount(), Errc::ok);
  EXPECT_EQ(fs_->nr_inodes(), 0u);
}

// generic/437: PTE and PMD faults colliding on one 2 MiB range of a hole never produce
// overlapping entries (I6), and every write lands.
TEST_P(ScenarioTest, CollidingPteAndPmdFaults) {
  File f = must_create("collide");
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
  for (int round = 0; round < 40; ++round) {
    ASSERT_TRUE(f.inode().truncate(0));
    ASSERT_TRUE(f.inode().truncate(kPmdSize));
    const std::uint64_t off1 = static_cast<std::uint64_t>(round * 7919) % kPmdSize;
    const std::uint64_t off2 = (off1 + kPmdSize / 2) % kPmdSize;
    const char c1 = static_cast<char>('a' + round % 26);
    const char c2 = static_cast<char>('A' + round % 26);
    std::thread t1([&] { EXPECT_FALSE(pmd_as.write(*pa + off1, &c1, 1)); });
    std::thread t2([&] { EXPECT_FALSE(pte_as.write(*ta + off2, &c2, 1)); });
    t1.join();
    t2.join();
    const auto slots = f.inode().entries().snapshot();
    for (std::size_t i = 0; i + 1 < slots.size(); ++i) {
      ASSERT_LE(slots[i].index + slots[i].entry.pages(), slots[i + 1].index) << "I6";
    }
    char g1 = 0;
    char g2 = 0;
    ASSERT_TRUE(f.inode().read(off1, &g1, 1));
    ASSERT_TRUE(f.inode().read(off2, &g2, 1));
    EXPECT_EQ(g1, c1);
    EXPECT_EQ(g2, c2);
  }
}

// The idea of generic/503 (t_mmap_collision): DIO requests pinning pages of a DAX mmap race punch
// hole, zero range, collapse range and truncate; each completion writes its page's checksum
// pattern. A second file reuses freed blocks and checks its own content: a block that was still
// pinned would be overwritten by the DIO completion after being handed over.
TEST_P(ScenarioTest, PinnedDioRacesLayoutChanges) {
  constexpr std::uint64_t kPages = 16;
  File victim = must_create("victim");
  File other = must_create("other");
  mm::AddressSpace as;
  auto addr = as.mmap(0, kPages * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared,
                      victim.mapping(), 0);
  ASSERT_TRUE(addr);
  // In lockstep, as t_mmap_collision's barriers do: each round pins one page with a DIO whose
  // completion runs concurrently with the layout change (which must wait for it if it comes
  // first). A free-running DIO loop would starve the truncate (XFS holds IOLOCK against that).
  auto fill = pattern(kPageSize, 42);
  std::mt19937 rng(2);
  for (int round = 0; round < 200; ++round) {
    std::vector<std::byte> data(kPages * kPageSize, std::byte{0x11});
    ASSERT_TRUE(victim.inode().write(0, data.data(), data.size()));
    const std::uint64_t page = rng() % kPages;
    auto d = DioRequest::submit(as, *addr + page * kPageSize, 1);
    ASSERT_TRUE(d) << d.error().to_string();
    (*d)->complete_async(std::byte{0xd1});
    const std::uint64_t p = rng() % (kPages - 2);
    Status s;
    switch (round % 4) {
      case 0:
        s = victim.inode().fallocate(FallocMode::punch_hole, p * kPageSize, kPageSize);
        break;
      case 1:
        s = victim.inode().fallocate(FallocMode::zero_range, p * kPageSize, kPageSize);
        break;
      case 2:
        s = victim.inode().fallocate(FallocMode::collapse_range, p * kPageSize, kPageSize);
        break;
      case 3:
        s = victim.inode().truncate(p * kPageSize);
        break;
    }
    ASSERT_TRUE(s) << s.to_string();
    EXPECT_EQ((*d)->wait(), Errc::ok);
    // The freed blocks go to the other file: none may carry the DIO's bytes.
    ASSERT_TRUE(other.inode().truncate(0));
    for (std::uint64_t i = 0; i < 4; ++i)
      ASSERT_TRUE(other.inode().write(i * kPageSize, fill.data(), kPageSize));
    std::vector<std::byte> back(kPageSize);
    for (std::uint64_t i = 0; i < 4; ++i) {
      ASSERT_TRUE(other.inode().read(i * kPageSize, back.data(), kPageSize));
      ASSERT_EQ(back, fill) << "a pinned block was handed to another file (round " << round << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Strategies, ScenarioTest, ::testing::ValuesIn(kSafeStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
