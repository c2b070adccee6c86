#include "pgmap/mm/address_space.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "mm/testing/fake_owner.h"
#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {
namespace {

using testutil::FakeDevice;
using testutil::FakeOwner;
using testutil::make_fake_device;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint32_t kRW = kProtRead | kProtWrite;

std::uint64_t page(std::uint64_t n) {
  return n << kPageShift;
}

class AddressSpaceTest : public ::testing::Test {
 protected:
  void TearDown() override {
    // Every test destroys its address spaces first (locals): no reference may remain, so the
    // refusing teardown succeeds (a leak would make it fail rather than hang).
    for (FakeDevice& d : devices_) {
      if (d.pgmap) {
        EXPECT_EQ(d.memunmap_refuse(), Errc::ok) << d.pgmap->holders().to_string();
      }
    }
  }

  FakeDevice& device(std::uint64_t bytes = 8 * kMiB, unsigned base_order = 0,
                     FakeOwner::Options opts = {}) {
    devices_.push_back(make_fake_device(bytes, base_order, std::move(opts)));
    return devices_.back();
  }

  static std::uint64_t must_mmap(AddressSpace& as, const FakeDevice& d, std::uint64_t len,
                                 std::uint32_t prot = kRW, std::uint64_t offset = 0,
                                 std::uint64_t addr = 0, std::uint32_t extra = 0) {
    auto r = as.mmap(addr, len, prot, kMapShared | extra, d.owner, offset);
    EXPECT_TRUE(r) << r.error().to_string();
    return r ? *r : 0;
  }

  static std::vector<std::uint8_t> pattern(std::uint64_t len, std::uint8_t seed) {
    std::vector<std::uint8_t> v(len);
    for (std::uint64_t i = 0; i < len; ++i)
      v[i] = static_cast<std::uint8_t>(seed + i * 7 + i / 4096);
    return v;
  }

  pgmap::testutil::MisuseCounter misuse_;
  std::deque<FakeDevice> devices_;  // stable references
};

// Basic mmap (mmap(2) of a DAX device, S4): the address is 1 GiB aligned from kMmapBase, the VMA
// carries the prot, MAP_SHARED and the owner's DAX flags, and the owner saw on_mmap and i_mmap.
TEST_F(AddressSpaceTest, MmapCreatesVmaLinkedToOwner) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB, kRW, page(16));
  EXPECT_GE(a, AddressSpace::kMmapBase);
  EXPECT_TRUE(is_aligned(a, kGiB));
  auto vma = as.find_vma(a + page(3));
  ASSERT_TRUE(vma);
  EXPECT_EQ(vma->start, a);
  EXPECT_EQ(vma->end, a + 4 * kMiB);
  EXPECT_EQ(vma->pgoff, 16u);
  EXPECT_EQ(vma->flags, kVmRead | kVmWrite | kVmShared | kVmDax);
  EXPECT_EQ(as.nr_vmas(), 1u);
  EXPECT_EQ(d.owner->mmap_calls(), 1);
  EXPECT_EQ(d.owner->nr_vmas(), 1u);
  EXPECT_EQ(as.nr_entries(), 0u);  // nothing is faulted in by mmap
  const std::uint64_t b = must_mmap(as, d, 4 * kMiB);
  EXPECT_NE(a, b);
  EXPECT_TRUE(is_aligned(b, kGiB));
}

// mmap argument checks (mmap(2) EINVAL rules): bad len/offset, both or neither of
// MAP_SHARED/MAP_PRIVATE, unaligned MAP_FIXED; past the owner's size -> out_of_range. Nothing is
// mapped and the owner is never asked.
TEST_F(AddressSpaceTest, MmapRejectsBadArguments) {
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  auto expect_code = [&](Result<std::uint64_t> r, Errc code) {
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), code) << r.error().to_string();
  };
  expect_code(as.mmap(0, 0, kRW, kMapShared, d.owner, 0), Errc::invalid_argument);
  expect_code(as.mmap(0, 100, kRW, kMapShared, d.owner, 0), Errc::invalid_argument);
  expect_code(as.mmap(0, page(1), kRW, kMapShared, d.owner, 12), Errc::invalid_argument);
  expect_code(as.mmap(0, page(1), kRW, kMapShared | kMapPrivate, d.owner, 0),
              Errc::invalid_argument);
  expect_code(as.mmap(0, page(1), kRW, 0, d.owner, 0), Errc::invalid_argument);
  expect_code(
      as.mmap(AddressSpace::kMmapBase + 5, page(1), kRW, kMapShared | kMapFixed, d.owner, 0),
      Errc::invalid_argument);
  expect_code(as.mmap(0, 4 * kMiB + page(1), kRW, kMapShared, d.owner, 0), Errc::out_of_range);
  expect_code(as.mmap(0, page(1), kRW, kMapShared, d.owner, 4 * kMiB), Errc::out_of_range);
  expect_code(as.mmap(0, page(1), kRW, kMapShared, nullptr, 0), Errc::invalid_argument);
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(d.owner->mmap_calls(), 0);
  EXPECT_EQ(d.owner->nr_vmas(), 0u);
}

