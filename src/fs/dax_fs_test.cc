// DaxFs basics: namespace and inode lifetime, data through direct_access, the allocator's 2 MiB
// extents, iomap / FIEMAP, faults (PTE, PMD, zero pages, fallback), per-strategy association and
// the typed errors of bad input.
#include "pgmap/fs/dax_fs.h"

#include <gtest/gtest.h>

#include <cstring>

#include "fs/testing/fs_fixture.h"
#include "pgmap/core/rcu.h"
#include "pgmap/fs/inode.h"
#include "pgmap/mm/address_space.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;
using testutil::kDeviceSize;

class DaxFsTest : public FsTest {};

TEST_P(DaxFsTest, CreateWriteReadUnlinkEvict) {
  const std::uint64_t free0 = fs_->allocator().free_blocks();
  {
    File f = must_create("a");
    auto data = pattern(10000, 1);
    auto w = f.inode().write(100, data.data(), data.size());
    ASSERT_TRUE(w) << w.error().to_string();
    EXPECT_EQ(f.inode().i_size(), 10100u);
    EXPECT_EQ(fs_->allocator().free_blocks(), free0 - 3);
  }
  // Closed but linked: still there.
  EXPECT_EQ(fs_->nr_inodes(), 1u);
  auto f = fs_->open("a");
  ASSERT_TRUE(f);
  std::vector<std::byte> back(10100);
  auto r = f->inode().read(0, back.data(), back.size() + 50);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, 10100u);
  auto data = pattern(10000, 1);
  EXPECT_EQ(std::memcmp(back.data() + 100, data.data(), data.size()), 0);
  for (int i = 0; i < 100; ++i)
    EXPECT_EQ(back[static_cast<std::size_t>(i)], std::byte{0});
  EXPECT_EQ(fs_->unlink("a"), Errc::ok);
  EXPECT_EQ(f->inode().nlink(), 0u);
  EXPECT_EQ(fs_->open("a").code(), Errc::not_found);
  // Unlinked but open: still readable (POSIX).
  EXPECT_TRUE(f->inode().read(0, back.data(), 10));
  EXPECT_EQ(fs_->nr_inodes(), 1u);
  std::shared_ptr<Inode> keep = f->mapping();
  f->close();
  EXPECT_EQ(fs_->nr_inodes(), 0u);
  EXPECT_EQ(keep->state(), Inode::State::evicted);
  EXPECT_EQ(fs_->allocator().free_blocks(), free0);
  // Operations on an evicted inode: typed errors, nothing changes.
  EXPECT_EQ(keep->write(0, data.data(), 10).code(), Errc::dead);
  EXPECT_EQ(keep->read(0, back.data(), 10).code(), Errc::dead);
  EXPECT_EQ(keep->truncate(0).code(), Errc::dead);
  EXPECT_EQ(keep->fallocate(FallocMode::allocate, 0, 4096).code(), Errc::dead);
  EXPECT_EQ(keep->iomap(0).code(), Errc::dead);
  EXPECT_EQ(keep->fiemap().code(), Errc::dead);
  EXPECT_EQ(fs_->allocator().free_blocks(), free0);
}

