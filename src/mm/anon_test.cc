// Copy-on-write of MAP_PRIVATE mappings into anonymous pages (AnonPool), at the mm level over a
// FakeOwner: first-write copy at 4 KiB and under a 2 MiB read mapping, invisibility both ways,
// fork write-protecting both sides, freeing at munmap, GUP FOLL_WRITE breaking COW first, mremap
// moving the copies, unmap_mapping_range (truncate) zapping them, and the owner's COW statistics.
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
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/anon_pool.h"
#include "pgmap/mm/gup.h"

namespace pgmap::mm {
namespace {

using testutil::FakeDevice;
using testutil::FakeOwner;
using testutil::make_fake_device;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kRW = kProtRead | kProtWrite;

std::uint64_t page(std::uint64_t n) {
  return n << kPageShift;
}

class AnonTest : public ::testing::Test {
 protected:
  void SetUp() override { in_use0_ = AnonPool::global().in_use(); }
  void TearDown() override {
    // Every address space is gone: every anonymous page went back to the pool and no device
    // folio is still referenced.
    EXPECT_EQ(AnonPool::global().in_use(), in_use0_);
    for (FakeDevice& d : devices_) {
      if (d.pgmap) {
        EXPECT_EQ(d.memunmap_refuse(), Errc::ok) << d.pgmap->holders().to_string();
      }
    }
  }

  // A device whose pages hold a known pattern (page i: byte j = i * 7 + j).
  FakeDevice& device(std::uint64_t bytes = 8 * kMiB, unsigned base_order = 0,
                     FakeOwner::Options opts = {}) {
    devices_.push_back(make_fake_device(bytes, base_order, std::move(opts)));
    FakeDevice& d = devices_.back();
    for (std::uint64_t i = 0; i < (bytes >> kPageShift); ++i) {
      for (std::uint64_t j = 0; j < kPageSize; ++j)
        d.bytes(i)[j] = static_cast<std::byte>((i * 7 + j) & 0xff);
    }
    return d;
  }
  static std::uint8_t dev_byte(std::uint64_t pg, std::uint64_t off) {
    return static_cast<std::uint8_t>((pg * 7 + off) & 0xff);
  }
  static std::uint8_t read_byte(AddressSpace& as, std::uint64_t addr) {
    std::uint8_t b = 0;
    EXPECT_FALSE(as.read(addr, &b, 1));
    return b;
  }
  static void write_byte(AddressSpace& as, std::uint64_t addr, std::uint8_t b) {
    EXPECT_FALSE(as.write(addr, &b, 1));
  }
  std::uint64_t anon_delta() const { return AnonPool::global().in_use() - in_use0_; }

  pgmap::testutil::MisuseCounter misuse_;
  std::deque<FakeDevice> devices_;
  std::uint64_t in_use0_ = 0;
};

// Writable MAP_PRIVATE is accepted now; a read maps the owner's page read-only, the first write
// copies that 4 KiB page into an anonymous page mapped writable, the owner's bytes stay.
TEST_F(AnonTest, FirstWriteCopiesPageIntoAnonymousPage) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(4), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a) << a.error().to_string();
  EXPECT_EQ(read_byte(as, *a + page(1) + 5), dev_byte(1, 5));
  auto ro = as.lookup(*a + page(1));
  ASSERT_TRUE(ro);
  EXPECT_FALSE(ro->writable);
  EXPECT_FALSE(ro->anon);
  EXPECT_EQ(ro->pfn, d.pfn(1));