// The owner's check_vma may refuse (devdax refuses MAP_PRIVATE, ndctl device-dax S4): the error
// is the owner's and nothing is mapped.
TEST_F(AddressSpaceTest, OwnerRefusalMapsNothing) {
  FakeDevice& d = device();
  d.owner->refuse_mmap(Errc::unaligned);
  AddressSpace as;
  auto r = as.mmap(0, page(4), kRW, kMapShared, d.owner, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::unaligned);
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(d.owner->nr_vmas(), 0u);
  EXPECT_EQ(d.owner->mmap_calls(), 1);
}

// Writable MAP_PRIVATE is copy-on-write (src/mm/anon_test.cc has the details): accepted, and a
// write never reaches the owner's page.
TEST_F(AddressSpaceTest, PrivateMappingsAreCopyOnWrite) {
  FakeDevice& d = device();
  AddressSpace as;
  auto rw = as.mmap(0, page(4), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(rw) << rw.error().to_string();
  EXPECT_FALSE(as.find_vma(*rw)->shared());
  EXPECT_TRUE(as.find_vma(*rw)->writable());
  const std::byte before = d.bytes(0)[0];
  const std::uint8_t byte = static_cast<std::uint8_t>(before) ^ 0xff;
  EXPECT_FALSE(as.write(*rw, &byte, 1));
  EXPECT_EQ(d.bytes(0)[0], before);
  EXPECT_TRUE(as.lookup(*rw)->anon);
  auto ro = as.mmap(0, page(4), kProtRead, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(ro) << ro.error().to_string();
  EXPECT_EQ(as.mprotect(*ro, page(4), kRW), Errc::ok);
  EXPECT_EQ(d.owner->closed().size(), 0u);
}

// Regression (pgmap-stress known.pte_table_blocks_pmd): munmap left the emptied PTE table in
// place, so a 2 MiB mapping later placed at the same address could not get a PMD entry (a devdax
// owner then refused the 4 KiB fallback with SIGBUS). munmap now frees the tables of a range no
// VMA covers any more (free_pgtables), deferred past an RCU grace period.
TEST_F(AddressSpaceTest, MunmapFreesEmptiedPageTablesSoPmdFitsLater) {
  FakeDevice& small = device();
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& huge = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t at = AddressSpace::kMmapBase + 4 * kMiB;  // 2 MiB aligned
  auto a = as.mmap(at, page(4), kRW, kMapShared | kMapFixed, small.owner, 0);
  ASSERT_TRUE(a);
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(at + page(2), &b, 1));
  ASSERT_EQ(as.lookup(at + page(2))->level, Level::pte);
  const std::uint64_t tables = as.nr_page_tables();
  EXPECT_EQ(tables, 3u);  // PUD, PMD and PTE table under the root
  ASSERT_EQ(as.munmap(at, page(4)), Errc::ok);
  EXPECT_EQ(as.nr_page_tables(), 0u);

  auto h = as.mmap(at, kPmdSize, kRW, kMapShared | kMapFixed, huge.owner, 0);
  ASSERT_TRUE(h);
  ASSERT_FALSE(as.read(at + page(7), &b, 1));
  auto e = as.lookup(at + page(7));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, Level::pmd);
  EXPECT_EQ(huge.owner->faults(Level::pte), 0u);
}

// Tables still needed are kept: another VMA in the same 2 MiB range, or a partial munmap.
TEST_F(AddressSpaceTest, MunmapKeepsTablesOtherVmasUse) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t at = AddressSpace::kMmapBase + 4 * kMiB;
  ASSERT_TRUE(as.mmap(at, page(2), kRW, kMapShared | kMapFixed, d.owner, 0));
  ASSERT_TRUE(as.mmap(at + page(8), page(2), kRW, kMapShared | kMapFixed, d.owner, page(8)));
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(at, &b, 1));
  ASSERT_FALSE(as.read(at + page(8), &b, 1));
  ASSERT_EQ(as.munmap(at, page(2)), Errc::ok);
  EXPECT_EQ(as.nr_page_tables(), 3u);  // the second VMA still lives in that PTE table
  EXPECT_FALSE(as.read(at + page(9), &b, 1));
  EXPECT_EQ(as.lookup(at + page(8))->pfn, d.pfn(8));
  ASSERT_EQ(as.munmap(at + page(8), page(2)), Errc::ok);
  EXPECT_EQ(as.nr_page_tables(), 0u);
}

