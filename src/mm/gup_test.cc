#include "pgmap/mm/gup.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "mm/testing/fake_owner.h"
#include "pgmap/core/error.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/anon_pool.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {
namespace {

using namespace std::chrono_literals;
using testutil::FakeDevice;
using testutil::FakeOwner;
using testutil::make_fake_device;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kRW = kProtRead | kProtWrite;
constexpr std::uint32_t kBias = PageArray::kPinBias;

std::uint64_t page(std::uint64_t n) {
  return n << kPageShift;
}

class GupTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (FakeDevice& d : devices_) {
      if (d.pgmap) {
        EXPECT_EQ(d.memunmap_refuse(), Errc::ok) << d.pgmap->holders().to_string();
      }
    }
  }

  FakeDevice& device(std::uint64_t bytes = 8 * kMiB, unsigned base_order = 0,
                     FakeOwner::Options opts = {}, PagemapType type = PagemapType::fs_dax) {
    devices_.push_back(make_fake_device(bytes, base_order, std::move(opts), type));
    return devices_.back();
  }

  static std::uint64_t must_mmap(AddressSpace& as, const FakeDevice& d, std::uint64_t len,
                                 std::uint32_t prot = kRW, std::uint64_t offset = 0) {
    auto r = as.mmap(0, len, prot, kMapShared, d.owner, offset);
    EXPECT_TRUE(r) << r.error().to_string();
    return r ? *r : 0;
  }

  // Faults [addr, addr + len) in for reading.
  static void prefault(AddressSpace& as, std::uint64_t addr, std::uint64_t pages) {
    for (std::uint64_t i = 0; i < pages; ++i) {
      ASSERT_FALSE(as.handle_fault(addr + page(i), false)) << i;
    }
  }

  static ReferencedPages must_get(AddressSpace& as, std::uint64_t start, std::uint64_t n,
                                  std::uint32_t flags, GupStats* st = nullptr) {
    auto r = get_user_pages(as, start, n, flags, st);
    EXPECT_TRUE(r) << r.error().to_string();
    return r ? std::move(r).value() : ReferencedPages{};
  }
  static PinnedPages must_pin(AddressSpace& as, std::uint64_t start, std::uint64_t n,
                              std::uint32_t flags, GupStats* st = nullptr) {
    auto r = pin_user_pages(as, start, n, flags, st);
    EXPECT_TRUE(r) << r.error().to_string();
    return r ? std::move(r).value() : PinnedPages{};
  }
  // get_user_pages or pin_user_pages (kFollPin in flags): the error of a call expected to fail.
  static Error must_fail(AddressSpace& as, std::uint64_t start, std::uint64_t n,
                         std::uint32_t flags, GupStats* st = nullptr) {
    if ((flags & kFollPin) != 0) {
      auto r = pin_user_pages(as, start, n, flags & ~std::uint32_t{kFollPin}, st);
      EXPECT_FALSE(r);
      return r ? Error(Errc::ok, "unexpected success") : r.error();
    }
    auto r = get_user_pages(as, start, n, flags, st);
    EXPECT_FALSE(r);
    return r ? Error(Errc::ok, "unexpected success") : r.error();
  }

  pgmap::testutil::MisuseCounter misuse_;
  std::deque<FakeDevice> devices_;  // stable references
};

// Counters of a set of pages, to check that a failed call changed nothing.
struct Snapshot {
  std::vector<std::uint32_t> ref;
  std::vector<std::int32_t> map;
  std::vector<std::uint32_t> pin;
  std::int64_t pagemap_refs = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const FakeDevice& d, std::uint64_t pages) {
  Snapshot s;
  for (std::uint64_t i = 0; i < pages; ++i) {
    s.ref.push_back(d.refcount(i));
    s.map.push_back(d.mapcount(i));
    s.pin.push_back(d.pincount(i));
  }
  s.pagemap_refs = d.pgmap->holders().pagemap_refs;
  return s;
}

// T9 / §2.1: FOLL_GET adds one reference per page on small folios; put_pages drops them.
TEST_F(GupTest, GetAddsOneReferencePerPage) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 8);
  GupStats st;
  auto pages = must_get(as, a + page(2), 4, 0, &st);
  ASSERT_EQ(pages.size(), 4u);
  for (std::uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(pages[i].pfn, d.pfn(2 + i));
    EXPECT_EQ(pages[i].pgmap, d.pgmap.get());
    EXPECT_EQ(d.refcount(2 + i), 2u);
    EXPECT_FALSE(d.pgmap->folio_maybe_dma_pinned(d.pfn(2 + i)));
  }
  EXPECT_EQ(d.refcount(1), 1u);
  EXPECT_EQ(st.folio_atomics, 4u);
  EXPECT_EQ(put_pages(pages), Errc::ok);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(d.refcount(i), 1u);
}

