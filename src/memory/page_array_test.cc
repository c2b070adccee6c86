#include "pgmap/memory/page_array.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "memory/testing/resident_bytes.h"
#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {
namespace {

std::unique_ptr<PageArray> must_create(PfnRange range, unsigned base_order) {
  auto r = PageArray::create(range, base_order);
  if (!r) {
    ADD_FAILURE() << "PageArray::create: " << r.error().to_string();
    return nullptr;
  }
  return std::move(r).value();
}

// Every entry in [from, to) is an idle base folio: its own head, base order, no flags.
void expect_base_folios(PageArray& a, std::uint64_t from, std::uint64_t to) {
  for (std::uint64_t e = from; e < to; ++e) {
    ASSERT_EQ(a.order(e), a.base_order()) << "entry " << e;
    ASSERT_EQ(a.head_of(e), e) << "entry " << e;
    ASSERT_EQ(a.folio_entries(e), 1u) << "entry " << e;
    ASSERT_TRUE(a.is_head(e)) << "entry " << e;
    ASSERT_EQ(a.flags(e).load(), 0u) << "entry " << e;
  }
}

// [head, head + n) is one folio of `order`: every entry points at head, only head is a head.
void expect_folio(PageArray& a, std::uint64_t head, unsigned order) {
  const std::uint64_t n = std::uint64_t{1} << (order - a.base_order());
  for (std::uint64_t e = head; e < head + n; ++e) {
    ASSERT_EQ(a.head_of(e), head) << "entry " << e;
    ASSERT_EQ(a.order(e), order) << "entry " << e;
    ASSERT_EQ(a.folio_entries(e), n) << "entry " << e;
    ASSERT_EQ(a.is_head(e), e == head) << "entry " << e;
  }
}

// Every field of entry e reads zero (a free base folio, or discarded metadata).
void expect_all_zero(PageArray& a, std::uint64_t e) {
  ASSERT_EQ(a.ref(e).load(), 0u) << "entry " << e;
  ASSERT_EQ(a.mapcount(e).load(), 0) << "entry " << e;
  ASSERT_EQ(a.pincount(e).load(), 0u) << "entry " << e;
  ASSERT_EQ(a.flags(e).load(), 0u) << "entry " << e;
  ASSERT_EQ(a.order(e), a.base_order()) << "entry " << e;
  ASSERT_EQ(a.mapping(e).load(), nullptr) << "entry " << e;
  ASSERT_EQ(a.index_or_share(e).load(), 0u) << "entry " << e;
}

// Writes every field of entry e (commits the metadata page of each array it lands on).
void touch_every_field(PageArray& a, std::uint64_t e) {
  a.ref(e).store(3);
  a.mapcount(e).store(1);
  a.pincount(e).store(1);
  a.flags(e).store(kPagePoisoned);
  a.mapping(e).store(&a);
  a.index_or_share(e).store(42);
}

using testutil::resident_bytes;

class PageArrayTest : public ::testing::Test {
 protected:
  testutil::MisuseCounter misuse_;
};

// ---- create -------------------------------------------------------------------------------------

TEST_F(PageArrayTest, CreateBaseOrder0) {
  const PfnRange range{Pfn{1} << 20, 1024};
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->range().start, range.start);
  EXPECT_EQ(a->range().count, range.count);
  EXPECT_EQ(a->base_order(), 0u);
  EXPECT_EQ(a->entries(), 1024u);
  EXPECT_EQ(a->hot_bytes(), 4 * a->entries());
  EXPECT_LE(a->hot_bytes() / range.count, 8u);  // <= 8 B of hot metadata per 4 KiB page
  EXPECT_GE(a->reserved_bytes(), a->hot_bytes());
  EXPECT_FALSE(a->retired());
  for (std::uint64_t e = 0; e < a->entries(); ++e) {
    ASSERT_EQ(a->ref(e).load(), 0u);
    ASSERT_EQ(a->mapcount(e).load(), 0);
    ASSERT_EQ(a->pincount(e).load(), 0u);
  }
  expect_base_folios(*a, 0, a->entries());
  EXPECT_EQ(a->count_busy(), 0u);
  EXPECT_TRUE(a->uses_pin_bias(0));
}