TEST_P(DaxFsTest, BadInputIsRefusedAndChangesNothing) {
  File f = must_create("a");
  Inode& ino = f.inode();
  auto data = pattern(8192, 2);
  ASSERT_TRUE(ino.write(0, data.data(), data.size()));
  const std::uint64_t free0 = fs_->allocator().free_blocks();
  EXPECT_EQ(fs_->create("a").code(), Errc::overlap);
  EXPECT_EQ(fs_->create("").code(), Errc::invalid_argument);
  EXPECT_EQ(fs_->unlink("nope"), Errc::not_found);
  EXPECT_EQ(ino.write(kDeviceSize - 10, data.data(), 100).code(), Errc::out_of_range);
  EXPECT_EQ(ino.write(0, nullptr, 100).code(), Errc::invalid_argument);
  EXPECT_EQ(ino.truncate(kDeviceSize + 1).code(), Errc::out_of_range);
  EXPECT_EQ(ino.fallocate(FallocMode::punch_hole, 100, 4096).code(), Errc::unaligned);
  EXPECT_EQ(ino.fallocate(FallocMode::allocate, 0, 0).code(), Errc::invalid_argument);
  EXPECT_EQ(ino.fallocate(FallocMode::allocate, ~0ull - 10, 100).code(), Errc::invalid_argument);
  EXPECT_EQ(ino.fallocate(FallocMode::collapse_range, 4096, 4096).code(), Errc::invalid_argument);
  EXPECT_EQ(ino.iomap(8192).code(), Errc::out_of_range);  // at EOF
  FallocOptions pmd;
  pmd.pmd_aligned = true;
  EXPECT_EQ(ino.fallocate(FallocMode::allocate, kPageSize, kPmdSize, pmd).code(), Errc::unaligned);
  EXPECT_EQ(ino.fallocate(FallocMode::allocate, 0, kPmdSize + kPageSize, pmd).code(),
            Errc::unaligned);
  EXPECT_EQ(ino.fallocate(FallocMode::punch_hole, 0, kPmdSize, pmd).code(), Errc::invalid_argument);
  File u = must_create("u");
  EXPECT_EQ(fs_->unlink("u"), Errc::ok);
  EXPECT_EQ(fs_->unlink("u"), Errc::not_found);  // already unlinked
  EXPECT_EQ(fs_->open("u").code(), Errc::not_found);
  EXPECT_EQ(u.inode().nlink(), 0u);
  EXPECT_EQ(ino.break_layout(5, 5).code(), Errc::invalid_argument);
  EXPECT_EQ(fs_->reflink(ino, ino), Errc::invalid_argument);
  std::vector<std::byte> back(8192);
  auto r = ino.read(9000, back.data(), 10);  // past EOF: nothing to read
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, 0u);
  EXPECT_EQ(ino.i_size(), 8192u);
  EXPECT_EQ(fs_->allocator().free_blocks(), free0);
  ASSERT_TRUE(ino.read(0, back.data(), back.size()));
  EXPECT_EQ(back, data);
  // An unmount with a file open is refused and leaves everything mounted.
  EXPECT_EQ(fs_->unmount(), Errc::busy);
  EXPECT_TRUE(fs_->mounted());
  // A second mount of the same device: its holder is taken.
  EXPECT_EQ(DaxFs::mount(dax_).code(), Errc::busy);
  EXPECT_EQ(DaxFs::mount(nullptr).code(), Errc::invalid_argument);
}

TEST_P(DaxFsTest, ReflinkAcrossFilesystemsIsRefused) {
  auto b2 = pgmap::testutil::make_backing(8ull << 20);
  auto pg2 = pgmap::testutil::must_memremap(pgmap::testutil::make_params(GetParam(), b2));
  ASSERT_TRUE(pg2);
  {
    auto dax2 = *dax::DaxDevice::create(pg2, "pmem1");
    auto fs2 = *DaxFs::mount(dax2);
    File a = must_create("a");
    auto bf = fs2->create("b");
    ASSERT_TRUE(bf);
    ASSERT_TRUE(a.inode().write(0, "x", 1));
    EXPECT_EQ(fs_->reflink(a.inode(), bf->inode()), Errc::not_supported);
    EXPECT_EQ(fs2->reflink(a.inode(), bf->inode()), Errc::not_supported);
    EXPECT_EQ(bf->inode().i_size(), 0u);
    bf->close();
    EXPECT_EQ(fs2->unmount(), Errc::ok);
    EXPECT_EQ(fs2->unmount(), Errc::already_dead);
    EXPECT_EQ(dax2->kill(), Errc::ok);
  }
  EXPECT_TRUE(pg2->memunmap());
}