// T9 / FOLL_PIN (John Hubbard, "track FOLL_PIN pages"): +GUP_PIN_COUNTING_BIAS on a small folio;
// folio_maybe_dma_pinned; unpin drops the bias.
TEST_F(GupTest, PinUsesBiasOnSmallFolios) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  prefault(as, a, 4);  // read-only entries: FOLL_WRITE write-faults them writable first
  auto rw = pin_user_pages(as, a, 4, kFollWrite);
  ASSERT_TRUE(rw) << rw.error().to_string();
  for (std::uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(d.refcount(i), 1 + kBias);
    EXPECT_TRUE(d.pgmap->folio_maybe_dma_pinned(d.pfn(i)));
    EXPECT_EQ(d.pincount(i), 0u);  // small folios use the bias, not the exact count
    EXPECT_TRUE(as.lookup(a + page(i))->writable);
  }
  EXPECT_EQ(unpin_user_pages(*rw), Errc::ok);
  for (std::uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(d.refcount(i), 1u);
    EXPECT_FALSE(d.pgmap->folio_maybe_dma_pinned(d.pfn(i)));
  }
}

// T9 / exact _pincount on large folios, batched (Joao Martins' compound-devmap GUP): 512 pages
// of one PMD-mapped 2 MiB folio get ONE refcount operation: +512 refs, pincount 512.
TEST_F(GupTest, PinOfPmdFolioIsOneAtomicWithExactPincount) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(8 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
  prefault(as, a, 1);
  ASSERT_EQ(as.lookup(a)->level, Level::pmd);
  GupStats st;
  auto pages = must_pin(as, a, 512, 0, &st);
  ASSERT_EQ(pages.size(), 512u);
  EXPECT_EQ(pages[511].pfn, d.pfn(511));
  EXPECT_EQ(st.folio_atomics, 1u);
  EXPECT_EQ(st.fast, 512u);
  EXPECT_EQ(d.refcount(0), 1u + 512u);
  EXPECT_EQ(d.pincount(0), 512u);
  EXPECT_TRUE(d.pgmap->folio_maybe_dma_pinned(d.pfn(0)));
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.pincount(0), 0u);
  EXPECT_FALSE(d.pgmap->folio_maybe_dma_pinned(d.pfn(0)));
}

// FOLL_GET on a PTE-mapped large folio: one operation for the run of pages of the folio, across
// PTEs; a range over two folios costs two.
TEST_F(GupTest, GetBatchesPerFolioAcrossPtes) {
  FakeDevice& d = device(8 * kMiB, kPmdOrder);  // max_level pte: PTEs of 2 MiB folios
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
  prefault(as, a + page(500), 24);
  GupStats st;
  auto pages = must_get(as, a + page(500), 24, 0, &st);
  EXPECT_EQ(st.folio_atomics, 2u);
  EXPECT_EQ(d.refcount(0), 12u + 12u);  // 12 mappings + 12 references
  EXPECT_EQ(d.refcount(512), 12u + 12u);
  EXPECT_EQ(put_pages(pages), Errc::ok);
  EXPECT_EQ(d.refcount(0), 12u);
  EXPECT_EQ(d.refcount(512), 12u);
}

// S2 case 0 (O_DIRECT read into an unfaulted DAX address): GUP takes the slow path and faults the
// pages in.
TEST_F(GupTest, PinOfUnfaultedPagesTakesSlowPathAndFaults) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  GupStats st;
  auto pages = must_pin(as, a, 8, kFollWrite, &st);
  ASSERT_EQ(pages.size(), 8u);
  EXPECT_EQ(st.slow, 8u);
  EXPECT_EQ(st.fast, 0u);
  EXPECT_EQ(as.nr_entries(), 8u);
  EXPECT_EQ(d.refcount(3), 1 + kBias);
  EXPECT_EQ(d.owner->faults(Level::pte), 8u);
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
}

// S2 case 1 (O_DIRECT on a pre-faulted address): all pages resolved by the lockless walk.
TEST_F(GupTest, PinOfPrefaultedPagesTakesFastPath) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 8);
  GupStats st;
  auto pages = must_pin(as, a, 8, 0, &st);
  EXPECT_EQ(st.fast, 8u);
  EXPECT_EQ(st.slow, 0u);
  EXPECT_EQ(d.owner->faults(Level::pte), 8u);  // only the prefault's
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
  auto fast_only = pin_user_pages(as, a + page(7), 1, kFollFastOnly);
  ASSERT_TRUE(fast_only);
  EXPECT_EQ(unpin_user_pages(*fast_only), Errc::ok);
}

// kFollFastOnly (get_user_pages_fast_only) on unfaulted pages fails without faulting.
TEST_F(GupTest, FastOnlyFailsWhereSlowPathIsNeeded) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 2);
  const Snapshot before = snapshot(d, 8);
  auto r = pin_user_pages(as, a, 4, kFollFastOnly);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::busy);
  EXPECT_EQ(snapshot(d, 8), before);
  EXPECT_EQ(as.nr_entries(), 2u);
}