// Lockless lookups racing munmap's table freeing never read freed memory (ASan / TSan): the
// tables are deleted only after a grace period.
TEST_F(AddressSpaceTest, LocklessLookupsRaceTableFreeing) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t at = AddressSpace::kMmapBase + 4 * kMiB;
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      auto e = as.lookup(at + page(1));
      if (e) {
        EXPECT_EQ(e->pfn, d.pfn(1));
      }
    }
  });
  for (int i = 0; i < 200; ++i) {
    ASSERT_TRUE(as.mmap(at, page(2), kRW, kMapShared | kMapFixed, d.owner, 0));
    std::uint8_t b = 0;
    ASSERT_FALSE(as.read(at + page(1), &b, 1));
    ASSERT_EQ(as.munmap(at, page(2)), Errc::ok);
  }
  stop = true;
  reader.join();
  EXPECT_EQ(as.nr_page_tables(), 0u);
}

// munmap of a whole VMA (vm_ops->close, i_mmap removal): the VMA is gone, the owner closed it.
TEST_F(AddressSpaceTest, MunmapRemovesAndClosesVma) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  std::uint8_t buf[64] = {};
  ASSERT_FALSE(as.read(a, buf, sizeof buf));
  EXPECT_EQ(as.munmap(a, page(8)), Errc::ok);
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(as.nr_entries(), 0u);
  EXPECT_EQ(d.owner->nr_vmas(), 0u);
  ASSERT_EQ(d.owner->closed().size(), 1u);
  EXPECT_EQ(d.owner->closed()[0].first, a);
  EXPECT_EQ(d.refcount(0), 0u);
  EXPECT_EQ(as.munmap(a, page(8)), Errc::ok);  // unmapping a hole is not an error
  EXPECT_EQ(as.munmap(a + 1, page(1)), Errc::invalid_argument);
}

// Issue 7 item 7: lengths that wrap when rounded up to a page. Linux: munmap and mremap EINVAL,
// mprotect ENOMEM; nothing changes (the mapping, its entries and its data are intact).
TEST_F(AddressSpaceTest, LengthsThatWrapWhenRoundedAreRefusedAndChangeNothing) {
  constexpr std::uint64_t kMax = ~std::uint64_t{0};
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
  const std::vector<std::uint8_t> data = pattern(page(4), 3);
  ASSERT_FALSE(as.write(a, data.data(), data.size()));
  const std::uint64_t entries = as.nr_entries();
  auto intact = [&] {
    EXPECT_EQ(as.nr_vmas(), 1u);
    auto v = as.find_vma(a);
    ASSERT_TRUE(v);
    EXPECT_EQ(v->start, a);
    EXPECT_EQ(v->end, a + 4 * kMiB);
    EXPECT_EQ(v->flags & (kVmRead | kVmWrite), kVmRead | kVmWrite);
    EXPECT_EQ(as.nr_entries(), entries);
    std::vector<std::uint8_t> back(data.size());
    EXPECT_FALSE(as.read(a, back.data(), back.size()));
    EXPECT_EQ(back, data);
  };
  for (std::uint64_t len : {kMax, kMax - page(1) + 2, kMax - 1}) {
    EXPECT_EQ(as.munmap(a, len), Errc::invalid_argument) << len;
    intact();
    EXPECT_EQ(as.mprotect(a, len, kProtRead), Errc::no_memory) << len;
    intact();
    EXPECT_EQ(as.mremap(a, 4 * kMiB, len, kMremapMayMove).code(), Errc::invalid_argument) << len;
    intact();
    EXPECT_EQ(as.mremap(a, len, page(1), 0).code(), Errc::invalid_argument) << len;
    intact();
    // read/write of a range that wraps: access_ok fails, nothing is copied.
    std::uint8_t b = 0;
    EXPECT_EQ(as.read(a, &b, len).signal, Signal::sigsegv);
    EXPECT_EQ(as.write(a, &b, len).signal, Signal::sigsegv);
    intact();
  }
  // A length that does not wrap but passes the end of the address space: refused as well.
  EXPECT_EQ(as.munmap(a, AddressSpace::kTaskSize), Errc::invalid_argument);
  EXPECT_EQ(as.mprotect(a, AddressSpace::kTaskSize, kProtRead), Errc::no_memory);
  intact();
  // mmap: a length or offset past the owner (the sum would wrap).
  EXPECT_EQ(as.mmap(0, kMax & ~(kPageSize - 1), kRW, kMapShared, d.owner, page(1)).code(),
            Errc::out_of_range);
  EXPECT_EQ(as.mmap(0, page(1), kRW, kMapShared, d.owner, kMax & ~(kPageSize - 1)).code(),
            Errc::out_of_range);
  EXPECT_EQ(
      as.mmap(kMax & ~(kPageSize - 1), page(2), kRW, kMapShared | kMapFixed, d.owner, 0).code(),
      Errc::out_of_range);
  intact();
  // unmap_mapping_range with pgoff + npages past 2^64 zaps to the end, no wrap to a small range.
  EXPECT_EQ(d.owner->unmap_mapping_range(2, kMax), entries - 2);
  EXPECT_EQ(as.nr_entries(), 2u);
}