  write_byte(as, *a + page(1) + 5, 0xAB);
  auto rw = as.lookup(*a + page(1));
  ASSERT_TRUE(rw);
  EXPECT_TRUE(rw->writable);
  EXPECT_TRUE(rw->anon);
  EXPECT_NE(rw->pfn, d.pfn(1));
  EXPECT_EQ(anon_delta(), 1u);
  // The copy holds the rest of the page's bytes and the written one; the owner keeps its bytes.
  EXPECT_EQ(read_byte(as, *a + page(1) + 5), 0xAB);
  EXPECT_EQ(read_byte(as, *a + page(1) + 6), dev_byte(1, 6));
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(1)[5]), dev_byte(1, 5));
  // The owner's folio is no longer mapped by this address space.
  EXPECT_EQ(d.mapcount(1), 0);
  EXPECT_EQ(d.refcount(1), 0u);
  const CowStats st = d.owner->cow_stats();
  EXPECT_EQ(st.file_copies, 1u);
  EXPECT_EQ(st.pmd_splits, 0u);
  // A write to a page never read copies too (no entry: do_cow_fault).
  write_byte(as, *a + page(2), 0x11);
  EXPECT_TRUE(as.lookup(*a + page(2))->anon);
  EXPECT_EQ(d.owner->cow_stats().file_copies, 2u);
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(2)[0]), dev_byte(2, 0));
}

// Owner changes after the copy are not seen through the copied page, but are through pages not
// yet copied (Linux semantics of MAP_PRIVATE).
TEST_F(AnonTest, OwnerWritesVisibleOnlyThroughUncopiedPages) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(2), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(as, *a, 0x55);
  EXPECT_EQ(read_byte(as, *a + page(1)), dev_byte(1, 0));
  d.bytes(0)[1] = std::byte{0xEE};
  d.bytes(1)[0] = std::byte{0xEE};
  EXPECT_EQ(read_byte(as, *a + 1), dev_byte(0, 1));  // copied: the old bytes
  EXPECT_EQ(read_byte(as, *a + page(1)), 0xEE);      // not copied: the owner's page
  // A shared mapping of the same owner sees the owner's bytes, never the private copy.
  AddressSpace other;
  auto s = other.mmap(0, page(2), kRW, kMapShared, d.owner, 0);
  ASSERT_TRUE(s);
  EXPECT_EQ(read_byte(other, *s), dev_byte(0, 0));
}

// A write under a 2 MiB read-only mapping splits it: only the written 4 KiB page becomes
// anonymous, the rest of the range refaults as 4 KiB owner pages.
TEST_F(AnonTest, WriteUnderPmdReadSplitsAndCopiesOnePage) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  auto a = as.mmap(0, kPmdSize, kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(read_byte(as, *a + page(3)), dev_byte(3, 0));
  auto huge = as.lookup(*a);
  ASSERT_TRUE(huge);
  EXPECT_EQ(huge->level, Level::pmd);
  EXPECT_FALSE(huge->writable);

  write_byte(as, *a + page(3) + 9, 0x77);
  auto w = as.lookup(*a + page(3));
  ASSERT_TRUE(w);
  EXPECT_EQ(w->level, Level::pte);
  EXPECT_TRUE(w->anon);
  EXPECT_TRUE(w->writable);
  EXPECT_EQ(anon_delta(), 1u);
  EXPECT_EQ(d.owner->cow_stats().pmd_splits, 1u);
  EXPECT_EQ(d.owner->cow_stats().file_copies, 1u);
  // Neighbours: the owner's bytes through 4 KiB read-only entries.
  EXPECT_EQ(read_byte(as, *a + page(4) + 1), dev_byte(4, 1));
  auto n = as.lookup(*a + page(4));
  ASSERT_TRUE(n);
  EXPECT_EQ(n->level, Level::pte);
  EXPECT_FALSE(n->anon);
  EXPECT_FALSE(n->writable);
  EXPECT_EQ(read_byte(as, *a + page(3) + 9), 0x77);
  EXPECT_EQ(read_byte(as, *a + page(3) + 10), dev_byte(3, 10));
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(3)[9]), dev_byte(3, 9));
}

// munmap and address-space destruction free the anonymous pages (counted by the pool).
TEST_F(AnonTest, MunmapAndExitFreeAnonymousPages) {
  FakeDevice& d = device();
  {
    AddressSpace as;
    auto a = as.mmap(0, page(8), kRW, kMapPrivate, d.owner, 0);
    ASSERT_TRUE(a);
    for (std::uint64_t i = 0; i < 8; ++i)
      write_byte(as, *a + page(i), static_cast<std::uint8_t>(i));
    EXPECT_EQ(anon_delta(), 8u);
    ASSERT_EQ(as.munmap(*a, page(3)), Errc::ok);
    EXPECT_EQ(anon_delta(), 5u);
    EXPECT_EQ(read_byte(as, *a + page(5)), 5);
  }
  EXPECT_EQ(anon_delta(), 0u);  // exit
}