// FOLL_WRITE on a read-only VMA fails as the write fault would (SIGSEGV, -EFAULT in the kernel).
TEST_F(GupTest, WriteOnReadOnlyVmaFails) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4), kProtRead);
  prefault(as, a, 4);
  const Snapshot before = snapshot(d, 4);
  auto r = pin_user_pages(as, a, 4, kFollWrite);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::out_of_range);
  EXPECT_NE(r.error().message().find("SIGSEGV"), std::string::npos) << r.error().message();
  EXPECT_EQ(snapshot(d, 4), before);
  auto ro = pin_user_pages(as, a, 4, 0);  // reading is fine
  ASSERT_TRUE(ro);
  EXPECT_EQ(unpin_user_pages(*ro), Errc::ok);
}

// T9 / I9 / bug 5.2: FOLL_LONGTERM is refused on fsdax VMAs, faulted or not, and nothing is
// taken; a long-term pin needs FOLL_PIN.
TEST_F(GupTest, LongtermRefusedOnFsdax) {
  FakeOwner::Options o;
  o.vma_flags = kVmDax | kVmFsDax;
  FakeDevice& d = device(8 * kMiB, 0, o, PagemapType::fs_dax);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 4);  // pages 0-3 mapped: the fast path must not grant it either
  const Snapshot before = snapshot(d, 8);
  for (std::uint64_t at : {a, a + page(5)}) {
    auto r = pin_user_pages(as, at, 2, kFollLongterm);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), Errc::not_supported);
  }
  EXPECT_EQ(snapshot(d, 8), before);
  auto bad = get_user_pages(as, a, 1, kFollLongterm);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.code(), Errc::invalid_argument);
  auto transient = pin_user_pages(as, a, 2, 0);  // transient pins are fine (I9)
  ASSERT_TRUE(transient);
  EXPECT_EQ(unpin_user_pages(*transient), Errc::ok);
}

// The same for 1-page calls (their own lockless walk): FOLL_LONGTERM of one mapped fsdax page is
// refused with Errc::not_supported and nothing is taken, by the _into form too.
TEST_F(GupTest, LongtermRefusedOnFsdaxOnePage) {
  FakeOwner::Options o;
  o.vma_flags = kVmDax | kVmFsDax;
  FakeDevice& d = device(8 * kMiB, 0, o, PagemapType::fs_dax);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(2));
  prefault(as, a, 2);
  const Snapshot before = snapshot(d, 2);
  auto r = pin_user_pages(as, a, 1, kFollLongterm | kFollWrite);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::not_supported);
  PinnedPages into;
  EXPECT_EQ(pin_user_pages_into(into, as, a + page(1), 1, kFollLongterm), Errc::not_supported);
  EXPECT_TRUE(into.empty());
  EXPECT_EQ(snapshot(d, 2), before);
}

// FOLL_WRITE of one page of a private mapping breaks COW first: the pin is on the anonymous copy,
// the owner's page is neither pinned nor referenced by the call.
TEST_F(GupTest, OnePageWritePinOfPrivateMappingPinsTheCopy) {
  FakeDevice& d = device();
  AddressSpace as;
  auto a = as.mmap(0, page(2), kRW, kMapPrivate, d.owner, 0);
  ASSERT_TRUE(a) << a.error().to_string();
  ASSERT_FALSE(as.handle_fault(*a, false));  // the owner's page, mapped read-only
  EXPECT_EQ(d.refcount(0), 1u);
  auto pin = must_pin(as, *a, 1, kFollWrite);
  ASSERT_EQ(pin.size(), 1u);
  EXPECT_TRUE(AnonPool::is_anon(pin[0].pgmap));
  EXPECT_TRUE(pin[0].pgmap->folio_maybe_dma_pinned(pin[0].pfn));
  EXPECT_EQ(d.refcount(0), 0u);  // the copy replaced the owner's page in the entry
  EXPECT_EQ(unpin_user_pages(pin), Errc::ok);
  ASSERT_EQ(as.munmap(*a, page(2)), Errc::ok);
}

// T9: FOLL_LONGTERM is allowed on device-dax (RDMA on /dev/dax).
TEST_F(GupTest, LongtermAllowedOnDevdax) {
  FakeDevice& d = device(8 * kMiB, 0, {}, PagemapType::generic);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 4);
  auto r = pin_user_pages(as, a, 8, kFollLongterm | kFollWrite);
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(d.refcount(6), 1 + kBias);
  EXPECT_EQ(unpin_user_pages(*r), Errc::ok);
}

// GUP of an address with no VMA fails (-EFAULT) and changes nothing.
TEST_F(GupTest, PinOfUnmappedAddressFailsAndChangesNothing) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  prefault(as, a, 4);
  const Snapshot before = snapshot(d, 4);
  auto r = pin_user_pages(as, a + page(64), 1, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::out_of_range);
  r = pin_user_pages(as, a + 1, 1, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::invalid_argument);
  EXPECT_EQ(snapshot(d, 4), before);
}