// Unmount waits for grace periods (the holder's unregistration, the zero pages): inside a read
// section it is refused and changes nothing. Before, it went half-way and left the destroyed
// filesystem registered as the device's holder (a later kill called into freed memory; found by
// the fuzzer).
TEST_P(DaxFsTest, UnmountInsideAReadSectionIsRefusedAndChangesNothing) {
  auto b2 = pgmap::testutil::make_backing(8ull << 20);
  auto pg2 = pgmap::testutil::must_memremap(pgmap::testutil::make_params(GetParam(), b2));
  ASSERT_TRUE(pg2);
  {
    auto dax2 = *dax::DaxDevice::create(pg2, "pmem1");
    auto fs2 = *DaxFs::mount(dax2);
    {
      rcu::ReadGuard guard;
      EXPECT_EQ(fs2->unmount(), Errc::invalid_argument);
    }
    EXPECT_TRUE(fs2->mounted());
    EXPECT_EQ(fs2->unmount(), Errc::ok);
    // The holder is gone with the unmount: another holder can register, and kill calls no one.
    static const dax::HolderOps kNoOps{};
    int other = 0;
    EXPECT_EQ(dax2->set_holder(&other, &kNoOps), Errc::ok);
    EXPECT_EQ(dax2->clear_holder(&other), Errc::ok);
    fs2.reset();
    EXPECT_EQ(dax2->kill(), Errc::ok);
  }
  EXPECT_TRUE(pg2->memunmap());
}

TEST_P(DaxFsTest, FallocatePmdAlignedExtentsAndFiemap) {
  File f = must_create("big");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, 4 * kPmdSize, o));
  EXPECT_EQ(f.inode().i_size(), 4 * kPmdSize);
  auto x = f.inode().iomap(kPmdSize + 5);
  ASSERT_TRUE(x);
  EXPECT_EQ(x->type, IomapExtent::Type::mapped);
  EXPECT_TRUE(is_aligned(x->device_offset, kPmdSize));
  EXPECT_TRUE(is_aligned(x->pfn, 512));
  auto fm = f.inode().fiemap();
  ASSERT_TRUE(fm);
  std::uint64_t total = 0;
  for (const FiemapExtent& e : *fm) {
    EXPECT_TRUE(is_aligned(e.physical, kPmdSize));
    EXPECT_FALSE(e.shared);
    total += e.length;
  }
  EXPECT_EQ(total, 4 * kPmdSize);
  // A hole: punch the second 2 MiB.
  ASSERT_TRUE(f.inode().fallocate(FallocMode::punch_hole, kPmdSize, kPmdSize));
  auto h = f.inode().iomap(kPmdSize);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->type, IomapExtent::Type::hole);
  EXPECT_EQ(h->length, kPmdSize);
  // Not enough aligned space: ENOSPC and nothing allocated.
  const std::uint64_t free0 = fs_->allocator().free_blocks();
  File g = must_create("huge");
  EXPECT_EQ(g.inode().fallocate(FallocMode::allocate, 0, kDeviceSize - kPmdSize, o).code(),
            Errc::no_memory);
  EXPECT_EQ(fs_->allocator().free_blocks(), free0);
  EXPECT_EQ(g.inode().i_size(), 0u);
}

TEST_P(DaxFsTest, CollapseRangeShiftsBlocks) {
  File f = must_create("c");
  auto data = pattern(4 * kPageSize, 3);
  ASSERT_TRUE(f.inode().write(0, data.data(), data.size()));
  const auto b2 = f.inode().block_of(2);
  ASSERT_TRUE(f.inode().fallocate(FallocMode::collapse_range, kPageSize, kPageSize));
  EXPECT_EQ(f.inode().i_size(), 3 * kPageSize);
  EXPECT_EQ(f.inode().block_of(1), b2);
  std::vector<std::byte> back(3 * kPageSize);
  ASSERT_TRUE(f.inode().read(0, back.data(), back.size()));
  EXPECT_EQ(std::memcmp(back.data(), data.data(), kPageSize), 0);
  EXPECT_EQ(std::memcmp(back.data() + kPageSize, data.data() + 2 * kPageSize, 2 * kPageSize), 0);
}