TEST_F(PageArrayTest, CreateBaseOrder9) {
  const PfnRange range{512 * 8, 512 * 16};
  auto a = must_create(range, kPmdOrder);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->base_order(), kPmdOrder);
  EXPECT_EQ(a->entries(), 16u);
  EXPECT_EQ(a->hot_bytes(), 4 * a->entries());
  EXPECT_LE(a->hot_bytes() / range.count, 8u);
  expect_base_folios(*a, 0, a->entries());
  EXPECT_FALSE(a->uses_pin_bias(0));  // a 2 MiB folio pins exactly
}

TEST_F(PageArrayTest, CreateBaseOrder18) {
  const PfnRange range{Pfn{1} << 18, std::uint64_t{4} << 18};
  auto a = must_create(range, kPudOrder);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->base_order(), kPudOrder);
  EXPECT_EQ(a->entries(), 4u);
  EXPECT_EQ(a->hot_bytes(), 16u);
  EXPECT_LE(a->hot_bytes() / range.count, 8u);
  expect_base_folios(*a, 0, a->entries());
}

TEST_F(PageArrayTest, RejectsUnsupportedBaseOrders) {
  for (unsigned order : {1u, 5u, 8u, 10u, 17u, 19u}) {
    auto r = PageArray::create(PfnRange{Pfn{1} << 20, Pfn{1} << 20}, order);
    ASSERT_FALSE(r) << "order " << order;
    EXPECT_EQ(r.code(), Errc::invalid_argument) << "order " << order;
  }
}

TEST_F(PageArrayTest, RejectsUnalignedRanges) {
  struct Case {
    PfnRange range;
    unsigned order;
  };
  const Case cases[] = {
      {{512 + 1, 512}, kPmdOrder},       // start not on a 2 MiB boundary
      {{512, 512 + 1}, kPmdOrder},       // count not a whole number of folios
      {{512, 256}, kPmdOrder},           // less than one folio
      {{512, 512}, kPudOrder},           // start not on a 1 GiB boundary
      {{Pfn{1} << 18, 512}, kPudOrder},  // count not 1 GiB
      {{4096, 0}, 0},                    // empty
      {{Pfn{1} << 18, 0}, kPudOrder},    // empty
  };
  for (const Case& c : cases) {
    auto r = PageArray::create(c.range, c.order);
    ASSERT_FALSE(r) << c.range.start << "+" << c.range.count << " order " << c.order;
    EXPECT_EQ(r.code(), Errc::unaligned) << c.range.start << "+" << c.range.count;
  }
}

TEST_F(PageArrayTest, IndexAndPfnRoundTrip) {
  {
    auto a = must_create(PfnRange{0x40000, 4096}, 0);
    ASSERT_TRUE(a);
    for (std::uint64_t e : {0ull, 1ull, 15ull, 16ull, 2047ull, 4095ull}) {
      EXPECT_EQ(a->pfn_of(e), 0x40000 + e);
      EXPECT_EQ(a->index_of(a->pfn_of(e)), e);
    }
    EXPECT_TRUE(a->contains(0x40000));
    EXPECT_TRUE(a->contains(0x40000 + 4095));
    EXPECT_FALSE(a->contains(0x40000 - 1));
    EXPECT_FALSE(a->contains(0x40000 + 4096));
  }
  {
    const Pfn start = Pfn{512} * 100;
    auto a = must_create(PfnRange{start, 512 * 8}, kPmdOrder);
    ASSERT_TRUE(a);
    for (std::uint64_t e = 0; e < a->entries(); ++e) {
      EXPECT_EQ(a->pfn_of(e), start + e * 512);
      EXPECT_EQ(a->index_of(a->pfn_of(e)), e);
      // Every pfn of a base folio maps to its entry.
      EXPECT_EQ(a->index_of(a->pfn_of(e) + 1), e);
      EXPECT_EQ(a->index_of(a->pfn_of(e) + 511), e);
    }
  }
}

// ---- folios -------------------------------------------------------------------------------------

TEST_F(PageArrayTest, SetFolioOrderBuildsA2MiBFolio) {
  auto a = must_create(PfnRange{0x100000, 2048}, 0);
  ASSERT_TRUE(a);
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  expect_folio(*a, 512, kPmdOrder);
  expect_base_folios(*a, 0, 512);
  expect_base_folios(*a, 1024, 2048);
  EXPECT_FALSE(a->uses_pin_bias(512));
  EXPECT_TRUE(a->uses_pin_bias(511));
  // Rebuilding the same folio is allowed (it is idle).
  EXPECT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  expect_folio(*a, 512, kPmdOrder);
}