// Issue 7 item 10: a GUP result knows what it holds. put_pages() on pinned pages used to return
// OK and turn each pin (1024 on a small folio) into a leaked plain reference. Now unpinning a
// referenced set or putting a pinned set does not compile, and each set releases exactly what it
// holds: explicitly (release(), with its status), through the kernel-shaped call, or on
// destruction; a moved-from set holds nothing.
template <typename Set>
concept CanUnpin = requires(Set& s) {
  unpin_user_pages(s);
};
template <typename Set>
concept CanPut = requires(Set& s) {
  put_pages(s);
};
static_assert(CanUnpin<PinnedPages> && !CanUnpin<ReferencedPages>);
static_assert(CanPut<ReferencedPages> && !CanPut<PinnedPages>);
static_assert(!std::is_copy_constructible_v<PinnedPages> &&
              std::is_nothrow_move_constructible_v<PinnedPages>);

TEST_F(GupTest, PageSetsReleaseExactlyWhatTheyHold) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& small = device();
  FakeDevice& large = device(4 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, small, page(4));
  const std::uint64_t b = must_mmap(as, large, 2 * kMiB);
  prefault(as, a, 4);
  prefault(as, b, 1);
  {
    PinnedPages pins = must_pin(as, a, 4, 0);
    PinnedPages pins_large = must_pin(as, b, 4, 0);
    ReferencedPages refs = must_get(as, a, 4, 0);
    EXPECT_EQ(small.refcount(0), 1 + kBias + 1);
    EXPECT_EQ(large.refcount(0), 1u + 4u);
    EXPECT_EQ(large.pincount(0), 4u);
    EXPECT_EQ(pins.release(), Errc::ok);  // explicit, with its status
    EXPECT_TRUE(pins.empty());
    EXPECT_EQ(pins.release(), Errc::ok);  // an empty set releases nothing
    EXPECT_EQ(small.refcount(0), 2u);     // the reference set is untouched
    PinnedPages moved = std::move(pins_large);
    EXPECT_TRUE(pins_large.empty());  // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_EQ(large.pincount(0), 4u);
    EXPECT_EQ(put_pages(refs), Errc::ok);
    EXPECT_EQ(small.refcount(0), 1u);
    // `moved` is released by its destructor.
  }
  EXPECT_EQ(large.refcount(0), 1u);
  EXPECT_EQ(large.pincount(0), 0u);
  for (std::uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(small.refcount(i), 1u);
    EXPECT_FALSE(small.pgmap->folio_maybe_dma_pinned(small.pfn(i)));
  }
  // get_user_pages does not hand out pins: FOLL_PIN there is a typed error, nothing taken.
  const Snapshot before = snapshot(small, 4);
  auto r = get_user_pages(as, a, 4, kFollPin);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::invalid_argument);
  EXPECT_EQ(snapshot(small, 4), before);
  // The `_into` forms fill an empty set only, and reuse its storage.
  PinnedPages reuse;
  ASSERT_EQ(pin_user_pages_into(reuse, as, a, 4, 0), Errc::ok);
  EXPECT_EQ(pin_user_pages_into(reuse, as, a, 4, 0), Errc::invalid_argument);
  EXPECT_EQ(small.refcount(1), 1 + kBias);  // the refused call took nothing
  const GupPage* storage = reuse.pages().data();
  EXPECT_EQ(reuse.release(), Errc::ok);
  ASSERT_EQ(pin_user_pages_into(reuse, as, a, 3, 0), Errc::ok);
  EXPECT_EQ(reuse.pages().data(), storage);
  EXPECT_EQ(reuse.size(), 3u);
  EXPECT_EQ(unpin_user_pages(reuse), Errc::ok);
  EXPECT_EQ(small.refcount(1), 1u);
}

// GUP ranges that would wrap (start + nr_pages * 4 KiB past 2^64) or pass the task size are
// refused and take nothing.
TEST_F(GupTest, RangesThatWrapAreRefused) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  prefault(as, a, 4);
  const Snapshot before = snapshot(d, 4);
  for (std::uint64_t n : {~std::uint64_t{0}, (~std::uint64_t{0} >> kPageShift) + 1,
                          AddressSpace::kTaskSize >> kPageShift}) {
    EXPECT_EQ(must_fail(as, a, n, kFollPin).code(), Errc::out_of_range) << n;
    EXPECT_EQ(must_fail(as, a, n, 0).code(), Errc::out_of_range) << n;
  }
  EXPECT_EQ(snapshot(d, 4), before);
}

// Bug 5.12 (put_dev_pagemap missed when try_grab_page failed in __gup_device_huge): the 3rd page
// of 5 cannot be had (a hole in the owner): every reference the call took, and its cached
// pagemap reference, are given back.
TEST_F(GupTest, Bug512FailureMidwayLeaksNothingHole) {
  FakeDevice& d = device();
  d.owner->add_hole(2);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 2);
  prefault(as, a + page(3), 2);
  for (std::uint32_t flags : {0u, std::uint32_t{kFollPin}, kFollPin | kFollWrite}) {
    const Snapshot before = snapshot(d, 8);
    Error r = must_fail(as, a, 5, flags);
    EXPECT_EQ(r.code(), Errc::dead);  // SIGBUS from the owner
    EXPECT_NE(r.message().find("SIGBUS"), std::string::npos) << r.message();
    EXPECT_EQ(snapshot(d, 8), before) << "flags " << flags;
  }
}