// A read fault inserts one PTE (vmf_insert_page_mkwrite, v6.15): one folio reference and one
// mapcount; read-only until a write fault (§3.4 post-condition, §2.1 refcount table).
TEST_F(AddressSpaceTest, FaultInsertsPteWithExactCounts) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8), kRW, page(2));
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(a + page(3) + 5, &b, 1));
  auto e = as.lookup(a + page(3) + 100);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->addr, a + page(3));
  EXPECT_EQ(e->level, Level::pte);
  EXPECT_EQ(e->pfn, d.pfn(5));
  EXPECT_EQ(e->pgmap, d.pgmap.get());
  EXPECT_FALSE(e->writable);
  EXPECT_EQ(d.refcount(5), 1u);
  EXPECT_EQ(d.mapcount(5), 1);
  EXPECT_EQ(as.nr_entries(), 1u);
  ASSERT_FALSE(as.read(a + page(3), &b, 1));  // present: no second reference
  EXPECT_EQ(d.refcount(5), 1u);
  ASSERT_FALSE(as.write(a + page(3), &b, 1));  // write fault upgrades in place
  EXPECT_TRUE(as.lookup(a + page(3))->writable);
  EXPECT_EQ(d.refcount(5), 1u);
  EXPECT_EQ(d.mapcount(5), 1);
  EXPECT_EQ(d.owner->faults(Level::pte), 1u);
}

// PMD fault (vmf_insert_folio_pmd, S1): the VMA covers the aligned 2 MiB and the owner allows
// PMD: one entry, one reference and one mapcount on the 2 MiB folio.
TEST_F(AddressSpaceTest, FaultInsertsPmdWhenVmaCoversAlignedRange) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB, kRW, 2 * kMiB);
  std::uint8_t b = 1;
  ASSERT_FALSE(as.write(a + 2 * kMiB + page(7), &b, 1));
  auto e = as.lookup(a + 2 * kMiB + page(300));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, Level::pmd);
  EXPECT_EQ(e->addr, a + 2 * kMiB);
  EXPECT_EQ(e->pfn, d.pfn(1024));
  EXPECT_TRUE(e->writable);
  EXPECT_EQ(d.refcount(1024), 1u);
  EXPECT_EQ(d.mapcount(1024), 1);
  EXPECT_EQ(as.nr_entries(), 1u);
  EXPECT_EQ(d.owner->faults(Level::pmd), 1u);
  EXPECT_EQ(d.owner->faults(Level::pte), 0u);
}

// The PMD fault falls back to PTEs when the VMA does not cover the aligned 2 MiB (§3.4 step 2,
// "VMA bounds"): PTEs of the large folio, each with its own reference and mapcount.
TEST_F(AddressSpaceTest, FaultFallsBackToPteWhenVmaDoesNotCoverPmd) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB - page(1));
  std::vector<std::uint8_t> buf(page(3));
  ASSERT_FALSE(as.read(a + page(10), buf.data(), buf.size()));
  auto e = as.lookup(a + page(11));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, Level::pte);
  EXPECT_EQ(e->pfn, d.pfn(11));  // a tail page of the 2 MiB folio
  EXPECT_EQ(as.nr_entries(), 3u);
  EXPECT_EQ(d.refcount(0), 3u);  // the head carries the folio's references
  EXPECT_EQ(d.mapcount(0), 3);
  EXPECT_EQ(d.owner->faults(Level::pmd), 0u);  // never offered: the VMA is too small
}

// PUD fault (vmf_insert_folio_pud): a 1 GiB folio under a VMA covering the aligned 1 GiB.
TEST_F(AddressSpaceTest, FaultInsertsPudWhenVmaCoversAlignedRange) {
  FakeOwner::Options o;
  o.max_level = Level::pud;
  FakeDevice& d = device(kGiB, kPudOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, kGiB);
  std::uint64_t v = 0x1122334455667788;
  ASSERT_FALSE(as.write(a + 700 * kMiB, &v, sizeof v));
  auto e = as.lookup(a + 5);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, Level::pud);
  EXPECT_EQ(e->addr, a);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.mapcount(0), 1);
  std::uint64_t back = 0;
  std::memcpy(&back, d.bytes(0) + 700 * kMiB, sizeof back);
  EXPECT_EQ(back, v);
  EXPECT_EQ(as.munmap(a, kGiB), Errc::ok);
  EXPECT_EQ(d.refcount(0), 0u);
  EXPECT_EQ(d.mapcount(0), 0);
}