// Bug 5.8: splitting a large folio must reset the order of every entry, not only the head.
TEST_F(PageArrayTest, SplitResetsOrderOnEveryEntry) {
  auto a = must_create(PfnRange{0x100000, 2048}, 0);
  ASSERT_TRUE(a);
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  ASSERT_EQ(a->set_folio_order(512, 0), Errc::ok);
  expect_base_folios(*a, 0, 2048);
  // The split entries can form other folios now.
  EXPECT_EQ(a->set_folio_order(768, 8), Errc::ok);
  expect_folio(*a, 768, 8);
  EXPECT_EQ(a->set_folio_order(768, 0), Errc::ok);
  EXPECT_EQ(a->set_folio_order(0, 10), Errc::ok);
  expect_folio(*a, 0, 10);
  EXPECT_EQ(a->set_folio_order(0, 0), Errc::ok);
  expect_base_folios(*a, 0, 2048);
}

TEST_F(PageArrayTest, SplitAtBaseOrder9Of1GiBFolio) {
  auto a = must_create(PfnRange{Pfn{1} << 18, std::uint64_t{2} << 18}, kPmdOrder);
  ASSERT_TRUE(a);
  ASSERT_EQ(a->entries(), 1024u);
  ASSERT_EQ(a->set_folio_order(512, kPudOrder), Errc::ok);
  expect_folio(*a, 512, kPudOrder);
  expect_base_folios(*a, 0, 512);
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  expect_base_folios(*a, 0, 1024);
}

TEST_F(PageArrayTest, SetFolioOrderRefusesBusyEntries) {
  auto a = must_create(PfnRange{0x100000, 1024}, 0);
  ASSERT_TRUE(a);
  // Building over a busy entry (refcount, mapcount or pincount, anywhere in the span).
  a->ref(512 + 100).store(1);
  EXPECT_EQ(a->set_folio_order(512, kPmdOrder), Errc::busy);
  expect_base_folios(*a, 0, 1024);
  a->ref(512 + 100).store(0);

  a->mapcount(1023).store(1);
  EXPECT_EQ(a->set_folio_order(512, kPmdOrder), Errc::busy);
  expect_base_folios(*a, 0, 1024);
  a->mapcount(1023).store(0);

  a->pincount(512).store(1);
  EXPECT_EQ(a->set_folio_order(512, kPmdOrder), Errc::busy);
  expect_base_folios(*a, 0, 1024);
  a->pincount(512).store(0);

  // Splitting a busy folio.
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  a->ref(512).store(3);
  EXPECT_EQ(a->set_folio_order(512, 0), Errc::busy);
  expect_folio(*a, 512, kPmdOrder);
  a->ref(512).store(0);
  a->mapcount(600).store(1);
  EXPECT_EQ(a->set_folio_order(512, 0), Errc::busy);
  expect_folio(*a, 512, kPmdOrder);
  a->mapcount(600).store(0);
  a->pincount(512).store(2);
  EXPECT_EQ(a->set_folio_order(512, 0), Errc::busy);
  expect_folio(*a, 512, kPmdOrder);
  a->pincount(512).store(0);
  EXPECT_EQ(a->set_folio_order(512, 0), Errc::ok);
  expect_base_folios(*a, 0, 1024);
}

TEST_F(PageArrayTest, SetFolioOrderRefusesToStraddleALargerFolio) {
  auto a = must_create(PfnRange{0x100000, 2048}, 0);
  ASSERT_TRUE(a);
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  // A smaller folio inside the 2 MiB one.
  EXPECT_EQ(a->set_folio_order(768, 8), Errc::busy);
  EXPECT_EQ(a->set_folio_order(512, 8), Errc::busy);
  expect_folio(*a, 512, kPmdOrder);
  // A folio that contains the 2 MiB one whole is fine (both are idle).
  ASSERT_EQ(a->set_folio_order(0, 10), Errc::ok);
  expect_folio(*a, 0, 10);
  // Splitting from a tail entry is not a split of that folio.
  EXPECT_NE(a->set_folio_order(512, 0), Errc::ok);
  EXPECT_NE(a->set_folio_order(1, 0), Errc::ok);
  expect_folio(*a, 0, 10);
  expect_base_folios(*a, 1024, 2048);
}