// fork copies the private page table and write-protects both sides; each side's write copies,
// the other keeps the old bytes; the last sharer writes in place (reuse).
TEST_F(AnonTest, ForkWriteProtectsBothSidesAndEachWriteCopies) {
  FakeDevice& d = device();
  AddressSpace parent;
  auto a = parent.mmap(0, page(4), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(parent, *a, 0x10);                                // anonymous copy
  EXPECT_EQ(read_byte(parent, *a + page(1)), dev_byte(1, 0));  // owner page, read-only
  auto before = parent.lookup(*a);
  ASSERT_TRUE(before && before->anon && before->writable);

  std::unique_ptr<AddressSpace> child = parent.fork();
  auto p0 = parent.lookup(*a);
  auto c0 = child->lookup(*a);
  ASSERT_TRUE(p0 && c0);
  EXPECT_FALSE(p0->writable);
  EXPECT_FALSE(c0->writable);
  EXPECT_EQ(p0->pfn, c0->pfn);  // one page, shared
  EXPECT_TRUE(c0->anon);
  EXPECT_EQ(p0->pgmap->folio_ref_count(p0->pfn), 2u);
  auto c1 = child->lookup(*a + page(1));  // the owner page is copied too, read-only
  ASSERT_TRUE(c1);
  EXPECT_FALSE(c1->anon);
  EXPECT_FALSE(c1->writable);
  EXPECT_EQ(d.mapcount(1), 2);
  EXPECT_EQ(anon_delta(), 1u);

  write_byte(*child, *a, 0x20);  // the child copies
  EXPECT_EQ(anon_delta(), 2u);
  EXPECT_EQ(read_byte(parent, *a), 0x10);
  EXPECT_EQ(read_byte(*child, *a), 0x20);
  EXPECT_EQ(d.owner->cow_stats().anon_copies, 1u);
  EXPECT_NE(child->lookup(*a)->pfn, p0->pfn);

  write_byte(parent, *a, 0x30);  // the parent is the last user: in place
  EXPECT_EQ(anon_delta(), 2u);
  EXPECT_EQ(parent.lookup(*a)->pfn, p0->pfn);
  EXPECT_EQ(d.owner->cow_stats().anon_reuses, 1u);
  EXPECT_EQ(read_byte(*child, *a), 0x20);

  // A write to the shared owner page in the parent copies in the parent only.
  write_byte(parent, *a + page(1), 0x40);
  EXPECT_EQ(read_byte(*child, *a + page(1)), dev_byte(1, 0));
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(1)[0]), dev_byte(1, 0));
  child.reset();
  EXPECT_EQ(anon_delta(), 2u);  // the parent's two copies
}