// End-to-end data integrity (ndctl device-dax "MAP_SHARED read verifies data", S4; fio S12):
// bytes written through one address space are read back through another mapping of the same
// owner at a different offset, and are in the backing itself.
TEST_F(AddressSpaceTest, ReadWriteDataIntegrityAcrossAddressSpaces) {
  FakeDevice& d = device();
  AddressSpace writer;
  AddressSpace reader;
  const std::uint64_t w = must_mmap(writer, d, page(16));
  const std::uint64_t r = must_mmap(reader, d, page(12), kProtRead, page(4));
  const auto data = pattern(page(5) + 123, 3);
  ASSERT_FALSE(writer.write(w + page(5) + 77, data.data(), data.size()));
  std::vector<std::uint8_t> back(data.size());
  ASSERT_FALSE(reader.read(r + page(1) + 77, back.data(), back.size()));
  EXPECT_EQ(back, data);
  EXPECT_EQ(std::memcmp(d.bytes(5) + 77, data.data(), data.size()), 0);
  // Each mapping holds its own reference on every page both touched.
  EXPECT_EQ(d.refcount(6), 2u);
  EXPECT_EQ(d.mapcount(6), 2);
}

// SIGSEGV SEGV_MAPERR outside any VMA (si_addr is the access; si_addr_lsb is 0, Linux sets it
// only for memory failures), with the bytes before the failing page copied.
TEST_F(AddressSpaceTest, SigsegvOutsideVmas) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(2));
  std::uint8_t b = 0;
  SignalInfo s = as.read(a + page(2) + 9, &b, 1);
  EXPECT_EQ(s.signal, Signal::sigsegv);
  EXPECT_EQ(s.addr, a + page(2) + 9);
  EXPECT_EQ(s.code, SigCode::segv_maperr);
  EXPECT_EQ(s.addr_lsb, 0u);
  const auto data = pattern(page(3), 9);
  s = as.write(a + page(1), data.data(), data.size());
  EXPECT_EQ(s.signal, Signal::sigsegv);
  EXPECT_EQ(s.addr, a + page(2));
  EXPECT_EQ(std::memcmp(d.bytes(1), data.data(), page(1)), 0);  // copied up to the fault
}

// A write to a read-only VMA is a protection fault (SIGSEGV SEGV_ACCERR); reads work.
TEST_F(AddressSpaceTest, SigsegvOnWriteToReadOnlyVma) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(2), kProtRead);
  std::uint8_t b = 5;
  EXPECT_FALSE(as.read(a, &b, 1));
  SignalInfo s = as.write(a + 3, &b, 1);
  EXPECT_EQ(s.signal, Signal::sigsegv);
  EXPECT_EQ(s.addr, a + 3);
  EXPECT_EQ(s.code, SigCode::segv_accerr);
  EXPECT_EQ(s.addr_lsb, 0u);
  ASSERT_EQ(as.mprotect(a, page(2), kProtNone), Errc::ok);
  s = as.read(a + 1, &b, 1);
  EXPECT_EQ(s.signal, Signal::sigsegv);
  EXPECT_EQ(s.code, SigCode::segv_accerr);
  ASSERT_EQ(as.mprotect(a, page(2), kProtRead), Errc::ok);
  EXPECT_EQ(as.handle_fault(a, true).signal, Signal::sigsegv);
  EXPECT_FALSE(as.handle_fault(a, false));
}

// S2 case 3 (dax-pmd.c: convert a RO mapping to RW): after mprotect the write fault upgrades the
// existing read-only entry; no new reference is taken.
TEST_F(AddressSpaceTest, MprotectReadOnlyToReadWriteThenWriteSucceeds) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB, kProtRead);
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(a + page(9), &b, 1));
  ASSERT_FALSE(as.lookup(a)->writable);
  EXPECT_EQ(as.write(a + page(9), &b, 1).signal, Signal::sigsegv);
  ASSERT_EQ(as.mprotect(a, 2 * kMiB, kRW), Errc::ok);
  b = 0xab;
  ASSERT_FALSE(as.write(a + page(9), &b, 1));
  EXPECT_TRUE(as.lookup(a)->writable);
  EXPECT_EQ(as.lookup(a)->level, Level::pmd);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.mapcount(0), 1);
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(9)[0]), 0xab);
}