TEST_F(PageArrayTest, SetFolioOrderRejectsBadHeadAndOrder) {
  auto a = must_create(PfnRange{0x100000, 2048}, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->set_folio_order(1, kPmdOrder), Errc::unaligned);
  EXPECT_EQ(a->set_folio_order(256, kPmdOrder), Errc::unaligned);
  EXPECT_EQ(a->set_folio_order(2048, kPmdOrder), Errc::out_of_range);
  EXPECT_EQ(a->set_folio_order(2048, 0), Errc::out_of_range);
  EXPECT_EQ(a->set_folio_order(1024, 11), Errc::out_of_range);
  EXPECT_EQ(a->set_folio_order(0, kPudOrder + 1), Errc::invalid_argument);
  expect_base_folios(*a, 0, 2048);

  auto c = must_create(PfnRange{0x100000, 1536}, 0);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->set_folio_order(1024, 10), Errc::out_of_range);  // aligned head, span past the end
  expect_base_folios(*c, 0, 1536);

  auto b = must_create(PfnRange{512 * 64, 512 * 64}, kPmdOrder);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->set_folio_order(0, 0), Errc::invalid_argument);  // below the base order
  EXPECT_EQ(b->set_folio_order(0, 8), Errc::invalid_argument);
  expect_base_folios(*b, 0, b->entries());
}

// ---- scans --------------------------------------------------------------------------------------

std::uint64_t naive_find_busy(PageArray& a, std::uint64_t from, std::uint64_t to) {
  for (std::uint64_t e = from; e < to; ++e) {
    if (a.ref(e).load() != 0) return e;
  }
  return to;
}

TEST_F(PageArrayTest, FindBusyAtStartMiddleEnd) {
  auto a = must_create(PfnRange{0x100000, 1000}, 0);  // not a multiple of the 16-entry step
  ASSERT_TRUE(a);
  const std::uint64_t n = a->entries();
  EXPECT_EQ(a->find_busy(0, n), n);
  EXPECT_EQ(a->count_busy(), 0u);

  a->ref(0).store(1);
  EXPECT_EQ(a->find_busy(0, n), 0u);
  EXPECT_EQ(a->find_busy(1, n), n);
  EXPECT_EQ(a->count_busy(), 1u);

  a->ref(500).store(PageArray::kPinBias);
  EXPECT_EQ(a->find_busy(1, n), 500u);
  EXPECT_EQ(a->find_busy(500, n), 500u);
  EXPECT_EQ(a->find_busy(501, n), n);
  EXPECT_EQ(a->find_busy(1, 500), 500u);  // `to` when nothing busy before it
  EXPECT_EQ(a->count_busy(), 2u);

  a->ref(n - 1).store(7);
  EXPECT_EQ(a->find_busy(501, n), n - 1);
  EXPECT_EQ(a->find_busy(n - 1, n), n - 1);
  EXPECT_EQ(a->find_busy(n, n), n);
  EXPECT_EQ(a->count_busy(), 3u);

  a->ref(0).store(0);
  a->ref(500).store(0);
  a->ref(n - 1).store(0);
  EXPECT_EQ(a->count_busy(), 0u);
}

TEST_F(PageArrayTest, FindBusyAcrossChunkBoundaries) {
  auto a = must_create(PfnRange{0x100000, 256}, 0);
  ASSERT_TRUE(a);
  const std::uint64_t n = a->entries();
  for (std::uint64_t busy : {15ull, 16ull, 17ull, 31ull, 32ull, 47ull, 48ull, 255ull}) {
    a->ref(busy).store(1);
    for (std::uint64_t from = 0; from <= busy + 1 && from <= n; ++from) {
      ASSERT_EQ(a->find_busy(from, n), from <= busy ? busy : n) << busy << " from " << from;
    }
    // `to` inside the chunk, just before and just after the busy entry.
    EXPECT_EQ(a->find_busy(0, busy), busy);
    EXPECT_EQ(a->find_busy(0, busy + 1), busy);
    EXPECT_EQ(a->count_busy(), 1u);
    a->ref(busy).store(0);
  }
  // Two busy entries in one chunk, and one at each side of a boundary.
  a->ref(33).store(1);
  a->ref(35).store(1);
  EXPECT_EQ(a->find_busy(0, n), 33u);
  EXPECT_EQ(a->find_busy(34, n), 35u);
  EXPECT_EQ(a->count_busy(), 2u);
  a->ref(63).store(1);
  a->ref(64).store(1);
  EXPECT_EQ(a->find_busy(36, n), 63u);
  EXPECT_EQ(a->find_busy(64, n), 64u);
  EXPECT_EQ(a->count_busy(), 4u);
}