// ---- faults -------------------------------------------------------------------------------------

TEST_P(DaxFsTest, PteFaultsMapFileBlocks) {
  File f = must_create("m");
  auto data = pattern(3 * kPageSize, 4);
  ASSERT_TRUE(f.inode().write(0, data.data(), data.size()));
  mm::AddressSpace as;
  auto addr =
      as.mmap(0, 4 * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr) << addr.error().to_string();
  std::vector<std::byte> back(3 * kPageSize);
  ASSERT_FALSE(as.read(*addr, back.data(), back.size()));
  EXPECT_EQ(back, data);
  auto pte = as.lookup(*addr + kPageSize);
  ASSERT_TRUE(pte);
  EXPECT_EQ(pte->level, mm::Level::pte);
  EXPECT_EQ(pte->pfn, pfn_of_block(*f.inode().block_of(1)));
  // The folio is associated with this inode at its file index.
  PageArray& a = array(pte->pfn);
  EXPECT_EQ(a.mapping(entry(pte->pfn)).load(), static_cast<const mm::MappingOwner*>(&f.inode()));
  EXPECT_EQ(a.index_or_share(entry(pte->pfn)).load(), 1u);
  // A write through the mapping is visible to read().
  const char msg[] = "through the mapping";
  ASSERT_FALSE(as.write(*addr + 2 * kPageSize + 7, msg, sizeof msg));
  char got[sizeof msg];
  ASSERT_TRUE(f.inode().read(2 * kPageSize + 7, got, sizeof got));
  EXPECT_STREQ(got, msg);
  // Past EOF: SIGBUS.
  std::byte one;
  auto sig = as.read(*addr + 3 * kPageSize, &one, 1);
  EXPECT_EQ(sig.signal, mm::Signal::sigbus);
  const FaultStats st = f.inode().fault_stats();
  EXPECT_EQ(st.pte(FaultStats::kBlock), 3u);
  EXPECT_EQ(st.pte(FaultStats::kSigbus), 1u);
  EXPECT_EQ(f.inode().entries().size(), 3u);
}

// S1: PMD faults on a fallocated, 2 MiB-aligned file.
TEST_P(DaxFsTest, PmdFaultOnAlignedExtentAndFolioOrder) {
  File f = must_create("pmd");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, 2 * kPmdSize, o));
  mm::AddressSpace as;
  auto addr =
      as.mmap(0, 2 * kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  const char x = 'x';
  ASSERT_FALSE(as.write(*addr + kPmdSize + 100, &x, 1));
  auto e = as.lookup(*addr + kPmdSize);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pmd);
  const Pfn head = e->pfn;
  EXPECT_TRUE(is_aligned(head, 512));
  // I11: the folio has the entry's order while associated.
  PageArray& a = array(head);
  EXPECT_EQ(a.order(entry(head)), kPmdOrder);
  EXPECT_EQ(a.head_of(entry(head) + 77), entry(head));
  EXPECT_EQ(f.inode().fault_stats().pmd(FaultStats::kBlock), 1u);
  auto slot = f.inode().entries().peek(512 + 3);
  ASSERT_TRUE(slot);
  EXPECT_TRUE(slot->entry.pmd());
  EXPECT_EQ(slot->index, 512u);
  // Bug 5.8: truncating it away splits the folio back and resets every page's order.
  ASSERT_EQ(as.munmap(*addr, 2 * kPmdSize), Errc::ok);
  ASSERT_TRUE(f.inode().truncate(kPmdSize));
  for (std::uint64_t i = 0; i < 512; ++i) {
    ASSERT_EQ(a.order(entry(head) + i), 0u) << i;
    ASSERT_EQ(a.head_of(entry(head) + i), entry(head) + i) << i;
  }
  EXPECT_EQ(a.mapping(entry(head)).load(), nullptr);
  EXPECT_EQ(a.index_or_share(entry(head)).load(), 0u);
  EXPECT_EQ(a.ref(entry(head)).load(), 0u);
}