// Bug 5.12 with a killed owner (device disabled between the pages) and 2 MiB folios: the run of
// the first folio is undone and no pagemap reference leaks (the refusing memunmap in TearDown
// succeeds once the address space is gone).
TEST_F(GupTest, Bug512FailureMidwayLeaksNothingKilledOwner) {
  FakeDevice& d = device(8 * kMiB, kPmdOrder);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 4 * kMiB);
  // Pages 510 and 511 of folio 0 are mapped; 512 (first of folio 1) is not.
  prefault(as, a + page(510), 2);
  d.owner->kill();
  for (std::uint32_t flags : {0u, std::uint32_t{kFollPin}}) {
    const Snapshot before = snapshot(d, 1024);
    GupStats st;
    Error r = must_fail(as, a + page(510), 5, flags, &st);
    EXPECT_EQ(r.code(), Errc::dead);
    EXPECT_EQ(st.folio_atomics, 1u);  // the first run was taken, then undone
    EXPECT_EQ(snapshot(d, 1024), before);
    EXPECT_EQ(d.pincount(0), 0u);
  }
}

// The cached pagemap lookup (get_dev_pagemap with `cached`, 1.04 s -> 0.38 s for 12 GiB):
// pinning 1024 consecutive pages of one pagemap looks it up once, not per page.
TEST_F(GupTest, PagemapLookupIsCachedAcrossTheWalk) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(1024));
  prefault(as, a, 1024);
  GupStats st;
  auto pages = must_pin(as, a, 1024, 0, &st);
  ASSERT_EQ(pages.size(), 1024u);
  EXPECT_LE(st.pagemap_lookups, 2u);
  EXPECT_EQ(st.fast, 1024u);
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
}

// ---- the batched walk under every strategy (DevPagemap::pin_folios / unpin_folios)
// ---------------

class GupStrategyTest : public GupTest, public ::testing::WithParamInterface<Strategy> {
 protected:
  FakeDevice& strategy_device(std::uint64_t bytes = 8 * kMiB, unsigned base_order = 0) {
    devices_.push_back(make_fake_device(bytes, base_order, {}, PagemapType::fs_dax, GetParam()));
    return devices_.back();
  }
  static void poison(const FakeDevice& d, std::uint64_t pgoff) {
    PageArray* a = d.pgmap->array_for(d.pfn(pgoff));
    a->flags(a->index_of(d.pfn(pgoff))).fetch_or(kPagePoisoned);
  }
};

INSTANTIATE_TEST_SUITE_P(AllStrategies, GupStrategyTest, ::testing::ValuesIn(kAllStrategies),
                         pgmap::testutil::strategy_param_name);

// 512 mapped 4 KiB folios pinned and unpinned: one refcount operation per folio each way, every
// refcount back where it was, no pagemap reference left over.
TEST_P(GupStrategyTest, PinOf512SmallFoliosIsOneAtomicPerFolio) {
  FakeDevice& d = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(512));
  prefault(as, a, 512);
  const Snapshot before = snapshot(d, 512);
  GupStats st;
  auto pins = must_pin(as, a, 512, 0, &st);
  ASSERT_EQ(pins.size(), 512u);
  EXPECT_EQ(st.fast, 512u);
  EXPECT_EQ(st.folio_atomics, 512u);
  for (std::uint64_t i = 0; i < 512; ++i) {
    ASSERT_EQ(pins[i].pfn, d.pfn(i));
    ASSERT_EQ(d.refcount(i), 1u + kBias) << i;
  }
  EXPECT_EQ(unpin_user_pages(pins), Errc::ok);
  EXPECT_EQ(snapshot(d, 512), before);
}

// A poisoned folio in the middle of a 512-page pin: the batch pins the pages before it, the call
// then fails with Errc::poisoned and gives every pin back (nothing leaks, bug 5.12). FOLL_GET is
// not refused on poison, and a pin that stops before the poisoned page succeeds.
TEST_P(GupStrategyTest, PoisonedFolioMidBatchFailsAndLeaksNothing) {
  FakeDevice& d = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(512));
  prefault(as, a, 512);
  poison(d, 300);
  const Snapshot before = snapshot(d, 512);
  GupStats st;
  Error r = must_fail(as, a, 512, kFollPin, &st);
  EXPECT_EQ(r.code(), Errc::poisoned);
  EXPECT_NE(r.message().find("poisoned"), std::string::npos) << r.message();
  EXPECT_EQ(st.folio_atomics, 300u);  // the pages before it were pinned, then given back
  EXPECT_EQ(snapshot(d, 512), before);
  auto refs = must_get(as, a, 512, 0);
  EXPECT_EQ(refs.size(), 512u);
  EXPECT_EQ(put_pages(refs), Errc::ok);
  auto pins = must_pin(as, a, 300, 0);
  EXPECT_EQ(pins.size(), 300u);
  EXPECT_EQ(unpin_user_pages(pins), Errc::ok);
  EXPECT_EQ(snapshot(d, 512), before);
}