TEST_F(PageArrayTest, FindBusyMatchesNaiveScan) {
  auto a = must_create(PfnRange{0x100000, 777}, 0);
  ASSERT_TRUE(a);
  const std::uint64_t n = a->entries();
  std::mt19937_64 rng(42);
  for (int round = 0; round < 200; ++round) {
    for (std::uint64_t e = 0; e < n; ++e)
      a->ref(e).store(0);
    const int busy = static_cast<int>(rng() % 6);
    std::uint64_t expected = 0;
    for (int i = 0; i < busy; ++i) {
      std::uint64_t e = rng() % n;
      if (a->ref(e).exchange(static_cast<std::uint32_t>(1 + rng() % 3000)) == 0) ++expected;
    }
    ASSERT_EQ(a->count_busy(), expected);
    for (int q = 0; q < 20; ++q) {
      std::uint64_t from = rng() % (n + 1);
      std::uint64_t to = from + rng() % (n + 1 - from);
      ASSERT_EQ(a->find_busy(from, to), naive_find_busy(*a, from, to)) << from << ".." << to;
    }
  }
}

// ---- retire -------------------------------------------------------------------------------------

TEST_F(PageArrayTest, RetireQuarantineMarksEveryRefcount) {
  auto a = must_create(PfnRange{0x100000, 300}, 0);
  ASSERT_TRUE(a);
  a->ref(7).store(2);
  a->retire(PageArray::RetireMode::quarantine);
  EXPECT_TRUE(a->retired());
  for (std::uint64_t e = 0; e < a->entries(); ++e) {
    ASSERT_EQ(a->ref(e).load(), PageArray::kRetiredRef) << "entry " << e;
  }
  EXPECT_GT(PageArray::kRetiredRef, PageArray::kMaxRef);
  EXPECT_EQ(a->count_busy(), a->entries());
  a->retire(PageArray::RetireMode::quarantine);  // idempotent
  EXPECT_TRUE(a->retired());
  EXPECT_EQ(misuse_.reported(), 0u);
}

TEST_F(PageArrayTest, RetireDiscardIsIdempotent) {
  auto a = must_create(PfnRange{0x100000, 300}, 0);
  ASSERT_TRUE(a);
  a->retire(PageArray::RetireMode::discard);
  EXPECT_TRUE(a->retired());
  a->retire(PageArray::RetireMode::discard);     // idempotent
  a->retire(PageArray::RetireMode::quarantine);  // the first mode wins: no retired values
  EXPECT_TRUE(a->retired());
  if constexpr (!sanitizer::kAddress) {
    EXPECT_EQ(a->ref(7).load(), 0u);
  }
  a.reset();  // the destructor unmaps once
  EXPECT_EQ(misuse_.reported(), 0u);
}

