#include "pgmap/memory/page_array.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
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

// Every entry in [from, to) is an idle base folio: its own head, base order, head flag.
void expect_base_folios(PageArray& a, std::uint64_t from, std::uint64_t to) {
  for (std::uint64_t e = from; e < to; ++e) {
    ASSERT_EQ(a.order(e), a.base_order()) << "entry " << e;
    ASSERT_EQ(a.head_of(e), e) << "entry " << e;
    ASSERT_EQ(a.folio_entries(e), 1u) << "entry " << e;
    ASSERT_NE(a.flags(e).load() & kPageHead, 0) << "entry " << e;
  }
}

// [head, head + n) is one folio of `order`: every entry points at head, only head is flagged.
void expect_folio(PageArray& a, std::uint64_t head, unsigned order) {
  const std::uint64_t n = std::uint64_t{1} << (order - a.base_order());
  for (std::uint64_t e = head; e < head + n; ++e) {
    ASSERT_EQ(a.head_of(e), head) << "entry " << e;
    ASSERT_EQ(a.order(e), order) << "entry " << e;
    ASSERT_EQ(a.folio_entries(e), n) << "entry " << e;
    ASSERT_EQ((a.flags(e).load() & kPageHead) != 0, e == head) << "entry " << e;
  }
}

// Resident set size of this process, in bytes.
std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t size = 0;
  std::uint64_t resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
}

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

TEST_F(PageArrayTest, RetireUnmap) {
  auto a = must_create(PfnRange{0x100000, 300}, 0);
  ASSERT_TRUE(a);
  a->retire(PageArray::RetireMode::unmap);
  EXPECT_TRUE(a->retired());
  a->retire(PageArray::RetireMode::unmap);  // idempotent, no double munmap
  EXPECT_TRUE(a->retired());
  a.reset();  // the destructor must not unmap again
}

// ---- memory cost ------------------------------------------------------------------------------

// Creating the metadata commits the hot array and the flags (written at init), nothing else: the
// cold arrays (mapcount, pincount, order, mapping, index) are MAP_NORESERVE and cost nothing until
// an upper layer touches them. 64 GiB of 4 KiB pages: 64 MiB hot + 16 MiB flags, while the cold
// arrays span 400 MiB.
TEST_F(PageArrayTest, CreateCommitsOnlyHotArrayAndFlags) {
  if constexpr (sanitizer::kThread) {
    GTEST_SKIP() << "TSan commits shadow memory for every byte written";
  }
  const PfnRange range{Pfn{1} << 24, Pfn{1} << 24};
  const std::uint64_t before = resident_bytes();
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  const std::uint64_t after = resident_bytes();
  const std::uint64_t committed = after > before ? after - before : 0;
  const std::uint64_t expected = a->hot_bytes() + a->entries();  // refcounts + flags
  EXPECT_GT(a->reserved_bytes(), 5 * expected);
  EXPECT_LE(committed, expected + (std::uint64_t{32} << 20))
      << "create() committed " << (committed >> 20) << " MiB for " << (expected >> 20)
      << " MiB of hot array and flags (reserved " << (a->reserved_bytes() >> 20) << " MiB)";
}

// ---- scale --------------------------------------------------------------------------------------

// 1 TiB of 4 KiB pages: 268M entries, a 1 GiB hot array, and a full scan of it.
TEST_F(PageArrayTest, OneTebibyteAt4KiB) {
  if constexpr (testutil::kSanitized) {
    GTEST_SKIP() << "1 GiB of metadata is too slow and too large under sanitizers";
  }
  const PfnRange range{Pfn{1} << 28, Pfn{1} << 28};
  const std::uint64_t before = resident_bytes();
  auto a = must_create(range, 0);
  ASSERT_TRUE(a);
  const std::uint64_t after = resident_bytes();
  EXPECT_EQ(a->entries(), std::uint64_t{1} << 28);
  EXPECT_EQ(a->hot_bytes(), std::uint64_t{1} << 30);
  // 1 GiB of refcounts and 256 MiB of flags; the 6 GiB of cold arrays stay untouched.
  EXPECT_LE(after - std::min(after, before),
            a->hot_bytes() + a->entries() + (std::uint64_t{64} << 20));
  EXPECT_LE(a->hot_bytes() / range.count, 8u);
  EXPECT_EQ(a->count_busy(), 0u);
  EXPECT_EQ(a->find_busy(0, a->entries()), a->entries());
  const std::uint64_t last = a->entries() - 1;
  a->ref(last).store(1);
  EXPECT_EQ(a->find_busy(0, a->entries()), last);
  EXPECT_EQ(a->count_busy(), 1u);
  a->ref(last).store(0);
  a.reset();  // give the 1.25 GiB back before the next test
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