TEST_P(DaxFsTest, UnalignedExtentFallsBackToPte) {
  File f = must_create("frag");
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPageSize));  // block 0-ish
  File g = must_create("g");
  ASSERT_TRUE(g.inode().fallocate(FallocMode::allocate, 0, kPmdSize));  // 4 KiB blocks, unaligned
  mm::AddressSpace as;
  auto addr = as.mmap(0, kPmdSize, mm::kProtRead, mm::kMapShared, g.mapping(), 0);
  ASSERT_TRUE(addr);
  std::byte b;
  ASSERT_FALSE(as.read(*addr, &b, 1));
  auto e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pte);
  const FaultStats st = g.inode().fault_stats();
  EXPECT_EQ(st.pmd(FaultStats::kFallback), 1u);
  EXPECT_EQ(st.pte(FaultStats::kBlock), 1u);
}

// A PMD fault whose file index is not 2 MiB aligned (the VMA maps the file from page 1): it falls
// back to 4 KiB, counted as a PMD fallback.
TEST_P(DaxFsTest, UnalignedFileIndexPmdFaultFallsBack) {
  File f = must_create("shift");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, 4 * kPmdSize, o));
  mm::AddressSpace as;
  auto addr = as.mmap(0, 2 * kPmdSize, mm::kProtRead, mm::kMapShared, f.mapping(), kPageSize);
  ASSERT_TRUE(addr);
  std::byte b;
  ASSERT_FALSE(as.read(*addr, &b, 1));
  auto e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pte);
  EXPECT_EQ(f.inode().fault_stats().pmd(FaultStats::kFallback), 1u);
  EXPECT_EQ(f.inode().entries().nr_pages(), 1u);
}

TEST_P(DaxFsTest, HoleMapsZeroPageAndWriteReplacesIt) {
  File f = must_create("sparse");
  ASSERT_TRUE(f.inode().truncate(4 * kPageSize));  // all holes
  mm::AddressSpace as;
  auto addr =
      as.mmap(0, 4 * kPageSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  std::byte b{1};
  ASSERT_FALSE(as.read(*addr, &b, 1));
  EXPECT_EQ(b, std::byte{0});
  auto e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->pfn, fs_->zero_pfn(0));
  EXPECT_FALSE(e->writable);
  EXPECT_TRUE(f.inode().entries().peek(0)->entry.zero());
  EXPECT_EQ(f.inode().fault_stats().pte(FaultStats::kZero), 1u);
  EXPECT_EQ(fs_->allocator().free_blocks(), fs_->allocator().nr_blocks());
  // A write to the zero mapping allocates a block and replaces the zero entry.
  const char w = 'w';
  ASSERT_FALSE(as.write(*addr + 1, &w, 1));
  e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_NE(e->pfn, fs_->zero_pfn(0));
  EXPECT_TRUE(e->writable);
  EXPECT_TRUE(f.inode().entries().peek(0)->entry.is_block());
  EXPECT_GE(f.inode().fault_stats().mkwrite_refaults, 1u);
  // The zero page itself is still zero; another hole still reads zero.
  std::byte z[kPageSize];
  std::memcpy(z, fs_->zero_pagemap().address_of(fs_->zero_pfn(0)), kPageSize);
  for (std::byte c : z)
    ASSERT_EQ(c, std::byte{0});
  ASSERT_FALSE(as.read(*addr + kPageSize, &b, 1));
  EXPECT_EQ(b, std::byte{0});
  char got[2];
  ASSERT_TRUE(f.inode().read(0, got, 2));
  EXPECT_EQ(got[1], 'w');
}