// Issue 7 item 9: the default retire used to unmap the metadata, so any late get, put, pin or
// unpin through a stale pointer into it was a SIGSEGV. Now the addresses stay mapped: every entry
// reads zero, writes land harmlessly, and no field faults (this test dies with SIGSEGV on the
// unmapping retire). ASan poisons the retired metadata on purpose, so it would report these
// accesses: only the retire itself runs there.
TEST_F(PageArrayTest, LateAccessesAfterDiscardDoNotFaultAndReadZero) {
  const PfnRange range{Pfn{1} << 20, 4096};
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  std::atomic<std::uint32_t>* const hot = &a->ref(0);
  ASSERT_EQ(a->set_folio_order(512, kPmdOrder), Errc::ok);
  for (std::uint64_t e = 0; e < a->entries(); e += 7)
    touch_every_field(*a, e);
  a->retire(PageArray::RetireMode::discard);
  ASSERT_TRUE(a->retired());
  if constexpr (sanitizer::kAddress) GTEST_SKIP() << "the retired metadata is poisoned";
  EXPECT_EQ(&a->ref(0), hot);  // same addresses, still mapped
  for (std::uint64_t e = 0; e < a->entries(); ++e)
    expect_all_zero(*a, e);  // including the order of the 2 MiB folio: every entry a base folio
  // What a late get / put / pin / unpin does to the fields: lands, and stays in the process.
  for (std::uint64_t e : {std::uint64_t{0}, std::uint64_t{513}, a->entries() - 1}) {
    EXPECT_EQ(a->ref(e).fetch_add(1), 0u);
    EXPECT_EQ(a->ref(e).fetch_add(PageArray::kPinBias), 1u);
    EXPECT_EQ(a->ref(e).fetch_sub(PageArray::kPinBias + 1), PageArray::kPinBias + 1);
    EXPECT_EQ(a->pincount(e).fetch_add(1), 0u);
    EXPECT_EQ(a->mapcount(e).fetch_sub(1), 0);
    EXPECT_EQ(a->flags(e).fetch_or(kPagePoisoned), 0u);
    EXPECT_TRUE(a->is_head(e));
  }
  EXPECT_EQ(a->find_busy(0, a->entries()), a->entries());  // the refcounts are back to zero
  a.reset();
}

// ---- memory cost ------------------------------------------------------------------------------

// Issue 9 §4: create() used to write every refcount and flag byte (memmap_init_zone_device), so
// 64 GiB of 4 KiB pages committed 80 MiB before a page was used, 1 TiB 1280 MiB. A free entry is
// now all-zero, which the fresh mapping already is: creating commits nothing, and a touched
// entry commits only the metadata pages it lands on (a huge page of the hot array, a base page of
// each cold array).
TEST_F(PageArrayTest, CreateCommitsNothingAndATouchCostsItsMetadataPages) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "sanitizer shadow and allocator make the resident set meaningless here";
  }
  const PfnRange range{Pfn{1} << 24, Pfn{1} << 24};  // 64 GiB of 4 KiB pages
  const std::uint64_t before = resident_bytes();
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  const std::uint64_t created = resident_bytes();
  EXPECT_EQ(a->reserved_bytes(), 30 * a->entries());  // 30 B of address space per entry
  EXPECT_LE(created, before + (std::uint64_t{2} << 20))
      << "create() committed " << ((created - std::min(created, before)) >> 10) << " KiB";
  // Reading is free too: untouched metadata maps the shared zero page.
  EXPECT_EQ(a->count_busy(), 0u);
  expect_base_folios(*a, 0, 4096);
  EXPECT_LE(resident_bytes(), before + (std::uint64_t{2} << 20));
  // One touched entry in the middle: at most one 2 MiB page of refcounts and one 4 KiB page of
  // each of the six cold arrays (plus a little slack for the test's own allocations).
  const std::uint64_t mid = a->entries() / 2 + 12345;
  touch_every_field(*a, mid);
  ASSERT_EQ(a->order(mid), 0u);
  const std::uint64_t touched = resident_bytes();
  EXPECT_LE(touched,
            created + (std::uint64_t{2} << 20) + 6 * kPageSize + (std::uint64_t{256} << 10))
      << "one touched entry committed " << ((touched - std::min(touched, created)) >> 10) << " KiB";
  EXPECT_EQ(a->count_busy(), 1u);
  a.reset();
}

// The discard retire returns the memory at once (while the PageArray, and so its address range,
// lives on); the old unmapping retire did too, the ASan-style keep-mapped retire did not.
TEST_F(PageArrayTest, RetireDiscardReturnsTheMemory) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "sanitizer shadow and allocator make the resident set meaningless here";
  }
  const PfnRange range{Pfn{1} << 24, Pfn{1} << 22};  // 16 GiB of 4 KiB pages: 16 MiB of refcounts
  const std::uint64_t before = resident_bytes();
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  for (std::uint64_t e = 0; e < a->entries(); ++e)
    a->ref(e).store(1, std::memory_order_relaxed);
  for (std::uint64_t e = 0; e < a->entries(); e += 512)
    touch_every_field(*a, e);
  const std::uint64_t used = resident_bytes();
  ASSERT_GE(used, before + a->hot_bytes());  // the test really committed the hot array
  a->retire(PageArray::RetireMode::discard);
  const std::uint64_t retired = resident_bytes();
  EXPECT_LE(retired, before + (std::uint64_t{2} << 20))
      << "retire kept " << ((retired - std::min(retired, before)) >> 20) << " MiB of "
      << ((used - before) >> 20) << " MiB";
  a.reset();
}