// A killed pagemap: the walk finds it dying at its first page, the call fails with Errc::dead
// and nothing changes, whatever the strategy.
TEST_P(GupStrategyTest, KilledPagemapRefusesTheWholeCall) {
  FakeDevice& d = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(16));
  prefault(as, a, 16);
  const Snapshot before = snapshot(d, 16);
  ASSERT_EQ(d.pgmap->kill(), Errc::ok);
  for (std::uint32_t flags : {0u, std::uint32_t{kFollPin}}) {
    EXPECT_EQ(must_fail(as, a, 16, flags).code(), Errc::dead) << flags;
    EXPECT_EQ(snapshot(d, 16).ref, before.ref) << flags;
    EXPECT_EQ(snapshot(d, 16).pin, before.pin) << flags;
  }
}

// A 1-page call (its own lean lockless walk, gup.cc one_page_fast) keeps every semantic of the
// general walk: the fast case counts one page, one atomic, one liveness check; an unfaulted page
// and a read-only entry under FOLL_WRITE take the slow path (a write fault); a poisoned folio
// fails a pin with Errc::poisoned and nothing changed (FOLL_GET is fine); a killed pagemap fails
// with Errc::dead and nothing changed; and the _into forms give the same results.
TEST_P(GupStrategyTest, OnePageCallsKeepEverySemantic) {
  FakeDevice& d = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 4);  // pages 0-3 mapped read-only; 4-7 not mapped
  const Snapshot before = snapshot(d, 8);

  GupStats st;
  auto pin = must_pin(as, a + page(1), 1, 0, &st);
  ASSERT_EQ(pin.size(), 1u);
  EXPECT_EQ(pin[0].pfn, d.pfn(1));
  EXPECT_EQ(pin[0].pgmap, d.pgmap.get());
  EXPECT_EQ(st.fast, 1u);
  EXPECT_EQ(st.slow, 0u);
  EXPECT_EQ(st.folio_atomics, 1u);
  EXPECT_EQ(st.pagemap_lookups, 1u);
  EXPECT_EQ(d.refcount(1), 1u + kBias);
  EXPECT_EQ(d.pincount(1), 0u);  // a small folio: the bias, no exact pincount
  EXPECT_EQ(unpin_user_pages(pin), Errc::ok);
  auto ref = must_get(as, a + page(2), 1, 0);
  EXPECT_EQ(d.refcount(2), 2u);
  EXPECT_EQ(put_pages(ref), Errc::ok);
  EXPECT_EQ(snapshot(d, 8), before);

  // Not mapped yet: the slow path faults it in.
  st = {};
  auto faulted = must_pin(as, a + page(5), 1, 0, &st);
  ASSERT_EQ(faulted.size(), 1u);
  EXPECT_EQ(st.slow, 1u);
  EXPECT_EQ(d.refcount(5), 1u + kBias);  // the new mapping + our pin
  EXPECT_EQ(unpin_user_pages(faulted), Errc::ok);
  EXPECT_EQ(d.refcount(5), 1u);

  // FOLL_WRITE on a read-only entry of a writable VMA: a write fault makes it writable first.
  ASSERT_FALSE(as.lookup(a + page(3))->writable);
  st = {};
  auto wr = must_pin(as, a + page(3), 1, kFollWrite, &st);
  ASSERT_EQ(wr.size(), 1u);
  EXPECT_EQ(st.slow, 1u);
  EXPECT_TRUE(as.lookup(a + page(3))->writable);
  EXPECT_EQ(unpin_user_pages(wr), Errc::ok);
  // Now writable: the fast path serves FOLL_WRITE.
  st = {};
  PinnedPages into;
  EXPECT_EQ(pin_user_pages_into(into, as, a + page(3), 1, kFollWrite, &st), Errc::ok);
  EXPECT_EQ(st.fast, 1u);
  EXPECT_EQ(unpin_user_pages(into), Errc::ok);

  // Poison: the pin is refused, nothing changed; a plain reference is not refused.
  poison(d, 0);
  const Snapshot mapped = snapshot(d, 8);
  Error r = must_fail(as, a, 1, kFollPin);
  EXPECT_EQ(r.code(), Errc::poisoned);
  EXPECT_NE(r.message().find("poisoned"), std::string::npos) << r.message();
  EXPECT_EQ(pin_user_pages_into(into, as, a, 1, 0), Errc::poisoned);
  EXPECT_TRUE(into.empty());
  EXPECT_EQ(snapshot(d, 8), mapped);
  ReferencedPages refs;
  EXPECT_EQ(get_user_pages_into(refs, as, a, 1, 0), Errc::ok);
  EXPECT_EQ(put_pages(refs), Errc::ok);
  EXPECT_EQ(snapshot(d, 8), mapped);

  // A killed pagemap: Errc::dead, nothing changed.
  ASSERT_EQ(d.pgmap->kill(), Errc::ok);
  for (std::uint32_t flags : {0u, std::uint32_t{kFollPin}}) {
    EXPECT_EQ(must_fail(as, a + page(1), 1, flags).code(), Errc::dead) << flags;
    EXPECT_EQ(snapshot(d, 8).ref, mapped.ref) << flags;
    EXPECT_EQ(snapshot(d, 8).pin, mapped.pin) << flags;
  }
}