// The reverse order: the parent writes first after fork, the child keeps the old bytes.
TEST_F(AnonTest, ForkParentWriteLeavesChildWithOldBytes) {
  FakeDevice& d = device();
  AddressSpace parent;
  auto a = parent.mmap(0, page(1), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(parent, *a, 0x01);
  std::unique_ptr<AddressSpace> child = parent.fork();
  write_byte(parent, *a, 0x02);
  EXPECT_EQ(read_byte(*child, *a), 0x01);
  EXPECT_EQ(read_byte(parent, *a), 0x02);
  write_byte(*child, *a, 0x03);  // now alone: reuse
  EXPECT_EQ(d.owner->cow_stats().anon_copies, 1u);
  EXPECT_EQ(d.owner->cow_stats().anon_reuses, 1u);
  EXPECT_EQ(read_byte(parent, *a), 0x02);
}

// Shared mappings stay shared across fork: no entry is copied, writes are seen by both.
TEST_F(AnonTest, ForkKeepsSharedMappingsShared) {
  FakeDevice& d = device();
  AddressSpace parent;
  auto a = parent.mmap(0, page(1), kRW, kMapShared, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(parent, *a, 0x61);
  std::unique_ptr<AddressSpace> child = parent.fork();
  EXPECT_FALSE(child->lookup(*a));
  EXPECT_TRUE(parent.lookup(*a)->writable);
  write_byte(*child, *a, 0x62);
  EXPECT_EQ(read_byte(parent, *a), 0x62);
  EXPECT_EQ(anon_delta(), 0u);
}

// GUP with FOLL_WRITE on a private mapping breaks COW first: the pin is on the anonymous page,
// and the owner's page is neither pinned nor written.
TEST_F(AnonTest, GupWriteOnPrivateMappingPinsAnonymousCopy) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(2), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(read_byte(as, *a), dev_byte(0, 0));  // read-only owner page first
  auto pins = pin_user_pages(as, *a, 2, kFollWrite);
  ASSERT_TRUE(pins) << pins.error().to_string();
  ASSERT_EQ(pins->size(), 2u);
  for (const GupPage& p : *pins) {
    EXPECT_TRUE(AnonPool::is_anon(p.pgmap));
    EXPECT_TRUE(p.pgmap->folio_maybe_dma_pinned(p.pfn));
  }
  EXPECT_EQ(d.refcount(0), 0u);
  EXPECT_EQ(d.refcount(1), 0u);
  EXPECT_EQ(d.owner->cow_stats().file_copies, 2u);
  // DMA into the pinned page is what the process reads.
  (*pins)[0].pgmap->address_of((*pins)[0].pfn)[0] = std::byte{0x99};
  EXPECT_EQ(read_byte(as, *a), 0x99);
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(0)[0]), dev_byte(0, 0));
  // The pinned page survives munmap until unpinned.
  ASSERT_EQ(as.munmap(*a, page(2)), Errc::ok);
  EXPECT_EQ(anon_delta(), 2u);
  EXPECT_EQ(pins->release(), Errc::ok);
  EXPECT_EQ(anon_delta(), 0u);
}

// A read pin (no FOLL_WRITE) of a private mapping pins the owner's page (no copy).
TEST_F(AnonTest, GupReadOnPrivateMappingPinsOwnerPage) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(1), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  auto refs = get_user_pages(as, *a, 1, 0);
  ASSERT_TRUE(refs) << refs.error().to_string();
  EXPECT_EQ((*refs)[0].pfn, d.pfn(0));
  EXPECT_EQ(anon_delta(), 0u);
}

// fork of a pinned anonymous page: the child gets its own copy at once, the parent keeps the
// pinned page writable, so DMA keeps landing where the parent reads it.
TEST_F(AnonTest, ForkCopiesPinnedAnonymousPageForChild) {
  FakeDevice& d = device();
  AddressSpace parent;
  auto a = parent.mmap(0, page(1), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  auto pins = pin_user_pages(parent, *a, 1, kFollWrite);
  ASSERT_TRUE(pins) << pins.error().to_string();
  std::unique_ptr<AddressSpace> child = parent.fork();
  auto p = parent.lookup(*a);
  auto c = child->lookup(*a);
  ASSERT_TRUE(p && c);
  EXPECT_TRUE(p->writable);
  EXPECT_EQ(p->pfn, (*pins)[0].pfn);
  EXPECT_NE(c->pfn, p->pfn);
  EXPECT_TRUE(c->anon);
  EXPECT_EQ(d.owner->cow_stats().fork_copies, 1u);
  (*pins)[0].pgmap->address_of((*pins)[0].pfn)[0] = std::byte{0x42};
  EXPECT_EQ(read_byte(parent, *a), 0x42);
  EXPECT_EQ(read_byte(*child, *a), dev_byte(0, 0));
  EXPECT_EQ(pins->release(), Errc::ok);
}

// mremap moves anonymous copies with the VMA (they are the only copy of their bytes).
TEST_F(AnonTest, MremapMovesAnonymousPages) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(4), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(as, *a + page(2), 0x5A);
  auto b = as.mremap(*a, page(4), page(4), kMremapMayMove | kMremapFixed, *a + 64 * kMiB);
  ASSERT_TRUE(b) << b.error().to_string();
  EXPECT_EQ(read_byte(as, *b + page(2)), 0x5A);
  EXPECT_EQ(read_byte(as, *b + page(1)), dev_byte(1, 0));
  EXPECT_EQ(anon_delta(), 1u);
}