// ---- through memremap / memunmap ---------------------------------------------------------------

// Issue 9 §4 at the pagemap level: memremap of a 1 TiB device at 4 KiB (the backing is anonymous
// MAP_NORESERVE, free until touched) stays under 16 MiB of resident growth until pages are used,
// and memunmap gives back what the used pages cost. (Before: 1280 MiB at memremap.)
TEST_F(PageArrayTest, MemremapOfOneTebibyteCommitsNoMetadata) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "sanitizer shadow and allocator make the resident set meaningless here";
  }
  constexpr std::uint64_t kTiB = std::uint64_t{1} << 40;
  auto backing = testutil::make_backing(kTiB);
  ASSERT_TRUE(backing);
  const std::uint64_t before = resident_bytes();
  auto pg = testutil::must_memremap(testutil::make_params(Strategy::sweep, backing));
  ASSERT_TRUE(pg);
  const std::uint64_t mapped = resident_bytes();
  EXPECT_LE(mapped, before + (std::uint64_t{16} << 20))
      << "memremap of 1 TiB committed " << ((mapped - std::min(mapped, before)) >> 20) << " MiB";
  const PfnRange r = pg->range(0);
  for (std::uint64_t i = 0; i < 16; ++i) {
    const Pfn pfn = r.start + i * (r.count / 16) + 7;
    ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
    EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
    ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  }
  ASSERT_TRUE(pg->memunmap());
  EXPECT_LE(resident_bytes(), before + (std::uint64_t{16} << 20));
  EXPECT_EQ(misuse_.reported(), 0u);
}

// 20 memremap / use / memunmap lifecycles of a 64 GiB device, every dead pagemap kept alive (its
// metadata's address range stays reserved): the resident set must not grow with them.
TEST_F(PageArrayTest, RepeatedLifecyclesDoNotGrowTheResidentSet) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "sanitizer shadow and allocator make the resident set meaningless here";
  }
  auto backing = testutil::make_backing(std::uint64_t{64} << 30);
  ASSERT_TRUE(backing);
  std::vector<std::shared_ptr<DevPagemap>> dead;
  dead.reserve(20);
  std::uint64_t after_first = 0;
  for (int cycle = 0; cycle < 20; ++cycle) {
    auto pg = testutil::must_memremap(testutil::make_params(Strategy::sweep, backing));
    ASSERT_TRUE(pg);
    const PfnRange r = pg->range(0);
    for (std::uint64_t i = 0; i < 8; ++i) {  // 8 folios in 8 different 2 MiB refcount pages
      testutil::FolioHold hold;
      ASSERT_EQ(hold.take(*pg, r.start + i * (r.count / 8) + static_cast<Pfn>(cycle)), Errc::ok);
      ASSERT_EQ(hold.release(), Errc::ok);
    }
    ASSERT_TRUE(pg->memunmap());
    dead.push_back(std::move(pg));
    if (cycle == 0) after_first = resident_bytes();
  }
  const std::uint64_t after_all = resident_bytes();
  EXPECT_LE(after_all, after_first + (std::uint64_t{4} << 20))
      << "grew by " << ((after_all - std::min(after_all, after_first)) >> 20)
      << " MiB over 19 lifecycles";
  EXPECT_EQ(misuse_.reported(), 0u);
}

// Issue 7 item 9 at the pagemap level, default (release) options: late get / put / pin / unpin on
// a removed device, under every strategy, must not crash (they used to reach unmapped metadata).
// What they return is the pagemap's business (dev_pagemap_test); here: the process survives and
// the metadata still reads as free.
class PageArrayLateAccessTest : public ::testing::TestWithParam<Strategy> {
 protected:
  testutil::MisuseCounter misuse_;
};