// mprotect RW -> RO write-protects present entries instead of zapping them.
TEST_F(AddressSpaceTest, MprotectReadOnlyWriteProtectsEntries) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  std::uint8_t b = 1;
  ASSERT_FALSE(as.write(a + page(1), &b, 1));
  ASSERT_EQ(as.mprotect(a, page(4), kProtRead), Errc::ok);
  auto e = as.lookup(a + page(1));
  ASSERT_TRUE(e);
  EXPECT_FALSE(e->writable);
  EXPECT_EQ(as.write(a + page(1), &b, 1).signal, Signal::sigsegv);
  EXPECT_EQ(d.refcount(1), 1u);
  EXPECT_EQ(as.mprotect(a, page(8), kRW), Errc::out_of_range);  // hole after the VMA
  ASSERT_EQ(as.mprotect(a, page(4), kProtNone), Errc::ok);
  EXPECT_EQ(as.read(a + page(1), &b, 1).signal, Signal::sigsegv);
  EXPECT_EQ(d.refcount(1), 0u);
}

// S2 case 2 (fork with a pre-faulted mapping, child reads the data): the child gets the VMAs but
// no entries; its own faults map the same pages, each mapping with its own reference.
TEST_F(AddressSpaceTest, ForkChildFaultsItsOwnEntries) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace parent;
  const std::uint64_t a = must_mmap(parent, d, 4 * kMiB);
  const auto data = pattern(page(3), 42);
  ASSERT_FALSE(parent.write(a + kMiB, data.data(), data.size()));
  ASSERT_EQ(d.refcount(0), 1u);
  std::unique_ptr<AddressSpace> child = parent.fork();
  EXPECT_EQ(child->nr_vmas(), 1u);
  EXPECT_EQ(child->nr_entries(), 0u);
  EXPECT_EQ(d.owner->nr_vmas(), 2u);
  EXPECT_EQ(d.owner->mmap_calls(), 1);  // dup_mmap calls vm_ops->open, not ->mmap
  std::vector<std::uint8_t> back(data.size());
  ASSERT_FALSE(child->read(a + kMiB, back.data(), back.size()));
  EXPECT_EQ(back, data);
  EXPECT_EQ(child->nr_entries(), 1u);
  EXPECT_EQ(d.refcount(0), 2u);
  EXPECT_EQ(d.mapcount(0), 2);
  child.reset();
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.owner->nr_vmas(), 1u);
}

// munmap of the middle of a VMA splits it (__split_vma twice): two pieces with the right page
// offsets stay; the removed piece is closed and its entries are zapped.
TEST_F(AddressSpaceTest, PartialMunmapSplitsVma) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8), kRW, page(10));
  std::vector<std::uint8_t> buf(page(8));
  ASSERT_FALSE(as.read(a, buf.data(), buf.size()));
  ASSERT_EQ(as.nr_entries(), 8u);
  ASSERT_EQ(as.munmap(a + page(2), page(2)), Errc::ok);
  EXPECT_EQ(as.nr_vmas(), 2u);
  EXPECT_EQ(d.owner->nr_vmas(), 2u);
  auto left = as.find_vma(a);
  auto right = as.find_vma(a + page(4));
  ASSERT_TRUE(left && right);
  EXPECT_EQ(left->end, a + page(2));
  EXPECT_EQ(left->pgoff, 10u);
  EXPECT_EQ(right->start, a + page(4));
  EXPECT_EQ(right->pgoff, 14u);
  EXPECT_FALSE(as.find_vma(a + page(3)));
  ASSERT_EQ(d.owner->closed().size(), 1u);
  EXPECT_EQ(d.owner->closed()[0], std::make_pair(a + page(2), a + page(4)));
  EXPECT_EQ(as.nr_entries(), 6u);
  EXPECT_EQ(d.refcount(12), 0u);
  EXPECT_EQ(d.refcount(13), 0u);
  EXPECT_EQ(d.refcount(14), 1u);
  std::uint8_t b = 0;
  EXPECT_EQ(as.read(a + page(2), &b, 1).signal, Signal::sigsegv);
  EXPECT_FALSE(as.read(a + page(5), &b, 1));
}

// A VMA boundary inside a huge entry splits it (for DAX: zaps it); the rest faults back at PTE
// level since no VMA covers the aligned 2 MiB any more.
TEST_F(AddressSpaceTest, PartialMunmapOfPmdEntryZapsIt) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB);
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(a, &b, 1));
  ASSERT_EQ(as.lookup(a)->level, Level::pmd);
  ASSERT_EQ(as.munmap(a + page(100), page(1)), Errc::ok);
  EXPECT_EQ(as.nr_entries(), 0u);
  EXPECT_EQ(d.refcount(0), 0u);
  ASSERT_FALSE(as.read(a + page(101), &b, 1));
  EXPECT_EQ(as.lookup(a + page(101))->level, Level::pte);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.mapcount(0), 1);
}