// generic/428: no stale mmap reads after write(): a write() into a hole mapped to the zero page
// is seen through the mapping.
TEST_P(DaxFsTest, WriteIntoMappedHoleIsSeenThroughMapping) {
  File f = must_create("stale");
  ASSERT_TRUE(f.inode().truncate(2 * kPageSize));
  mm::AddressSpace as;
  auto addr = as.mmap(0, 2 * kPageSize, mm::kProtRead, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  std::byte b{1};
  ASSERT_FALSE(as.read(*addr + kPageSize, &b, 1));
  EXPECT_EQ(b, std::byte{0});
  const char msg = 'N';
  ASSERT_TRUE(f.inode().write(kPageSize, &msg, 1));
  char got = 0;
  ASSERT_FALSE(as.read(*addr + kPageSize, &got, 1));
  EXPECT_EQ(got, 'N');
}

TEST_P(DaxFsTest, PmdReadOfHoleMapsZeroFolioThenWriteAllocatesExtent) {
  File f = must_create("hpmd");
  ASSERT_TRUE(f.inode().truncate(kPmdSize));
  mm::AddressSpace as;
  auto addr = as.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  std::byte b{1};
  ASSERT_FALSE(as.read(*addr + 12345, &b, 1));
  EXPECT_EQ(b, std::byte{0});
  auto e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pmd);
  EXPECT_EQ(e->pfn, fs_->zero_pfn(kPmdOrder));
  EXPECT_EQ(f.inode().fault_stats().pmd(FaultStats::kZero), 1u);
  const char w = 'w';
  ASSERT_FALSE(as.write(*addr + 5, &w, 1));
  e = as.lookup(*addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pmd);
  EXPECT_NE(e->pfn, fs_->zero_pfn(kPmdOrder));
  EXPECT_TRUE(is_aligned(*f.inode().block_of(0), 512));
  // At least one: zapping the zero folio invalidates the fault's own install once (the address
  // space's sequence check), so the block fault may run twice.
  EXPECT_GE(f.inode().fault_stats().pmd(FaultStats::kBlock), 1u);
}

// How each strategy associates pages: the pagemap references an entry holds once the mapping
// is gone (the seed patch's per-page references, alloc_event's allocation, nothing otherwise).
TEST_P(DaxFsTest, EntryPagemapReferencesPerStrategy) {
  File f = must_create("refs");
  FallocOptions o;
  o.pmd_aligned = true;
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
  ASSERT_TRUE(f.inode().fallocate(FallocMode::allocate, kPmdSize, kPageSize));
  mm::AddressSpace as;
  auto addr = as.mmap(0, 2 * kPmdSize, mm::kProtRead, mm::kMapShared, f.mapping(), 0);
  ASSERT_TRUE(addr);
  std::byte b;
  ASSERT_FALSE(as.read(*addr, &b, 1));             // PMD entry
  ASSERT_FALSE(as.read(*addr + kPmdSize, &b, 1));  // PTE entry
  ASSERT_EQ(as.munmap(*addr, 2 * kPmdSize), Errc::ok);
  std::int64_t want = 0;
  switch (GetParam()) {
    case Strategy::per_lookup:
    case Strategy::transition:
      want = 513;  // one per page of each entry
      break;
    case Strategy::alloc_event:
      want = 2;  // one allocation per entry
      break;
    case Strategy::sweep:
    case Strategy::none:
      want = 0;
      break;
  }
  EXPECT_EQ(pgmap_->holders().pagemap_refs, want);
  ASSERT_TRUE(f.inode().truncate(0));
  EXPECT_EQ(pgmap_->holders().pagemap_refs, 0);
  EXPECT_EQ(f.inode().entries().size(), 0u);
}

TEST_P(DaxFsTest, MmapNeedsAnOpenFileAndLiveInode) {
  File f = must_create("x");
  std::shared_ptr<Inode> ino = f.mapping();
  f.close();
  mm::AddressSpace as;
  EXPECT_EQ(as.mmap(0, kPageSize, mm::kProtRead, mm::kMapShared, ino, 0).code(),
            Errc::invalid_argument);
  EXPECT_EQ(as.nr_vmas(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Strategies, DaxFsTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