// 1-page pins and gets (the 1-page walk) racing a thread that zaps every mapping of the owner
// (unmap_mapping_range): each call either takes its page (the entry was still there at the
// re-check) or faults it in again; afterwards every folio holds exactly its mappings' references
// and no pin. With yield points compiled in (debug, asan, tsan) the walk's race windows
// ("gup.after_walk", "gup.before_recheck") are widened.
namespace one_page_race {
std::atomic<unsigned> tick{0};
void widen(const char* name) noexcept {
  (void)name;
  const unsigned t = tick.fetch_add(1, std::memory_order_relaxed);
  if (t % 5 == 0) std::this_thread::yield();
  if (t % 97 == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
}
}  // namespace one_page_race

TEST_F(GupTest, OnePageCallsRacingZapsTakeOrFaultAndLeakNothing) {
  constexpr std::uint64_t kPages = 16;
  const int kRounds = pgmap::testutil::kSanitized ? 300 : 2000;  // bounded under TSan too
  FakeDevice& d = device(4 * kMiB, 0, {}, PagemapType::generic);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  const YieldHook old = set_yield_hook(&one_page_race::widen);
  std::atomic<bool> go{false};
  std::atomic<bool> stop{false};
  std::thread zapper([&] {
    while (!go.load())
      std::this_thread::yield();
    while (!stop.load()) {
      (void)d.owner->unmap_mapping_range(0, 0);
      std::this_thread::yield();
    }
  });
  go.store(true);
  PinnedPages pins;
  ReferencedPages refs;
  std::uint64_t failures = 0;
  for (int round = 0; round < kRounds; ++round) {
    for (std::uint64_t p = 0; p < kPages; ++p) {
      const std::uint64_t at = a + page(p);
      if (pin_user_pages_into(pins, as, at, 1, kFollWrite) != Errc::ok || pins.size() != 1 ||
          pins[0].pfn != d.pfn(p) || unpin_user_pages(pins) != Errc::ok) {
        ++failures;
      }
      if (get_user_pages_into(refs, as, at, 1, 0) != Errc::ok || refs.size() != 1 ||
          refs[0].pfn != d.pfn(p) || put_pages(refs) != Errc::ok) {
        ++failures;
      }
    }
  }
  stop.store(true);
  zapper.join();
  (void)set_yield_hook(old);
  EXPECT_EQ(failures, 0u);
  for (std::uint64_t p = 0; p < kPages; ++p) {
    auto e = as.lookup(a + page(p));
    const std::uint32_t mapped = e ? 1u : 0u;
    EXPECT_EQ(d.refcount(p), mapped) << p;
    EXPECT_EQ(d.mapcount(p), static_cast<std::int32_t>(mapped)) << p;
    EXPECT_EQ(d.pincount(p), 0u) << p;
  }
}

// 4 KiB and 2 MiB folios mixed in one PTE table: one operation per small folio and one for the
// PTE-mapped pages of the 2 MiB folio (its exact pincount counts each page).
TEST_P(GupStrategyTest, Mixed4KAnd2MFoliosInOneTable) {
  FakeDevice& d = strategy_device();
  PageArray* arr = d.pgmap->array_for(d.pfn(512));
  ASSERT_EQ(arr->set_folio_order(arr->index_of(d.pfn(512)), kPmdOrder), Errc::ok);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(1024));
  prefault(as, a + page(508), 12);  // 508..511 small, 512..519 of the 2 MiB folio
  GupStats st;
  auto pins = must_pin(as, a + page(508), 12, 0, &st);
  ASSERT_EQ(pins.size(), 12u);
  EXPECT_EQ(st.folio_atomics, 4u + 1u);
  EXPECT_EQ(d.refcount(508), 1u + kBias);
  EXPECT_EQ(d.refcount(512), 8u + 8u);  // 8 mappings + 8 pins
  EXPECT_EQ(d.pincount(512), 8u);
  EXPECT_TRUE(d.pgmap->folio_maybe_dma_pinned(d.pfn(515)));
  EXPECT_EQ(unpin_user_pages(pins), Errc::ok);
  EXPECT_EQ(d.refcount(508), 1u);
  EXPECT_EQ(d.refcount(512), 8u);
  EXPECT_EQ(d.pincount(512), 0u);
  EXPECT_FALSE(d.pgmap->folio_maybe_dma_pinned(d.pfn(515)));
}