// vm_ops->may_split refusing (devdax refuses cuts inside its alignment, S3): munmap, mprotect
// and mremap that would cut fail with invalid_argument and change nothing.
TEST_F(AddressSpaceTest, MaySplitRefusalChangesNothing) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  std::vector<std::uint8_t> buf(page(8));
  ASSERT_FALSE(as.read(a, buf.data(), buf.size()));
  d.owner->refuse_split(true);
  EXPECT_EQ(as.munmap(a + page(2), page(2)), Errc::invalid_argument);
  EXPECT_EQ(as.mprotect(a + page(6), page(2), kProtRead), Errc::invalid_argument);
  auto r = as.mremap(a + page(1), page(1), page(2), kMremapMayMove);  // must move
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::invalid_argument);
  EXPECT_GE(d.owner->split_calls(), 3);
  EXPECT_EQ(as.nr_vmas(), 1u);
  EXPECT_EQ(as.nr_entries(), 8u);
  EXPECT_FALSE(as.lookup(a + page(7))->writable);
  EXPECT_EQ(d.owner->closed().size(), 0u);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(d.refcount(i), 1u) << i;
  EXPECT_EQ(as.find_vma(a)->end, a + page(8));
  // Whole-VMA operations need no cut.
  EXPECT_EQ(as.mprotect(a, page(8), kProtRead), Errc::ok);
  EXPECT_EQ(as.munmap(a, page(8)), Errc::ok);
  EXPECT_EQ(as.nr_vmas(), 0u);
}

// mremap of a piece to a fixed destination (S3 moves a 4K piece): the destination's old mapping
// is unmapped first; the piece keeps its owner and page offset; the source piece is gone and its
// entries were zapped; data read at the destination is the piece's.
TEST_F(AddressSpaceTest, MremapPieceToFixedDestination) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  const std::uint64_t b = must_mmap(as, d, page(4), kRW, page(100));
  const auto data = pattern(page(8), 5);
  ASSERT_FALSE(as.write(a, data.data(), data.size()));
  std::uint8_t x = 0;
  ASSERT_FALSE(as.read(b, &x, 1));  // an entry in the destination, for pgoff 100
  ASSERT_EQ(d.refcount(100), 1u);
  auto r = as.mremap(a + page(2), page(2), page(2), kMremapMayMove | kMremapFixed, b + page(1));
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(*r, b + page(1));
  auto moved = as.find_vma(b + page(1));
  ASSERT_TRUE(moved);
  EXPECT_EQ(moved->start, b + page(1));
  EXPECT_EQ(moved->end, b + page(3));
  EXPECT_EQ(moved->pgoff, 2u);
  EXPECT_EQ(moved->owner, d.owner);
  EXPECT_FALSE(as.find_vma(a + page(2)));
  EXPECT_EQ(as.read(a + page(3), &x, 1).signal, Signal::sigsegv);
  EXPECT_EQ(d.refcount(2), 0u);  // source entries zapped
  EXPECT_EQ(d.refcount(3), 0u);
  EXPECT_EQ(d.refcount(100), 1u);  // destination page 0 was not in the way
  std::vector<std::uint8_t> back(page(2));
  ASSERT_FALSE(as.read(b + page(1), back.data(), back.size()));
  EXPECT_EQ(std::memcmp(back.data(), data.data() + page(2), page(2)), 0);
  EXPECT_EQ(as.nr_vmas(), 5u);  // a[0,2) a[4,8) b[0,1) moved b[3,4)
  EXPECT_EQ(d.owner->nr_vmas(), 5u);
  // The destination's old pages [1, 3) were closed; the moved piece was not.
  ASSERT_EQ(d.owner->closed().size(), 1u);
  EXPECT_EQ(d.owner->closed()[0], std::make_pair(b + page(1), b + page(3)));
}

// mremap shrinking in place unmaps the tail; growing past the owner's size is refused.
TEST_F(AddressSpaceTest, MremapShrinkAndGrow) {
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  auto r = as.mremap(a, page(8), page(4), 0);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, a);
  EXPECT_EQ(as.find_vma(a)->end, a + page(4));
  r = as.mremap(a, page(4), page(16), 0);  // room after it: grows in place
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(as.find_vma(a)->end, a + page(16));
  r = as.mremap(a, page(16), 8 * kMiB, kMremapMayMove);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::out_of_range);
}