// unmap_mapping_range (what truncate and device removal call) zaps the private copies too:
// Linux's truncate uses even_cows. The next access reads the owner's current bytes.
TEST_F(AnonTest, UnmapMappingRangeZapsAnonymousCopies) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(4), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(as, *a + page(1), 0x33);
  write_byte(as, *a + page(3), 0x34);
  EXPECT_EQ(d.owner->unmap_mapping_range(3, 1), 1u);
  EXPECT_EQ(anon_delta(), 1u);
  EXPECT_EQ(read_byte(as, *a + page(3)), dev_byte(3, 0));
  EXPECT_EQ(read_byte(as, *a + page(1)), 0x33);
}

// even_cows false (invalidating the owner's pages only): the private copies stay, the owner
// pages of the range are zapped.
TEST_F(AnonTest, UnmapMappingRangeWithoutEvenCowsKeepsAnonymousCopies) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(2), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  write_byte(as, *a, 0x35);
  EXPECT_EQ(read_byte(as, *a + page(1)), dev_byte(1, 0));
  EXPECT_EQ(d.owner->unmap_mapping_range(0, 2, /*even_cows=*/false), 1u);
  EXPECT_FALSE(as.lookup(*a + page(1)));
  ASSERT_TRUE(as.lookup(*a));
  EXPECT_TRUE(as.lookup(*a)->anon);
  EXPECT_EQ(read_byte(as, *a), 0x35);
  EXPECT_EQ(anon_delta(), 1u);
}

// A private mapping made writable by mprotect copies on write (it used to be refused).
TEST_F(AnonTest, MprotectPrivateToWritableCopiesOnWrite) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(2), kProtRead, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(read_byte(as, *a), dev_byte(0, 0));
  std::uint8_t b = 1;
  EXPECT_EQ(as.write(*a, &b, 1).code, SigCode::segv_accerr);
  ASSERT_EQ(as.mprotect(*a, page(2), kRW), Errc::ok);
  write_byte(as, *a, 0x7E);
  EXPECT_EQ(read_byte(as, *a), 0x7E);
  EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(0)[0]), dev_byte(0, 0));
}

// Concurrent writers on the pages of a private mapping, readers and a fork: every page ends up
// with exactly the last value its writer wrote, the owner is never written, nothing leaks.
TEST_F(AnonTest, ConcurrentCowFaultsAndFork) {
  FakeDevice& d = device();
  AddressSpace as;
  constexpr std::uint64_t kPages = 64;
  auto a = as.mmap(0, page(kPages), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a);
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (unsigned t = 0; t < 2; ++t) {
    writers.emplace_back([&, t] {
      for (unsigned round = 0; round < 20; ++round) {
        for (std::uint64_t i = t; i < kPages; i += 2) {
          const auto v = static_cast<std::uint8_t>(round + 1);
          EXPECT_FALSE(as.write(*a + page(i), &v, 1));
        }
      }
    });
  }
  std::thread forker([&] {
    while (!stop.load()) {
      // The child only looks at its entries: reading bytes a writer may be storing into at the
      // instant of the fork would be a data race of the simulated program itself.
      std::unique_ptr<AddressSpace> child = as.fork();
      if (auto e = child->lookup(*a)) {
        EXPECT_FALSE(e->writable);
      }
    }
  });
  for (auto& w : writers)
    w.join();
  stop = true;
  forker.join();
  for (std::uint64_t i = 0; i < kPages; ++i)
    EXPECT_EQ(read_byte(as, *a + page(i)), 20) << i;
  for (std::uint64_t i = 0; i < kPages; ++i)
    EXPECT_EQ(static_cast<std::uint8_t>(d.bytes(i)[0]), dev_byte(i, 0));
  EXPECT_EQ(anon_delta(), kPages);
}

}  // namespace
}  // namespace pgmap::mm