// One PTE table mapping pages of two pagemaps: the batch ends at the pagemap change and the next
// one starts there; the release batches per pagemap.
TEST_P(GupStrategyTest, OneTableTwoPagemaps) {
  FakeDevice& d0 = strategy_device();
  FakeDevice& d1 = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d0, page(8));
  auto b = as.mmap(a + page(8), page(8), kRW, kMapShared | kMapFixed, d1.owner, 0);
  ASSERT_TRUE(b) << b.error().to_string();
  prefault(as, a, 16);
  GupStats st;
  auto pins = must_pin(as, a, 16, 0, &st);
  ASSERT_EQ(pins.size(), 16u);
  EXPECT_EQ(st.fast, 16u);
  EXPECT_EQ(st.folio_atomics, 16u);
  for (std::uint64_t i = 0; i < 16; ++i) {
    const FakeDevice& d = i < 8 ? d0 : d1;
    EXPECT_EQ(pins[i].pgmap, d.pgmap.get()) << i;
    EXPECT_EQ(d.refcount(i % 8), 1u + kBias) << i;
  }
  EXPECT_EQ(unpin_user_pages(pins), Errc::ok);
  for (std::uint64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(d0.refcount(i), 1u);
    EXPECT_EQ(d1.refcount(i), 1u);
  }
}

// A pinned set released after one of its pages lost its pin elsewhere (misuse): the underflow is
// reported once, and every other page of the batch is still unpinned.
TEST_P(GupStrategyTest, ReleaseSkipsAnEntryThatHoldsNothingAndReleasesTheRest) {
  FakeDevice& d = strategy_device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(8));
  prefault(as, a, 8);
  auto pins = must_pin(as, a, 8, 0);
  ASSERT_EQ(pins.size(), 8u);
  ASSERT_EQ(d.pgmap->unpin_folio(d.pfn(3)), Errc::ok);  // behind the set's back
  const std::uint64_t misuse0 = misuse_.reported();
  EXPECT_EQ(unpin_user_pages(pins), Errc::underflow);
  EXPECT_EQ(misuse_.reported(), misuse0 + 1);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(d.refcount(i), 1u) << i;
}

// I16: a waiter for an fsdax folio to go idle (dax_break_layout's wait_var_event on the refcount)
// is woken by whichever path drops the last reference.
class GupWakeTest : public GupTest {
 protected:
  // Waits on another thread until pfn's folio is idle; returns once the waiter is registered.
  void start_waiter(const FakeDevice& d, std::uint64_t pgoff) {
    PageArray* arr = d.pgmap->array_for(d.pfn(pgoff));
    std::atomic<std::uint32_t>* ref = &arr->ref(arr->head_of(arr->index_of(d.pfn(pgoff))));
    key_ = ref;
    waiter_ = std::thread([this, ref] {
      WaitOptions w;
      w.deadline = Clock::now() + 20s;
      result_.store(wait_var_event(
          ref, [ref] { return ref->load(std::memory_order_acquire) == 0; }, w));
      done_.store(true);
    });
    ASSERT_TRUE(pgmap::testutil::eventually([&] { return WaitTable::global().waiters(key_) > 0; }));
    std::this_thread::sleep_for(20ms);
    ASSERT_FALSE(done_.load());  // really blocked
  }
  Errc join() {
    waiter_.join();
    return result_.load();
  }
  void TearDown() override {
    if (waiter_.joinable()) waiter_.join();
    GupTest::TearDown();
  }

  const void* key_ = nullptr;
  std::thread waiter_;
  std::atomic<Errc> result_{Errc::invalid_argument};
  std::atomic<bool> done_{false};
};

TEST_F(GupWakeTest, FinalUnpinWakesWaiter) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  auto pages = must_pin(as, a + page(1), 1, 0);
  ASSERT_EQ(as.munmap(a, page(4)), Errc::ok);  // only the pin is left
  ASSERT_EQ(d.refcount(1), kBias);
  start_waiter(d, 1);
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
  EXPECT_EQ(join(), Errc::ok);
}

TEST_F(GupWakeTest, FinalUnpinOfLargeFolioWakesWaiter) {
  FakeOwner::Options o;
  o.max_level = Level::pmd;
  FakeDevice& d = device(4 * kMiB, kPmdOrder, o);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB);
  auto pages = must_pin(as, a, 512, 0);
  ASSERT_EQ(as.munmap(a, 2 * kMiB), Errc::ok);
  ASSERT_EQ(d.refcount(0), 512u);
  start_waiter(d, 0);
  EXPECT_EQ(unpin_user_pages(pages), Errc::ok);
  EXPECT_EQ(join(), Errc::ok);
}

TEST_F(GupWakeTest, FinalPutWakesWaiter) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  auto pages = must_get(as, a + page(2), 2, 0);
  ASSERT_EQ(as.munmap(a, page(4)), Errc::ok);
  ASSERT_EQ(d.refcount(3), 1u);
  start_waiter(d, 3);
  EXPECT_EQ(put_pages(pages), Errc::ok);
  EXPECT_EQ(join(), Errc::ok);
}

TEST_F(GupWakeTest, MunmapOfLastMappingWakesWaiter) {
  FakeDevice& d = device();
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(4));
  prefault(as, a, 4);
  ASSERT_EQ(d.refcount(2), 1u);
  start_waiter(d, 2);
  EXPECT_EQ(as.munmap(a, page(4)), Errc::ok);
  EXPECT_EQ(join(), Errc::ok);
}

}  // namespace
}  // namespace pgmap::mm