// unmap_mapping_range (kill_dev_dax, §3.11; I13) zaps every user mapping of the owner in every
// address space; the VMAs stay and a later access faults the page in again.
TEST_F(AddressSpaceTest, UnmapMappingRangeZapsEveryAddressSpace) {
  FakeDevice& d = device();
  AddressSpace as1;
  AddressSpace as2;
  const std::uint64_t a1 = must_mmap(as1, d, page(8));
  const std::uint64_t a2 = must_mmap(as2, d, page(4), kRW, page(4));
  std::vector<std::uint8_t> buf(page(8));
  ASSERT_FALSE(as1.read(a1, buf.data(), page(8)));
  ASSERT_FALSE(as2.read(a2, buf.data(), page(4)));
  ASSERT_EQ(d.refcount(5), 2u);
  EXPECT_EQ(d.owner->unmap_mapping_range(5, 2), 4u);  // pages 5 and 6 in both
  EXPECT_EQ(d.refcount(5), 0u);
  EXPECT_EQ(d.refcount(4), 2u);
  EXPECT_EQ(d.owner->unmap_mapping_range(0, 0), 8u);
  EXPECT_EQ(as1.nr_entries(), 0u);
  EXPECT_EQ(as2.nr_entries(), 0u);
  for (std::uint64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(d.refcount(i), 0u);
    EXPECT_EQ(d.mapcount(i), 0);
  }
  EXPECT_EQ(as1.nr_vmas(), 1u);
  const std::uint64_t before = d.owner->faults(Level::pte);
  std::uint8_t b = 0;
  ASSERT_FALSE(as2.read(a2 + page(1), &b, 1));
  EXPECT_EQ(d.owner->faults(Level::pte), before + 1);
  EXPECT_EQ(d.refcount(5), 1u);
}

// Device disabled under a mapping (ndctl device-dax S4, bug 5.14): after kill + unmap the next
// access gets SIGBUS BUS_ADRERR with si_addr; si_addr_lsb is 0 (Linux fills it only for
// BUS_MCEERR_*), whatever the size of the mapping that failed (issue 7 item 8).
TEST_F(AddressSpaceTest, KilledOwnerRaisesSigbus) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
  const std::uint64_t small = must_mmap(as, d, page(4), kRW, 6 * kMiB);
  std::uint8_t b = 0;
  ASSERT_FALSE(as.write(a + 5, &b, 1));
  d.owner->kill();
  EXPECT_EQ(d.owner->unmap_mapping_range(0, 0), 1u);
  SignalInfo s = as.read(a + kMiB + 3, &b, 1);
  EXPECT_EQ(s.signal, Signal::sigbus);
  EXPECT_EQ(s.addr, a + kMiB + 3);
  EXPECT_EQ(s.code, SigCode::bus_adrerr);
  EXPECT_EQ(s.addr_lsb, 0u);
  s = as.write(small + page(2), &b, 1);
  EXPECT_EQ(s.signal, Signal::sigbus);
  EXPECT_EQ(s.addr, small + page(2));
  EXPECT_EQ(s.code, SigCode::bus_adrerr);
  EXPECT_EQ(s.addr_lsb, 0u);
  EXPECT_FALSE(s.why.empty());
  EXPECT_EQ(d.refcount(0), 0u);
}

// ~AddressSpace (exit_mmap): every entry zapped, every VMA closed and unlinked.
TEST_F(AddressSpaceTest, DestructorDropsAllReferences) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  {
    AddressSpace as;
    const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
    const std::uint64_t b = must_mmap(as, d, page(8), kRW, 4 * kMiB);
    std::vector<std::uint8_t> buf(page(8));
    ASSERT_FALSE(as.read(a, buf.data(), 1));
    ASSERT_FALSE(as.read(a + 2 * kMiB, buf.data(), 1));
    ASSERT_FALSE(as.read(b, buf.data(), buf.size()));
    ASSERT_EQ(as.nr_entries(), 10u);
    ASSERT_EQ(d.refcount(1024), 8u);
  }
  for (std::uint64_t f = 0; f < 4; ++f) {
    EXPECT_EQ(d.refcount(f * 512), 0u);
    EXPECT_EQ(d.mapcount(f * 512), 0);
  }
  EXPECT_EQ(d.owner->nr_vmas(), 0u);
  EXPECT_EQ(d.owner->closed().size(), 2u);
}

// MAP_FIXED over an existing mapping replaces it (the old range is unmapped first).
TEST_F(AddressSpaceTest, MmapFixedReplacesExistingMapping) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  std::vector<std::uint8_t> buf(page(8));
  ASSERT_FALSE(as.read(a, buf.data(), buf.size()));
  auto r = as.mmap(a + page(2), page(2), kRW, kMapShared | kMapFixed, d.owner, page(50));
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(*r, a + page(2));
  EXPECT_EQ(as.nr_vmas(), 3u);
  EXPECT_EQ(as.find_vma(a + page(2))->pgoff, 50u);
  EXPECT_EQ(d.refcount(2), 0u);
  std::uint8_t b = 0;
  ASSERT_FALSE(as.read(a + page(2), &b, 1));
  EXPECT_EQ(as.lookup(a + page(2))->pfn, d.pfn(50));
}

}  // namespace
}  // namespace pgmap::mm