TEST_P(PageArrayLateAccessTest, AfterMemunmapNothingFaults) {
  if constexpr (sanitizer::kAddress) GTEST_SKIP() << "the retired metadata is poisoned";
  auto backing = testutil::make_backing(8 * kPmdSize);
  ASSERT_TRUE(backing);
  MemremapParams params = testutil::make_params(GetParam(), backing);
  params.quarantine = false;  // the release default, also in debug builds
  auto pg = testutil::must_memremap(std::move(params));
  ASSERT_TRUE(pg);
  const Pfn pfn = pg->range(0).start + 3;
  ASSERT_TRUE(pg->memunmap());
  // Each result is deliberately not checked: this test is about not faulting.
  (void)pg->get_folio(pfn);
  (void)pg->put_folio(pfn);
  (void)pg->put_folio(pfn + 1);
  (void)pg->pin_folio(pfn + 2, 4);
  (void)pg->unpin_folio(pfn + 2, 4);
  (void)pg->unpin_folio(pfn + 8, 1);
  EXPECT_EQ(pg->folio_ref_count(pfn + 9), 0u);
  EXPECT_FALSE(pg->folio_maybe_dma_pinned(pfn + 9));
}

INSTANTIATE_TEST_SUITE_P(Strategies, PageArrayLateAccessTest,
                         ::testing::Values(Strategy::none, Strategy::per_lookup,
                                           Strategy::transition, Strategy::sweep,
                                           Strategy::alloc_event),
                         testutil::strategy_param_name);

// ---- scale --------------------------------------------------------------------------------------

// 1 TiB of 4 KiB pages: 268M entries, a 1 GiB hot array that costs nothing until touched, and a
// full scan of it.
TEST_F(PageArrayTest, OneTebibyteAt4KiB) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "1 GiB of metadata is too slow and too large under sanitizers";
  }
  const PfnRange range{Pfn{1} << 28, Pfn{1} << 28};
  const std::uint64_t before = resident_bytes();
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->entries(), std::uint64_t{1} << 28);
  EXPECT_EQ(a->hot_bytes(), std::uint64_t{1} << 30);
  EXPECT_LE(a->hot_bytes() / range.count, 8u);
  EXPECT_EQ(a->count_busy(), 0u);
  EXPECT_EQ(a->find_busy(0, a->entries()), a->entries());
  const std::uint64_t last = a->entries() - 1;
  a->ref(last).store(1);
  EXPECT_EQ(a->find_busy(0, a->entries()), last);
  EXPECT_EQ(a->count_busy(), 1u);
  // Created, scanned twice, one entry touched: far below the 1.25 GiB the old create() wrote.
  const std::uint64_t after = resident_bytes();
  EXPECT_LE(after, before + (std::uint64_t{16} << 20));
  a->ref(last).store(0);
  a.reset();
}

// The scan reads the hot array in aligned vector blocks after a scalar prologue (x86), so check
// every busy position against every start offset around the block edges, with a scalar oracle.
TEST(PageArrayFindBusy, MatchesAScalarScanForEveryPositionAndStart) {
  constexpr std::uint64_t kEntries = 300;
  auto created = PageArray::create({0, kEntries}, 0);
  ASSERT_TRUE(created.ok());
  PageArray& a = **created;
  for (std::uint64_t busy = 0; busy < kEntries; ++busy) {
    a.ref(busy).store(1);
    for (std::uint64_t from : {0u, 1u, 3u, 4u, 5u, 31u, 32u, 33u, 63u, 64u, 65u, 130u}) {
      for (std::uint64_t to : {kEntries, kEntries - 1, std::uint64_t{97}}) {
        if (from > to) continue;
        std::uint64_t want = (busy >= from && busy < to) ? busy : to;
        ASSERT_EQ(a.find_busy(from, to), want)
            << "busy " << busy << " from " << from << " to " << to;
      }
    }
    a.ref(busy).store(0);
  }
  // Two busy entries: the first one at or after `from` wins.
  a.ref(40).store(7);
  a.ref(200).store(PageArray::kPinBias);
  EXPECT_EQ(a.find_busy(0, kEntries), 40u);
  EXPECT_EQ(a.find_busy(41, kEntries), 200u);
  EXPECT_EQ(a.count_busy(), 2u);
}

}  // namespace
}  // namespace pgmap
