#include "pgmap/memory/dev_pagemap.h"

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/diagnostics.h"
#include "pgmap/core/error.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;
using State = DevPagemap::State;
using testutil::AsyncMemunmap;
using testutil::eventually;
using testutil::FolioHold;
using testutil::FreeLog;
using testutil::make_backing;
using testutil::make_params;
using testutil::must_memremap;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

class DevPagemapTest : public ::testing::Test {
 protected:
  void SetUp() override { published_before_ = pagemap_count(); }
  void TearDown() override {
    EXPECT_EQ(pagemap_count(), published_before_) << "the test left a pagemap published";
  }

  // A pagemap of `bytes` over a fresh anonymous backing.
  std::shared_ptr<DevPagemap> map(Strategy s, std::uint64_t bytes = 4 * kMiB,
                                  unsigned base_order = 0, PagemapOps ops = {},
                                  PagemapType type = PagemapType::fs_dax,
                                  std::optional<bool> quarantine = std::nullopt) {
    MemremapParams p = make_params(s, make_backing(bytes), base_order, type);
    p.ops = std::move(ops);
    p.quarantine = quarantine;
    return must_memremap(std::move(p));
  }

  // The memremap must fail with `code` and publish nothing.
  void expect_rejected(MemremapParams p, Errc code) {
    const std::size_t before = pagemap_count();
    auto r = memremap(std::move(p));
    ASSERT_FALSE(r) << "memremap succeeded, expected " << errc_name(code);
    EXPECT_EQ(r.code(), code) << r.error().to_string();
    EXPECT_FALSE(r.error().message().empty());
    EXPECT_EQ(pagemap_count(), before);
  }

  testutil::MisuseCounter misuse_;
  std::size_t published_before_ = 0;
};

class StrategyTest : public DevPagemapTest, public ::testing::WithParamInterface<Strategy> {};
class SafeStrategyTest : public StrategyTest {};

INSTANTIATE_TEST_SUITE_P(AllStrategies, StrategyTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_param_name);
INSTANTIATE_TEST_SUITE_P(SafeStrategies, SafeStrategyTest, ::testing::ValuesIn(kSafeStrategies),
                         testutil::strategy_param_name);

Pfn first_pfn(const DevPagemap& pg) {
  return pg.range(0).start;
}

MemunmapOptions refuse_opts() {
  MemunmapOptions o;
  o.policy = UnmapPolicy::refuse;
  return o;
}

MemunmapOptions timeout_opts(std::chrono::nanoseconds t) {
  MemunmapOptions o;
  o.timeout = t;
  return o;
}

// A pfn as the library prints it ("0x...").
std::string fmt_pfn(Pfn p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(p));
  return buf;
}

// ---- memremap validation ------------------------------------------------------------------------

TEST_F(DevPagemapTest, MemremapRejectsNoRanges) {
  MemremapParams p;
  expect_rejected(p, Errc::invalid_argument);
}

TEST_F(DevPagemapTest, MemremapRejectsNullBacking) {
  auto b = make_backing(4 * kMiB);
  MemremapParams p = make_params(Strategy::transition, b);
  p.ranges.push_back(PagemapRangeSpec{nullptr, 0, 0});
  expect_rejected(p, Errc::invalid_argument);
  // The first range alone is fine.
  auto pg = must_memremap(make_params(Strategy::transition, b));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsBaseOrder3) {
  auto b = make_backing(4 * kMiB);
  expect_rejected(make_params(Strategy::transition, b, 3), Errc::invalid_argument);
  expect_rejected(make_params(Strategy::transition, b, 10), Errc::invalid_argument);
  auto pg = must_memremap(make_params(Strategy::transition, b, 0));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsPrivateWithoutPageFree) {
  auto b = make_backing(4 * kMiB);
  expect_rejected(make_params(Strategy::transition, b, 0, PagemapType::private_mem),
                  Errc::invalid_argument);
  FreeLog log;
  MemremapParams p = make_params(Strategy::transition, b, 0, PagemapType::private_mem);
  p.ops = log.ops();
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->type(), PagemapType::private_mem);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsRangesNotAlignedToTheBaseFolio) {
  auto b = make_backing(8 * kMiB);
  auto at = [&](std::uint64_t offset, std::uint64_t size) {
    MemremapParams p = make_params(Strategy::sweep, b, kPmdOrder);
    p.ranges[0].offset = offset;
    p.ranges[0].size = size;
    return p;
  };
  expect_rejected(at(kPageSize, 2 * kMiB), Errc::unaligned);
  expect_rejected(at(1 * kMiB, 2 * kMiB), Errc::unaligned);
  expect_rejected(at(2 * kMiB, 2 * kMiB + kPageSize), Errc::unaligned);
  expect_rejected(at(2 * kMiB, 1 * kMiB), Errc::unaligned);
  // Not even 4 KiB aligned, at base order 0.
  MemremapParams p = make_params(Strategy::sweep, b, 0);
  p.ranges[0].offset = 100;
  p.ranges[0].size = kPageSize;
  expect_rejected(std::move(p), Errc::unaligned);

  auto pg = must_memremap(at(2 * kMiB, 2 * kMiB));
  ASSERT_TRUE(pg);
  EXPECT_EQ(first_pfn(*pg), b->base_pfn() + 512);
  EXPECT_EQ(pg->total_pages(), 512u);
  EXPECT_EQ(pg->base_order(), kPmdOrder);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsRangesPastTheEndOfTheBacking) {
  auto b = make_backing(8 * kMiB);
  auto at = [&](std::uint64_t offset, std::uint64_t size) {
    MemremapParams p = make_params(Strategy::per_lookup, b);
    p.ranges[0].offset = offset;
    p.ranges[0].size = size;
    return p;
  };
  expect_rejected(at(6 * kMiB, 4 * kMiB), Errc::out_of_range);
  expect_rejected(at(0, 8 * kMiB + 2 * kMiB), Errc::out_of_range);
  expect_rejected(at(8 * kMiB, 0), Errc::out_of_range);
  expect_rejected(at(16 * kMiB, 2 * kMiB), Errc::out_of_range);

  auto pg = must_memremap(at(6 * kMiB, 2 * kMiB));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->range(0).end(), b->pfns().end());
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsOverlappingRangesOfOneRequest) {
  auto b = make_backing(8 * kMiB);
  MemremapParams p = make_params(Strategy::transition, b);
  p.ranges[0].size = 4 * kMiB;
  p.ranges.push_back(PagemapRangeSpec{b, 2 * kMiB, 4 * kMiB});
  expect_rejected(p, Errc::overlap);
  p.ranges[1].offset = 0;  // identical
  expect_rejected(p, Errc::overlap);

  p.ranges[1].offset = 4 * kMiB;  // adjacent is fine
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->nr_ranges(), 2u);
  EXPECT_EQ(pg->total_pages(), 2048u);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemremapRejectsOverlapWithALivePagemap) {
  auto b = make_backing(8 * kMiB);
  auto at = [&](std::uint64_t offset, std::uint64_t size) {
    MemremapParams p = make_params(Strategy::transition, b);
    p.ranges[0].offset = offset;
    p.ranges[0].size = size;
    return p;
  };
  auto first = must_memremap(at(2 * kMiB, 2 * kMiB));
  ASSERT_TRUE(first);
  const std::size_t count = pagemap_count();

  expect_rejected(at(2 * kMiB, 2 * kMiB), Errc::overlap);  // the same range
  expect_rejected(at(0, 4 * kMiB), Errc::overlap);         // its tail overlaps
  expect_rejected(at(2 * kMiB, 4 * kMiB), Errc::overlap);  // its head overlaps
  expect_rejected(at(0, 8 * kMiB), Errc::overlap);         // contains it
  {
    MemremapParams p = at(0, 2 * kMiB);  // a free range plus an overlapping one
    p.ranges.push_back(PagemapRangeSpec{b, 3 * kMiB, 1 * kMiB});
    expect_rejected(std::move(p), Errc::overlap);
  }
  EXPECT_EQ(pagemap_count(), count);
  {
    PagemapRef ref = get_dev_pagemap(b->base_pfn() + 512);
    EXPECT_EQ(ref.get(), first.get());
    EXPECT_FALSE(get_dev_pagemap(b->base_pfn()));  // the free range stayed free
  }

  // The free neighbours can be mapped; the same range once the first pagemap is gone.
  auto below = must_memremap(at(0, 2 * kMiB));
  ASSERT_TRUE(below);
  EXPECT_EQ(first->memunmap().code(), Errc::ok);
  auto again = must_memremap(at(2 * kMiB, 2 * kMiB));
  ASSERT_TRUE(again);
  EXPECT_NE(again.get(), first.get());
  {
    PagemapRef ref = get_dev_pagemap(b->base_pfn() + 512);
    EXPECT_EQ(ref.get(), again.get());
  }
  EXPECT_EQ(again->get_folio(b->base_pfn() + 512), Errc::ok);
  EXPECT_EQ(again->put_folio(b->base_pfn() + 512), Errc::ok);
  EXPECT_EQ(again->memunmap().code(), Errc::ok);
  EXPECT_EQ(below->memunmap().code(), Errc::ok);
}

TEST_P(StrategyTest, SameRangeCanBeMemremappedAfterMemunmap) {
  auto b = make_backing(4 * kMiB);
  for (int round = 0; round < 3; ++round) {
    auto pg = must_memremap(make_params(GetParam(), b));
    ASSERT_TRUE(pg);
    EXPECT_EQ(pg->state(), State::live);
    EXPECT_EQ(pg->strategy(), GetParam());
    PagemapRef ref = get_dev_pagemap(b->base_pfn());
    EXPECT_EQ(ref.get(), pg.get());
    ref.reset();
    EXPECT_EQ(pg->memunmap().code(), Errc::ok);
  }
}

// ---- lookups ------------------------------------------------------------------------------------

TEST_P(StrategyTest, GetDevPagemapFindsThePagemapAndHoldsAReference) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const PfnRange r = pg->range(0);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  {
    PagemapRef a = get_dev_pagemap(r.start);
    ASSERT_TRUE(a);
    EXPECT_EQ(a.get(), pg.get());
    EXPECT_EQ(pg->holders().pagemap_refs, 1);
    PagemapRef b = get_dev_pagemap(r.end() - 1);
    EXPECT_EQ(b.get(), pg.get());
    EXPECT_EQ(pg->holders().pagemap_refs, 2);

    // The reference is what a refusing memunmap sees.
    auto refused = pg->memunmap(refuse_opts());
    ASSERT_FALSE(refused);
    EXPECT_EQ(refused.code(), Errc::busy);
    ASSERT_NE(refused.error().holders(), nullptr);
    EXPECT_EQ(refused.error().holders()->pagemap_refs, 2);
    EXPECT_EQ(pg->state(), State::live);

    b.reset();
    EXPECT_EQ(pg->holders().pagemap_refs, 1);
    DevPagemap* raw = a.release();
    EXPECT_EQ(pg->holders().pagemap_refs, 1);  // release() hands the reference to the caller
    EXPECT_EQ(raw->put_ref(), Errc::ok);
  }
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_F(DevPagemapTest, GetDevPagemapOutsideAnyPagemapIsEmpty) {
  auto b = make_backing(8 * kMiB);
  MemremapParams p = make_params(Strategy::transition, b);
  p.ranges[0].offset = 2 * kMiB;
  p.ranges[0].size = 2 * kMiB;
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  const PfnRange r = pg->range(0);
  EXPECT_FALSE(get_dev_pagemap(r.start - 1));
  EXPECT_FALSE(get_dev_pagemap(r.end()));
  EXPECT_FALSE(get_dev_pagemap(b->base_pfn()));
  EXPECT_FALSE(get_dev_pagemap(b->pfns().end() - 1));
  EXPECT_FALSE(get_dev_pagemap(0));
  EXPECT_FALSE(get_dev_pagemap(~Pfn{0}));
  EXPECT_TRUE(get_dev_pagemap(r.start));
  EXPECT_TRUE(get_dev_pagemap(r.end() - 1));
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_P(StrategyTest, GetDevPagemapWithCachedPagemap) {
  auto a = map(GetParam());
  auto b = map(GetParam());
  ASSERT_TRUE(a && b);
  PagemapRef ref = get_dev_pagemap(first_pfn(*a));
  ASSERT_EQ(ref.get(), a.get());
  EXPECT_EQ(a->holders().pagemap_refs, 1);

  // Covered: the same pagemap, no new reference.
  ref = get_dev_pagemap(first_pfn(*a) + 777, std::move(ref));
  EXPECT_EQ(ref.get(), a.get());
  EXPECT_EQ(a->holders().pagemap_refs, 1);

  // Not covered: the cached reference is dropped and the other pagemap looked up.
  ref = get_dev_pagemap(first_pfn(*b) + 3, std::move(ref));
  EXPECT_EQ(ref.get(), b.get());
  EXPECT_EQ(a->holders().pagemap_refs, 0);
  EXPECT_EQ(b->holders().pagemap_refs, 1);

  // Not covered and nothing there: dropped, and empty.
  ref = get_dev_pagemap(0, std::move(ref));
  EXPECT_FALSE(ref);
  EXPECT_EQ(b->holders().pagemap_refs, 0);
  EXPECT_EQ(a->memunmap().code(), Errc::ok);
  EXPECT_EQ(b->memunmap().code(), Errc::ok);
}

// A cached pagemap that covers the pfn is returned even while it is dying: no new lookup (which
// would fail) is made.
TEST_P(SafeStrategyTest, CachedPagemapIsReturnedWithoutANewLookup) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  AsyncMemunmap unmap;
  PagemapRef ref = get_dev_pagemap(first_pfn(*pg));
  ASSERT_TRUE(ref);
  unmap.start(*pg);
  ASSERT_TRUE(eventually([&] { return pg->state() == State::dying; }));
  EXPECT_FALSE(get_dev_pagemap(first_pfn(*pg) + 1));  // a fresh lookup fails now
  ref = get_dev_pagemap(first_pfn(*pg) + 1, std::move(ref));
  EXPECT_EQ(ref.get(), pg.get());
  EXPECT_FALSE(unmap.done());
  ref.reset();
  EXPECT_EQ(unmap.join().code(), Errc::ok);
}

TEST_P(StrategyTest, LookupsFailAfterMemunmap) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const PfnRange r = pg->range(0);
  const std::size_t count = pagemap_count();
  ASSERT_TRUE(get_dev_pagemap(r.start));
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
  EXPECT_EQ(pagemap_count(), count - 1);
  EXPECT_FALSE(get_dev_pagemap(r.start));
  EXPECT_FALSE(get_dev_pagemap(r.start + r.count / 2));
  EXPECT_FALSE(get_dev_pagemap(r.end() - 1));
  EXPECT_FALSE(pg->tryget_live());
  EXPECT_EQ(pg->request(r.start, 1).code(), Errc::dead);
}

// ---- multi-range pagemaps -----------------------------------------------------------------------

void exercise_two_ranges(DevPagemap& pg, FreeLog& log) {
  ASSERT_EQ(pg.nr_ranges(), 2u);
  const PfnRange r0 = pg.range(0);
  const PfnRange r1 = pg.range(1);
  ASSERT_LT(r0.end(), r1.start) << "the test wants a gap between the ranges";
  const Pfn gap = r0.end();

  // contains() is exact at every edge.
  EXPECT_FALSE(pg.contains(r0.start - 1));
  EXPECT_TRUE(pg.contains(r0.start));
  EXPECT_TRUE(pg.contains(r0.end() - 1));
  EXPECT_FALSE(pg.contains(r0.end()));
  EXPECT_FALSE(pg.contains(r1.start - 1));
  EXPECT_TRUE(pg.contains(r1.start));
  EXPECT_TRUE(pg.contains(r1.end() - 1));
  EXPECT_FALSE(pg.contains(r1.end()));
  EXPECT_NE(pg.array_for(r0.start), nullptr);
  EXPECT_NE(pg.array_for(r1.start), nullptr);
  EXPECT_NE(pg.array_for(r0.start), pg.array_for(r1.start));
  EXPECT_EQ(pg.array_for(gap), nullptr);
  EXPECT_EQ(pg.total_pages(), r0.count + r1.count);

  // Folio operations on both ranges (under alloc_event, inside allocations).
  std::vector<FolioHold> holds(4);
  const Pfn pfns[4] = {r0.start, r0.end() - 1, r1.start, r1.end() - 1};
  for (std::size_t i = 0; i < 4; ++i)
    ASSERT_EQ(holds[i].take(pg, pfns[i]), Errc::ok) << i;
  for (Pfn p : pfns)
    EXPECT_EQ(pg.folio_ref_count(p), 1u);
  EXPECT_EQ(pg.pin_folio(r1.start + 1), Errc::ok);
  EXPECT_TRUE(pg.folio_maybe_dma_pinned(r1.start + 1));
  EXPECT_EQ(pg.unpin_folio(r1.start + 1), Errc::ok);
  EXPECT_EQ(pg.holders().total_busy, 4u);
  for (FolioHold& h : holds)
    EXPECT_EQ(h.release(), Errc::ok);
  EXPECT_EQ(log.count(), 5u);
  EXPECT_EQ(pg.holders().total_busy, 0u);

  // The gap is not part of the pagemap.
  EXPECT_EQ(pg.get_folio(gap), Errc::out_of_range);
  EXPECT_EQ(pg.put_folio(gap), Errc::out_of_range);
  EXPECT_EQ(pg.pin_folio(gap), Errc::out_of_range);
  EXPECT_EQ(pg.unpin_folio(gap), Errc::out_of_range);
  EXPECT_EQ(pg.get_folio(r1.start - 1), Errc::out_of_range);
  EXPECT_EQ(pg.folio_ref_count(gap), 0u);
  EXPECT_EQ(pg.request(gap, 1).code(), Errc::out_of_range);
  EXPECT_EQ(pg.request(r0.end() - 1, 2).code(), Errc::out_of_range);  // runs into the gap
  EXPECT_TRUE(pg.request(r1.start, r1.count));
  EXPECT_FALSE(get_dev_pagemap(gap));
  EXPECT_EQ(get_dev_pagemap(r0.end() - 1).get(), &pg);
  EXPECT_EQ(get_dev_pagemap(r1.start).get(), &pg);
}

TEST_P(StrategyTest, TwoRangesOfOneBacking) {
  auto b = make_backing(8 * kMiB);
  FreeLog log;
  MemremapParams p = make_params(GetParam(), b);
  p.ops = log.ops();
  p.ranges[0].size = 2 * kMiB;
  p.ranges.push_back(PagemapRangeSpec{b, 4 * kMiB, 2 * kMiB});
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  exercise_two_ranges(*pg, log);
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

TEST_P(StrategyTest, TwoRangesOfTwoBackings) {
  auto b0 = make_backing(2 * kMiB);
  auto b1 = make_backing(4 * kMiB);
  FreeLog log;
  MemremapParams p = make_params(GetParam(), b0);
  p.ops = log.ops();
  p.ranges.push_back(PagemapRangeSpec{b1, 0, 0});
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->range(1).start, b1->base_pfn());
  EXPECT_EQ(pg->address_of(b1->base_pfn() + 1), b1->data() + kPageSize);
  EXPECT_EQ(pg->address_of(b0->base_pfn()), b0->data());
  exercise_two_ranges(*pg, log);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

// ---- folio references ---------------------------------------------------------------------------

TEST_P(StrategyTest, GetPutAndRefCount) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 42;
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  ASSERT_EQ(pg->get_folio(pfn, 3), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 4u);
  EXPECT_EQ(pg->folio_ref_count(pfn + 1), 0u);  // 4 KiB folios: the neighbour is separate
  EXPECT_EQ(pg->holders().total_busy, 1u);
  ASSERT_EQ(pg->put_folio(pfn, 3), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  EXPECT_EQ(log.count(), 0u);
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
  ASSERT_EQ(log.count(), 1u);
  EXPECT_EQ(log.frees()[0].head, pfn);
  EXPECT_EQ(log.frees()[0].order, 0u);
  // A second busy period frees again.
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  EXPECT_EQ(log.count(), 2u);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);  // nothing left behind
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_P(StrategyTest, PutBelowZeroIsUnderflowAndChangesNothing) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 7;
  EXPECT_EQ(pg->put_folio(pfn), Errc::underflow);
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
  EXPECT_EQ(misuse_.reported(), 1u);
  EXPECT_EQ(misuse_.last(), Errc::underflow);

  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  const std::int64_t refs = pg->holders().pagemap_refs;
  EXPECT_EQ(pg->put_folio(pfn, 2), Errc::underflow);
  EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  EXPECT_EQ(pg->holders().pagemap_refs, refs);
  EXPECT_EQ(misuse_.reported(), 2u);
  EXPECT_EQ(log.count(), 0u);
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  EXPECT_EQ(log.count(), 1u);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_P(StrategyTest, OutOfRangePfn) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const PfnRange r = pg->range(0);
  for (Pfn pfn : {r.start - 1, r.end(), r.end() + 512, Pfn{0}}) {
    EXPECT_EQ(pg->get_folio(pfn), Errc::out_of_range);
    EXPECT_EQ(pg->put_folio(pfn), Errc::out_of_range);
    EXPECT_EQ(pg->pin_folio(pfn), Errc::out_of_range);
    EXPECT_EQ(pg->unpin_folio(pfn), Errc::out_of_range);
    EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
    EXPECT_FALSE(pg->folio_maybe_dma_pinned(pfn));
    EXPECT_FALSE(pg->contains(pfn));
    EXPECT_EQ(pg->array_for(pfn), nullptr);
    EXPECT_EQ(pg->address_of(pfn), nullptr);
  }
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

// A 2 MiB folio built from 4 KiB base pages: every pfn of it acts on the head, and page_free sees
// the head and order 9 once.
TEST_P(StrategyTest, LargeFolioOfBasePagesActsOnItsHead) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
  ASSERT_TRUE(pg);
  const Pfn head = first_pfn(*pg) + 512;
  PageArray* a = pg->array_for(head);
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->set_folio_order(a->index_of(head), kPmdOrder), Errc::ok);

  ASSERT_EQ(pg->get_folio(head + 17), Errc::ok);
  ASSERT_EQ(pg->get_folio(head + 511), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(head), 2u);
  EXPECT_EQ(pg->folio_ref_count(head + 300), 2u);
  EXPECT_EQ(a->ref(a->index_of(head)).load(), 2u);
  EXPECT_EQ(a->ref(a->index_of(head + 17)).load(), 0u);  // tails keep refcount 0
  EXPECT_EQ(pg->folio_ref_count(head - 1), 0u);          // outside the folio
  EXPECT_EQ(pg->folio_ref_count(head + 512), 0u);
  HolderReport rep = pg->holders();
  ASSERT_EQ(rep.total_busy, 1u);
  EXPECT_EQ(rep.busy[0].pfn, head);
  EXPECT_EQ(rep.busy[0].order, kPmdOrder);
  ASSERT_EQ(pg->put_folio(head + 300), Errc::ok);
  EXPECT_EQ(log.count(), 0u);
  ASSERT_EQ(pg->put_folio(head), Errc::ok);
  ASSERT_EQ(log.count(), 1u);
  EXPECT_EQ(log.frees()[0].head, head);
  EXPECT_EQ(log.frees()[0].order, kPmdOrder);
  // Split back: base pages again.
  ASSERT_EQ(a->set_folio_order(a->index_of(head), 0), Errc::ok);
  ASSERT_EQ(pg->get_folio(head + 17), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(head), 0u);
  EXPECT_EQ(pg->folio_ref_count(head + 17), 1u);
  ASSERT_EQ(pg->put_folio(head + 17), Errc::ok);
  EXPECT_EQ(log.frees().back().head, head + 17);
  EXPECT_EQ(log.frees().back().order, 0u);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_P(StrategyTest, BaseOrder9FolioRefsLandOnTheHead) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, kPmdOrder, log.ops());
  ASSERT_TRUE(pg);
  const Pfn head = first_pfn(*pg) + 512;  // second 2 MiB folio
  ASSERT_EQ(pg->get_folio(head + 5), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(head), 1u);
  EXPECT_EQ(pg->folio_ref_count(head + 511), 1u);
  EXPECT_EQ(pg->folio_ref_count(head - 1), 0u);
  ASSERT_EQ(pg->put_folio(head + 511), Errc::ok);
  ASSERT_EQ(log.count(), 1u);
  EXPECT_EQ(log.frees()[0].head, head);
  EXPECT_EQ(log.frees()[0].order, kPmdOrder);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

// ---- pins ---------------------------------------------------------------------------------------

TEST_P(StrategyTest, PinOfASmallFolioAddsTheBias) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 9;
  EXPECT_FALSE(pg->folio_maybe_dma_pinned(pfn));
  ASSERT_EQ(pg->pin_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), PageArray::kPinBias);
  EXPECT_TRUE(pg->folio_maybe_dma_pinned(pfn));
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), PageArray::kPinBias + 1);
  HolderReport rep = pg->holders();
  ASSERT_EQ(rep.busy.size(), 1u);
  EXPECT_EQ(rep.busy[0].pincount, 1u);
  ASSERT_EQ(pg->unpin_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  EXPECT_FALSE(pg->folio_maybe_dma_pinned(pfn));
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  EXPECT_EQ(log.count(), 1u);
  // pin then unpin alone is a whole busy period.
  ASSERT_EQ(pg->pin_folio(pfn), Errc::ok);
  ASSERT_EQ(pg->unpin_folio(pfn), Errc::ok);
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
  EXPECT_EQ(log.count(), 2u);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

void expect_large_pin(DevPagemap& pg, Pfn head, FreeLog& log) {
  PageArray* a = pg.array_for(head);
  ASSERT_NE(a, nullptr);
  const std::uint64_t e = a->index_of(head);
  ASSERT_EQ(pg.pin_folio(head + 100), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(head), 1u);  // exactly one, no bias
  EXPECT_EQ(a->pincount(e).load(), 1u);
  EXPECT_TRUE(pg.folio_maybe_dma_pinned(head + 3));
  ASSERT_EQ(pg.pin_folio(head), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(head), 2u);
  EXPECT_EQ(a->pincount(e).load(), 2u);
  HolderReport rep = pg.holders();
  ASSERT_EQ(rep.busy.size(), 1u);
  EXPECT_EQ(rep.busy[0].pincount, 2u);
  ASSERT_EQ(pg.unpin_folio(head + 511), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(head), 1u);
  EXPECT_EQ(a->pincount(e).load(), 1u);
  EXPECT_TRUE(pg.folio_maybe_dma_pinned(head));
  ASSERT_EQ(pg.unpin_folio(head), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(head), 0u);
  EXPECT_EQ(a->pincount(e).load(), 0u);
  EXPECT_FALSE(pg.folio_maybe_dma_pinned(head));
  ASSERT_EQ(log.count(), 1u);
  EXPECT_EQ(log.frees()[0].head, head);
  EXPECT_EQ(log.frees()[0].order, kPmdOrder);
}

TEST_P(StrategyTest, PinOfALargeFolioIsExact) {
  {
    FreeLog log;
    auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
    ASSERT_TRUE(pg);
    const Pfn head = first_pfn(*pg) + 512;
    PageArray* a = pg->array_for(head);
    ASSERT_NE(a, nullptr);
    ASSERT_EQ(a->set_folio_order(a->index_of(head), kPmdOrder), Errc::ok);
    expect_large_pin(*pg, head, log);
    EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
  }
  {
    FreeLog log;
    auto pg = map(GetParam(), 4 * kMiB, kPmdOrder, log.ops());
    ASSERT_TRUE(pg);
    expect_large_pin(*pg, first_pfn(*pg), log);
    EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
  }
  EXPECT_EQ(misuse_.reported(), 0u);
}

TEST_P(StrategyTest, UnpinOfAnUnpinnedFolioIsUnderflow) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn small = first_pfn(*pg) + 1;
  const Pfn head = first_pfn(*pg) + 512;
  PageArray* a = pg->array_for(head);
  ASSERT_EQ(a->set_folio_order(a->index_of(head), kPmdOrder), Errc::ok);

  EXPECT_EQ(pg->unpin_folio(small), Errc::underflow);  // idle
  EXPECT_EQ(pg->folio_ref_count(small), 0u);
  EXPECT_EQ(misuse_.reported(), 1u);
  ASSERT_EQ(pg->get_folio(small), Errc::ok);
  EXPECT_EQ(pg->unpin_folio(small), Errc::underflow);  // referenced but not pinned
  EXPECT_EQ(pg->folio_ref_count(small), 1u);
  EXPECT_EQ(misuse_.reported(), 2u);

  EXPECT_EQ(pg->unpin_folio(head), Errc::underflow);
  EXPECT_EQ(pg->folio_ref_count(head), 0u);
  ASSERT_EQ(pg->get_folio(head), Errc::ok);
  EXPECT_EQ(pg->unpin_folio(head + 1), Errc::underflow);
  EXPECT_EQ(pg->folio_ref_count(head), 1u);
  EXPECT_EQ(a->pincount(a->index_of(head)).load(), 0u);
  EXPECT_EQ(misuse_.reported(), 4u);
  EXPECT_EQ(misuse_.last(), Errc::underflow);

  ASSERT_EQ(pg->put_folio(small), Errc::ok);
  ASSERT_EQ(pg->put_folio(head), Errc::ok);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_P(StrategyTest, PinOfAPoisonedFolioIsRefused) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn small = first_pfn(*pg) + 1;
  const Pfn head = first_pfn(*pg) + 512;
  PageArray* a = pg->array_for(head);
  ASSERT_EQ(a->set_folio_order(a->index_of(head), kPmdOrder), Errc::ok);
  a->flags(a->index_of(small)).fetch_or(kPagePoisoned);
  a->flags(a->index_of(head)).fetch_or(kPagePoisoned);

  EXPECT_EQ(pg->pin_folio(small), Errc::poisoned);
  EXPECT_EQ(pg->folio_ref_count(small), 0u);
  EXPECT_EQ(pg->pin_folio(head + 200), Errc::poisoned);  // the head's flag covers the folio
  EXPECT_EQ(pg->folio_ref_count(head), 0u);
  EXPECT_EQ(a->pincount(a->index_of(head)).load(), 0u);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->pin_folio(small + 1), Errc::ok);  // its neighbour is fine
  EXPECT_EQ(pg->unpin_folio(small + 1), Errc::ok);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

// ---- memunmap -----------------------------------------------------------------------------------

TEST_P(StrategyTest, MemunmapKillsOnceThenAlreadyDead) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  auto stats = pg->memunmap();
  ASSERT_TRUE(stats) << stats.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);
  EXPECT_GE(stats->total_seconds, 0.0);
  auto again = pg->memunmap();
  ASSERT_FALSE(again);
  EXPECT_EQ(again.code(), Errc::already_dead);
  EXPECT_EQ(pg->state(), State::dead);
  EXPECT_FALSE(get_dev_pagemap(first_pfn(*pg)));
}

void expect_holder_report(const Error& err, Pfn pfn, std::uint32_t refcount, Strategy s) {
  const HolderReport* rep = err.holders();
  ASSERT_NE(rep, nullptr) << err.to_string();
  EXPECT_EQ(rep->total_busy, 1u);
  ASSERT_EQ(rep->busy.size(), 1u);
  EXPECT_EQ(rep->busy[0].pfn, pfn);
  EXPECT_EQ(rep->busy[0].refcount, refcount);
  EXPECT_NE(rep->object.find(strategy_name(s)), std::string::npos) << rep->object;
  EXPECT_NE(err.message().find(fmt_pfn(pfn)), std::string::npos) << err.message();
}

// Pagemap is live and usable, as before a failed memunmap.
void expect_live_again(DevPagemap& pg, Pfn idle) {
  EXPECT_EQ(pg.state(), State::live);
  PagemapRef ref = get_dev_pagemap(idle);
  EXPECT_EQ(ref.get(), &pg);
  ref.reset();
  EXPECT_TRUE(pg.tryget_live());
  EXPECT_EQ(pg.put_ref(), Errc::ok);
  // "Exactly as before" includes the cost of the pagemap reference: back in percpu mode.
  EXPECT_TRUE(pg.ref_is_percpu());
  FolioHold h;
  EXPECT_EQ(h.take(pg, idle), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(idle), 1u);
  EXPECT_EQ(h.release(), Errc::ok);
  EXPECT_EQ(pg.folio_ref_count(idle), 0u);
}

TEST_P(SafeStrategyTest, RefuseWithAFolioHeldIsBusyAndStaysLive) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 100;
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto r = pg->memunmap(refuse_opts());
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), Errc::busy);
    expect_holder_report(r.error(), pfn, 1, GetParam());
    expect_live_again(*pg, pfn + 1);
    EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  }
  ASSERT_EQ(hold.release(), Errc::ok);
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
  EXPECT_EQ(pg->state(), State::dead);
}

TEST_P(SafeStrategyTest, TimeoutWithAFolioHeldReportsHoldersAndStaysLive) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 1000;
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = pg->memunmap(timeout_opts(50ms));
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::timed_out);
  EXPECT_GE(waited, 50ms);
  expect_holder_report(r.error(), pfn, 1, GetParam());
  expect_live_again(*pg, pfn - 1);
  // Twice, to show the revived pagemap can time out again.
  r = pg->memunmap(timeout_opts(10ms));
  EXPECT_EQ(r.code(), Errc::timed_out);
  expect_live_again(*pg, pfn + 1);
  ASSERT_EQ(hold.release(), Errc::ok);
  EXPECT_EQ(pg->memunmap(timeout_opts(10s)).code(), Errc::ok);
}

TEST_P(SafeStrategyTest, MemunmapWaitsForAFolioReleasedByAnotherThread) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 5;
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
  std::atomic<bool> released{false};
  std::atomic<bool> saw_dying{false};
  std::thread releaser([&] {
    saw_dying = eventually([&] { return pg->state() == State::dying; });
    std::this_thread::sleep_for(20ms);
    released = true;
    EXPECT_EQ(hold.release(), Errc::ok);
  });
  auto stats = pg->memunmap();
  const bool was_released = released.load();
  releaser.join();
  ASSERT_TRUE(stats) << stats.error().to_string();
  EXPECT_TRUE(saw_dying.load());
  EXPECT_TRUE(was_released) << "memunmap returned while the folio was still held";
  EXPECT_EQ(pg->state(), State::dead);
  const TeardownStats& s = *stats;
  EXPECT_GE(s.total_seconds, 0.019);
  EXPECT_GE(s.drain_seconds + s.sweep_seconds, 0.010);
  EXPECT_GE(s.total_seconds, s.drain_seconds);
  EXPECT_GE(s.total_seconds, s.sweep_seconds);
  EXPECT_GE(s.total_seconds + 1e-6,
            s.kill_seconds + s.drain_seconds + s.sweep_seconds + s.teardown_seconds);
  EXPECT_GE(s.kill_seconds, 0.0);
  EXPECT_GE(s.teardown_seconds, 0.0);
  if (GetParam() == Strategy::sweep) {
    EXPECT_GE(s.sweep_seconds, 0.010);
    EXPECT_EQ(s.waited_folios, 1u);
  } else {
    EXPECT_EQ(s.sweep_seconds, 0.0);
    EXPECT_GE(s.drain_seconds, 0.010);
  }
}

// Once memunmap has killed the pagemap (state dying, waiting for a held folio), no idle folio can
// become busy and no new pagemap reference can be taken, under every safe strategy.
TEST_P(SafeStrategyTest, AfterKillIdleFoliosCannotBecomeBusy) {
  FreeLog log;
  auto pg = map(GetParam(), 4 * kMiB, 0, log.ops());
  ASSERT_TRUE(pg);
  const Pfn held = first_pfn(*pg) + 10;
  const Pfn idle = first_pfn(*pg) + 11;
  AsyncMemunmap unmap;
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, held), Errc::ok);
  unmap.start(*pg);
  ASSERT_TRUE(eventually([&] { return pg->state() == State::dying; }));

  // (What wrongly succeeds is undone at once, so that the memunmap can still finish.)
  Errc e = pg->get_folio(idle);
  EXPECT_EQ(e, Errc::dead);
  if (e == Errc::ok) (void)pg->put_folio(idle);
  e = pg->get_folio(idle, 5);
  EXPECT_EQ(e, Errc::dead);
  if (e == Errc::ok) (void)pg->put_folio(idle, 5);
  e = pg->pin_folio(idle);
  EXPECT_EQ(e, Errc::dead);
  if (e == Errc::ok) (void)pg->unpin_folio(idle);
  EXPECT_EQ(pg->folio_ref_count(idle), 0u);
  bool got = pg->tryget_live();
  EXPECT_FALSE(got);
  if (got) {
    EXPECT_EQ(pg->put_ref(), Errc::ok);
  }
  EXPECT_EQ(pg->request(idle, 1).code(), Errc::dead);
  EXPECT_FALSE(get_dev_pagemap(idle));
  if (!HasFailure()) {
    EXPECT_EQ(log.count(), 0u);  // a refused get is not a busy period
  }
  EXPECT_FALSE(unmap.done());

  ASSERT_EQ(hold.release(), Errc::ok);
  auto r = unmap.join();
  EXPECT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);
  if (!HasFailure()) {
    EXPECT_EQ(log.count(), 1u);
  }
}

// The free path of the last reference (page_free is handed the pagemap) runs while the pagemap
// still exists: a memunmap that starts while it runs must not return, and let the owner free the
// pagemap, before it has finished. The sleep stands for the putting thread being preempted there.
TEST_P(SafeStrategyTest, MemunmapWaitsForAPageFreeInProgress) {
  std::atomic<int> frees{0};
  std::atomic<bool> in_free{false};
  PagemapOps ops;
  ops.page_free = [&](DevPagemap& pg, Pfn, unsigned) {
    in_free = true;
    std::this_thread::sleep_for(50ms);
    EXPECT_NE(pg.state(), State::dead) << "page_free still running on an unmapped pagemap";
    frees.fetch_add(1);
    in_free = false;
  };
  auto pg = map(GetParam(), 4 * kMiB, 0, ops);
  ASSERT_TRUE(pg);
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, first_pfn(*pg)), Errc::ok);
  std::thread putter([&] { EXPECT_EQ(hold.release(), Errc::ok); });
  ASSERT_TRUE(eventually([&] { return in_free.load(); }));
  auto r = pg->memunmap();
  EXPECT_TRUE(r) << r.error().to_string();
  EXPECT_FALSE(in_free.load()) << "memunmap returned while page_free was running";
  EXPECT_EQ(frees.load(), 1);
  putter.join();
}

// A get that lands while another thread's last put is still running the folio's free path (sweep
// and alloc_event: the refcount reads FREEING) is a legitimate re-use of an idle folio, e.g. a
// fault racing the zap of the previous mapping: it must succeed once the free path ends, not
// fail (it used to return Errc::busy, which devdax turned into a SIGBUS on a live device; found
// by pgmap-stress under ASan).
TEST_P(SafeStrategyTest, GetDuringAnotherPutsFreePathWaitsAndSucceeds) {
  std::atomic<bool> in_free{false};
  std::atomic<int> frees{0};
  PagemapOps ops;
  ops.page_free = [&](DevPagemap&, Pfn, unsigned) {
    if (frees.fetch_add(1) == 0) {
      in_free = true;
      std::this_thread::sleep_for(50ms);  // the putting thread preempted inside page_free
      in_free = false;
    }
  };
  auto pg = map(GetParam(), 4 * kMiB, 0, ops);
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg);
  // Both references are taken the way the strategy's users take them (under alloc_event inside an
  // allocation), and the pagemap stays live throughout.
  FolioHold first;
  ASSERT_EQ(first.take(*pg, pfn), Errc::ok);
  std::thread putter([&] { EXPECT_EQ(first.release(), Errc::ok); });
  ASSERT_TRUE(eventually([&] { return in_free.load(); }));
  FolioHold second;
  EXPECT_EQ(second.take(*pg, pfn), Errc::ok) << "a get racing a free path must not fail";
  EXPECT_EQ(pg->folio_ref_count(pfn), 1u);
  putter.join();
  EXPECT_EQ(second.release(), Errc::ok);
  EXPECT_EQ(frees.load(), 2);
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
}

// `none` is unsafe on purpose: memunmap does not wait for anything.
TEST_F(DevPagemapTest, NoneMemunmapReturnsAtOnceWithAFolioHeld) {
  auto pg = map(Strategy::none);
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg);
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  ASSERT_EQ(pg->folio_ref_count(pfn), 1u);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = pg->memunmap();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);  // with the folio still "held": the bug
  EXPECT_EQ(r->drain_seconds, 0.0);
  EXPECT_EQ(r->sweep_seconds, 0.0);
  // The reference is leaked on purpose: the metadata it points into is gone.
}

TEST_F(DevPagemapTest, NoneWithQuarantineDetectsTheLatePut) {
  auto pg = map(Strategy::none, 4 * kMiB, 0, {}, PagemapType::fs_dax, true);
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 3;
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(pg->late_accesses(), 0u);
  EXPECT_EQ(pg->put_folio(pfn), Errc::use_after_teardown);
  EXPECT_EQ(pg->late_accesses(), 1u);
  EXPECT_EQ(pg->folio_ref_count(pfn), PageArray::kRetiredRef);  // still reads as retired
  EXPECT_EQ(pg->get_folio(pfn), Errc::use_after_teardown);
  EXPECT_EQ(pg->late_accesses(), 2u);
  EXPECT_EQ(pg->folio_ref_count(pfn), PageArray::kRetiredRef);
}

// ---- alloc_event --------------------------------------------------------------------------------

TEST_F(DevPagemapTest, RequestReturnsAnAllocationHoldingAPagemapReference) {
  auto pg = map(Strategy::alloc_event);
  ASSERT_TRUE(pg);
  const Pfn first = first_pfn(*pg) + 16;
  {
    auto a = pg->request(first, 32);
    ASSERT_TRUE(a) << a.error().to_string();
    EXPECT_TRUE(*a);
    EXPECT_EQ(a->first(), first);
    EXPECT_EQ(a->count(), 32u);
    EXPECT_EQ(a->pagemap(), pg.get());
    EXPECT_EQ(pg->holders().pagemap_refs, 1);
    DevPagemap::Allocation moved = std::move(a).value();
    EXPECT_TRUE(moved);
    EXPECT_EQ(pg->holders().pagemap_refs, 1);
    auto whole = pg->request(first_pfn(*pg), pg->total_pages());
    ASSERT_TRUE(whole);
    EXPECT_EQ(pg->holders().pagemap_refs, 2);
    moved = std::move(whole).value();  // drops the first allocation
    EXPECT_EQ(pg->holders().pagemap_refs, 1);
    moved.reset();
    EXPECT_FALSE(moved);
    EXPECT_EQ(pg->holders().pagemap_refs, 0);
  }
  EXPECT_EQ(pg->memunmap(refuse_opts()).code(), Errc::ok);
}

TEST_F(DevPagemapTest, MemunmapWaitsForTheAllocation) {
  auto pg = map(Strategy::alloc_event);
  ASSERT_TRUE(pg);
  AsyncMemunmap unmap;
  auto a = pg->request(first_pfn(*pg), 8);
  ASSERT_TRUE(a);
  unmap.start(*pg);
  ASSERT_TRUE(eventually([&] { return pg->state() == State::dying; }));
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(unmap.done());
  EXPECT_EQ(pg->state(), State::dying);
  { DevPagemap::Allocation dropped = std::move(a).value(); }
  auto r = unmap.join();
  EXPECT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);
}

TEST_P(StrategyTest, RequestErrors) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const PfnRange r = pg->range(0);
  EXPECT_EQ(pg->request(r.start - 1, 1).code(), Errc::out_of_range);
  EXPECT_EQ(pg->request(r.end(), 1).code(), Errc::out_of_range);
  EXPECT_EQ(pg->request(r.end() - 1, 2).code(), Errc::out_of_range);
  EXPECT_EQ(pg->request(r.start, r.count + 1).code(), Errc::out_of_range);
  EXPECT_EQ(pg->request(r.start, ~std::uint64_t{0}).code(), Errc::out_of_range);
  EXPECT_EQ(pg->request(r.start, 0).code(), Errc::invalid_argument);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_TRUE(pg->request(r.end() - 1, 1));
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(pg->request(r.start, 1).code(), Errc::dead);
}

// ---- diagnostics --------------------------------------------------------------------------------

TEST_P(StrategyTest, DescribeAndHoldersNameStrategyAndType) {
  for (PagemapType type : {PagemapType::fs_dax, PagemapType::generic, PagemapType::private_mem}) {
    FreeLog log;
    MemremapParams p = make_params(GetParam(), make_backing(2 * kMiB), 0, type);
    p.ops = log.ops();
    p.name = "dev-under-test";
    auto pg = must_memremap(std::move(p));
    ASSERT_TRUE(pg);
    const std::string d = pg->describe();
    EXPECT_NE(d.find("dev-under-test"), std::string::npos) << d;
    EXPECT_NE(d.find(strategy_name(GetParam())), std::string::npos) << d;
    EXPECT_NE(d.find(pagemap_type_name(type)), std::string::npos) << d;
    const Pfn pfn = first_pfn(*pg) + 2;
    FolioHold hold;
    ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
    HolderReport rep = pg->holders();
    EXPECT_EQ(rep.object, d);
    const std::string s = rep.to_string();
    EXPECT_NE(s.find(strategy_name(GetParam())), std::string::npos) << s;
    EXPECT_NE(s.find(pagemap_type_name(type)), std::string::npos) << s;
    EXPECT_NE(s.find(fmt_pfn(pfn)), std::string::npos) << s;
    ASSERT_EQ(hold.release(), Errc::ok);
    ASSERT_TRUE(pg->memunmap());
  }
  // The default name is the pfn span.
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  EXPECT_NE(pg->name().find(fmt_pfn(first_pfn(*pg))), std::string::npos) << pg->name();
  ASSERT_TRUE(pg->memunmap());
}

// ---- FS_DAX wake-ups (I16) ----------------------------------------------------------------------

// A thread that waits, with no deadline, until a folio's refcount reads 0 (wait_var_event on its
// address, as memunmap's scan and the model's scan do): without the wake-up under test it would
// sleep forever. start() returns whether it registered in the wait table; woken_within() whether
// the wake-up came, and joins it either way (waking it by hand if it did not come: the condition
// holds by then in every caller).
class IdleWaiter {
 public:
  explicit IdleWaiter(std::atomic<std::uint32_t>& ref) : ref_(ref) {}
  IdleWaiter(const IdleWaiter&) = delete;
  IdleWaiter& operator=(const IdleWaiter&) = delete;
  ~IdleWaiter() {
    // An early test failure: let the thread finish if it can; otherwise std::thread's destructor
    // ends the test process, as a bare std::thread did.
    if (thread_.joinable() && ref_.load() == 0) (void)woken_within(0ms);
  }

  [[nodiscard]] bool start() {
    const std::uint32_t before = WaitTable::global().waiters(&ref_);
    thread_ = std::thread([this] {
      EXPECT_EQ(wait_var_event(&ref_, [this] { return ref_.load() == 0; }), Errc::ok);
      woken_ = true;
    });
    return eventually([&] { return WaitTable::global().waiters(&ref_) > before; });
  }
  bool woken() const { return woken_.load(); }
  [[nodiscard]] bool woken_within(std::chrono::milliseconds limit = 10s) {
    const bool ok = eventually([&] { return woken_.load(); }, limit);
    if (!ok) wake_up_var(&ref_);  // let the thread finish
    thread_.join();
    return ok;
  }

 private:
  std::atomic<std::uint32_t>& ref_;
  std::atomic<bool> woken_{false};
  std::thread thread_;
};

TEST_P(StrategyTest, FsDaxFinalPutWakesWaiters) {
  auto pg = map(GetParam());
  ASSERT_TRUE(pg);
  const Pfn pfn = first_pfn(*pg) + 64;
  PageArray* a = pg->array_for(pfn);
  ASSERT_NE(a, nullptr);
  std::atomic<std::uint32_t>& ref = a->ref(a->index_of(pfn));
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);  // two references: the first put must not be final

  IdleWaiter waiter(ref);
  ASSERT_TRUE(waiter.start());
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  std::this_thread::sleep_for(5ms);
  EXPECT_FALSE(waiter.woken());  // still referenced
  ASSERT_EQ(hold.release(), Errc::ok);
  EXPECT_TRUE(waiter.woken_within())
      << "the final put_folio of an FS_DAX folio did not wake its waiter";
  ASSERT_TRUE(pg->memunmap());
}

// The lean last put (sweep / alloc_event on a pagemap without page_free, not FS_DAX: no FREEING
// state) must wake whoever waits on the folio once a kill is under way, reading nothing of the
// pagemap after its refcount reached 0 (L2: the process-wide killed count). The waiter here has no
// deadline, as the model's scan: without L2's wake-up it would sleep forever (memunmap's own
// scan would only notice at its 10 ms safety-net re-check).
class LeanLastPutTest : public ::testing::TestWithParam<Strategy> {};

INSTANTIATE_TEST_SUITE_P(LeanProtocol, LeanLastPutTest,
                         ::testing::Values(Strategy::sweep, Strategy::alloc_event),
                         testutil::strategy_param_name);

TEST_P(LeanLastPutTest, LastPutAfterTheKillWakesAWaiter) {
  const std::uint32_t killed_before = DevPagemap::killed_pagemap_count();
  auto pg = testutil::must_memremap(testutil::make_params(
      GetParam(), testutil::make_backing(4 * kPmdSize), 0, PagemapType::generic));
  const Pfn pfn = pg->range(0).start + 64;
  PageArray* a = pg->array_for(pfn);
  ASSERT_NE(a, nullptr);
  std::atomic<std::uint32_t>& ref = a->ref(a->index_of(pfn));
  FolioHold hold;
  ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
  ASSERT_EQ(pg->get_folio(pfn), Errc::ok);  // two references: the first put is not the last
  ASSERT_EQ(pg->kill(), Errc::ok);
  EXPECT_EQ(DevPagemap::killed_pagemap_count(), killed_before + 1);

  IdleWaiter waiter(ref);
  ASSERT_TRUE(waiter.start());
  ASSERT_EQ(pg->put_folio(pfn), Errc::ok);
  std::this_thread::sleep_for(5ms);
  EXPECT_FALSE(waiter.woken());  // still referenced
  ASSERT_EQ(hold.release(), Errc::ok);
  EXPECT_TRUE(waiter.woken_within())
      << "the last put of a killed pagemap's folio did not wake its waiter";
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(DevPagemap::killed_pagemap_count(), killed_before);  // torn down: no longer counted
}

// The killed count follows every way out of the killed state: teardown (above), a memunmap that
// gives up (revive), and the destructor of a pagemap whose teardown did not complete.
TEST(LeanLastPut, KilledCountFollowsReviveAndDestruction) {
  const std::uint32_t killed_before = DevPagemap::killed_pagemap_count();
  {
    auto pg = testutil::must_memremap(testutil::make_params(
        Strategy::sweep, testutil::make_backing(4 * kPmdSize), 0, PagemapType::generic));
    const Pfn pfn = pg->range(0).start;
    FolioHold hold;
    ASSERT_EQ(hold.take(*pg, pfn), Errc::ok);
    MemunmapOptions o;
    o.timeout = 20ms;
    auto r = pg->memunmap(o);  // the held folio makes it time out; the pagemap is live again
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), Errc::timed_out);
    EXPECT_EQ(pg->state(), State::live);
    EXPECT_EQ(DevPagemap::killed_pagemap_count(), killed_before);
    ASSERT_EQ(pg->kill(), Errc::ok);  // killed, then destroyed while the folio is still held
    EXPECT_EQ(DevPagemap::killed_pagemap_count(), killed_before + 1);
    ASSERT_EQ(hold.release(), Errc::ok);
  }  // ~DevPagemap completes the teardown
  EXPECT_EQ(DevPagemap::killed_pagemap_count(), killed_before);
}

}  // namespace
}  // namespace pgmap

namespace pgmap {
namespace {

// Regression: a pagemap that was kill()ed and then destroyed without memunmap stayed published
// in the pfn index, and the next lookup read freed memory. Destroying it must unpublish it.
TEST(DevPagemapLifetime, DestroyingAKilledPagemapUnpublishesIt) {
  std::shared_ptr<DevPagemap> pgmap = testutil::must_memremap(
      testutil::make_params(Strategy::transition, testutil::make_backing(4 * kPmdSize)));
  ASSERT_NE(pgmap, nullptr);
  Pfn pfn = pgmap->range(0).start + 3;
  const std::size_t published = pagemap_count();
  ASSERT_EQ(pgmap->kill(), Errc::ok);
  EXPECT_EQ(pgmap->state(), DevPagemap::State::dying);
  EXPECT_FALSE(get_dev_pagemap(pfn));
  pgmap.reset();
  EXPECT_EQ(pagemap_count(), published - 1);
  EXPECT_FALSE(get_dev_pagemap(pfn));  // under ASan the old bug was a heap-use-after-free here
}

}  // namespace
}  // namespace pgmap

namespace pgmap {
namespace {

// Destroying the last handle of a pagemap that is still held waits (it must not free under the
// holder) but never silently: every 5 s it names the holder on stderr.
TEST(DevPagemapLifetime, DestructorWaitingForAHolderReportsIt) {
  std::shared_ptr<DevPagemap> pgmap = testutil::must_memremap(
      testutil::make_params(Strategy::transition, testutil::make_backing(4 * kPmdSize)));
  ASSERT_NE(pgmap, nullptr);
  DevPagemap* raw = pgmap.get();
  const Pfn pfn = raw->range(0).start + 9;
  ASSERT_EQ(raw->get_folio(pfn), Errc::ok);

  ::testing::internal::CaptureStderr();
  std::atomic<bool> destroyed{false};
  std::thread owner([&] {
    pgmap.reset();  // the destructor's memunmap waits for our folio reference
    destroyed.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(5600));
  EXPECT_FALSE(destroyed.load());
  EXPECT_EQ(raw->put_folio(pfn), Errc::ok);  // the holder lets go: the destructor finishes
  owner.join();
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(destroyed.load());
  EXPECT_NE(err.find("still waiting"), std::string::npos) << err;
  EXPECT_NE(err.find(fmt::format("pfn {:#x}", pfn)), std::string::npos) << err;
}

}  // namespace
}  // namespace pgmap

namespace pgmap {
namespace {

using namespace std::chrono_literals;
using State = DevPagemap::State;
using testutil::bounded_call;
using testutil::FolioHold;
using testutil::make_backing;
using testutil::make_params;
using testutil::must_memremap;

constexpr std::uint64_t kMiB2 = std::uint64_t{1} << 20;

class TeardownMisuseTest : public ::testing::TestWithParam<Strategy> {
 protected:
  void SetUp() override { published_before_ = pagemap_count(); }
  void TearDown() override { EXPECT_EQ(pagemap_count(), published_before_); }
  testutil::MisuseCounter misuse_;
  std::size_t published_before_ = 0;
};
INSTANTIATE_TEST_SUITE_P(AllStrategies, TeardownMisuseTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_param_name);
class SafeTeardownTest : public TeardownMisuseTest {};
INSTANTIATE_TEST_SUITE_P(SafeStrategies, SafeTeardownTest, ::testing::ValuesIn(kSafeStrategies),
                         testutil::strategy_param_name);

// Issue 7 item 2: one put_ref() without a get, then kill(): the fold finds the count at zero,
// no release ever comes, and revive() used to wait for it forever.
TEST_P(TeardownMisuseTest, StrayPutThenKillReturnsUnderflowAndStaysUsable) {
  auto pg = must_memremap(make_params(GetParam(), make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  const Pfn pfn = pg->range(0).start + 7;
  EXPECT_EQ(pg->put_ref(), Errc::ok);  // percpu mode cannot see it yet
  const Errc killed = bounded_call("kill() after a stray put", [&] { return pg->kill(); });
  EXPECT_EQ(killed, Errc::underflow);
  EXPECT_GE(misuse_.reported(), 1u);
  EXPECT_EQ(misuse_.last(), Errc::underflow);
  // The pagemap stays live (the kill was refused) and its reference works again.
  EXPECT_EQ(pg->state(), State::live);
  EXPECT_TRUE(pg->ref_is_percpu());
  EXPECT_TRUE(pg->tryget_live());
  EXPECT_EQ(pg->put_ref(), Errc::ok);
  FolioHold h;
  EXPECT_EQ(h.take(*pg, pfn), Errc::ok);
  EXPECT_EQ(h.release(), Errc::ok);
  auto r = bounded_call("memunmap() after the refused kill", [&] { return pg->memunmap(); });
  EXPECT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);
}

TEST_P(TeardownMisuseTest, StrayPutThenMemunmapReturnsUnderflowAndStaysLive) {
  auto pg = must_memremap(make_params(GetParam(), make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  EXPECT_EQ(pg->put_ref(), Errc::ok);
  auto r = bounded_call("memunmap() after a stray put", [&] { return pg->memunmap(); });
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::underflow) << r.error().to_string();
  EXPECT_GE(misuse_.reported(), 1u);
  EXPECT_EQ(pg->state(), State::live);
  EXPECT_TRUE(pg->ref_is_percpu());
  auto again = bounded_call("second memunmap()", [&] { return pg->memunmap(); });
  EXPECT_TRUE(again) << again.error().to_string();
}

// Defect B: k stray put_ref()s (k = 1 above) leave the fold's count at 1 - k. Each refused attempt
// used to give back one reference only, so k >= 2 took k + 1 memunmap calls and k >= 3 made
// ~DevPagemap give up (three attempts) and leave the pagemap published. Whatever k, the first
// attempt refuses with Errc::underflow and the pagemap is live with one initial reference again.
class StrayPutsTest : public ::testing::TestWithParam<std::tuple<Strategy, int>> {
 protected:
  void SetUp() override { published_before_ = pagemap_count(); }
  void TearDown() override { EXPECT_EQ(pagemap_count(), published_before_); }
  testutil::MisuseCounter misuse_;
  std::size_t published_before_ = 0;
};
INSTANTIATE_TEST_SUITE_P(AllStrategies, StrayPutsTest,
                         ::testing::Combine(::testing::ValuesIn(kAllStrategies),
                                            ::testing::Values(2, 3, 5)),
                         [](const ::testing::TestParamInfo<std::tuple<Strategy, int>>& i) {
                           return fmt::format("{}_{}", strategy_name(std::get<0>(i.param)),
                                              std::get<1>(i.param));
                         });

TEST_P(StrayPutsTest, MemunmapRefusesOnceThenSucceeds) {
  const auto [strategy, strays] = GetParam();
  auto pg = must_memremap(make_params(strategy, make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  for (int i = 0; i < strays; ++i)
    EXPECT_EQ(pg->put_ref(), Errc::ok);  // percpu mode cannot see them yet
  auto r = bounded_call("memunmap() after stray puts", [&] { return pg->memunmap(); });
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::underflow) << r.error().to_string();
  EXPECT_GE(misuse_.reported(), 1u);
  EXPECT_EQ(pg->state(), State::live);
  EXPECT_TRUE(pg->ref_is_percpu());
  EXPECT_TRUE(pg->tryget_live());
  EXPECT_EQ(pg->put_ref(), Errc::ok);
  FolioHold h;
  EXPECT_EQ(h.take(*pg, pg->range(0).start), Errc::ok);
  EXPECT_EQ(h.release(), Errc::ok);
  auto again = bounded_call("second memunmap()", [&] { return pg->memunmap(); });
  EXPECT_TRUE(again) << again.error().to_string();
  EXPECT_EQ(pg->state(), State::dead);
}

TEST_P(StrayPutsTest, KillRefusesOnceThenSucceeds) {
  const auto [strategy, strays] = GetParam();
  auto pg = must_memremap(make_params(strategy, make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  for (int i = 0; i < strays; ++i)
    EXPECT_EQ(pg->put_ref(), Errc::ok);
  EXPECT_EQ(bounded_call("kill() after stray puts", [&] { return pg->kill(); }), Errc::underflow);
  EXPECT_EQ(pg->state(), State::live);
  EXPECT_TRUE(pg->ref_is_percpu());
  EXPECT_EQ(bounded_call("second kill()", [&] { return pg->kill(); }), Errc::ok);
  EXPECT_EQ(pg->state(), State::dying);
  auto r = bounded_call("memunmap() of the killed pagemap", [&] { return pg->memunmap(); });
  EXPECT_TRUE(r) << r.error().to_string();
}

// The destructor's memunmap completes (TearDown checks the pagemap is unpublished) and says
// nothing about giving up.
TEST_P(StrayPutsTest, DestructorCompletesTheTeardown) {
  const auto [strategy, strays] = GetParam();
  auto pg = must_memremap(make_params(strategy, make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  for (int i = 0; i < strays; ++i)
    EXPECT_EQ(pg->put_ref(), Errc::ok);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(bounded_call("~DevPagemap after stray puts",
                         [&] {
                           pg.reset();
                           return 0;
                         }),
            0);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err.find("keeps underflowing"), std::string::npos) << err;
  EXPECT_EQ(pagemap_count(), published_before_);
}

// Issue 7 item 4: memremap / memunmap need grace periods; inside a read section they must refuse
// and change nothing (the registry used to free its old snapshot without a grace period).
TEST_P(TeardownMisuseTest, GracePeriodCallsInsideAReadSectionAreRefused) {
  auto b = make_backing(8 * kMiB2);
  MemremapParams low = make_params(GetParam(), b);
  low.ranges[0].size = 4 * kMiB2;
  auto pg = must_memremap(low);
  ASSERT_TRUE(pg);
  const std::size_t count = pagemap_count();
  MemremapParams high = make_params(GetParam(), b);
  high.ranges[0].offset = 4 * kMiB2;
  {
    rcu::ReadGuard guard;
    auto r = memremap(high);
    ASSERT_FALSE(r) << "memremap inside a read section succeeded";
    EXPECT_EQ(r.code(), Errc::invalid_argument);
    EXPECT_NE(r.error().message().find("read section"), std::string::npos) << r.error().message();
    EXPECT_EQ(pagemap_count(), count);
    auto u = pg->memunmap();
    ASSERT_FALSE(u);
    EXPECT_EQ(u.code(), Errc::invalid_argument);
    EXPECT_EQ(pg->state(), State::live);
  }
  EXPECT_GE(misuse_.reported(), 2u);
  EXPECT_EQ(pagemap_count(), count);
  {
    PagemapRef ref = get_dev_pagemap(b->base_pfn() + 1);  // the old snapshot is intact
    EXPECT_EQ(ref.get(), pg.get());
    EXPECT_FALSE(get_dev_pagemap(b->base_pfn() + 1024 + 1));
  }
  EXPECT_TRUE(pg->ref_is_percpu());
  auto hi = must_memremap(high);  // outside the section it works
  ASSERT_TRUE(hi);
  EXPECT_TRUE(hi->memunmap());
  EXPECT_TRUE(pg->memunmap());
}

// Issue 7 item 5: a memunmap waiting for a held folio reports its progress (sweep too: its wait
// used to be built without the caller's callback), with the busy folios counted.
TEST_P(SafeTeardownTest, MemunmapWithAHeldFolioReportsProgress) {
  auto pg = must_memremap(make_params(GetParam(), make_backing(4 * kMiB2)));
  ASSERT_TRUE(pg);
  FolioHold h;
  ASSERT_EQ(h.take(*pg, pg->range(0).start + 3), Errc::ok);
  std::atomic<int> calls{0};
  std::atomic<std::uint64_t> busy{0};
  MemunmapOptions o;
  o.timeout = 300ms;
  o.progress_every = 20ms;
  o.progress = [&](const DrainProgress& p) {
    calls.fetch_add(1);
    busy.store(p.busy_folios);
  };
  auto r = pg->memunmap(o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::timed_out);
  EXPECT_GT(calls.load(), 0) << "no progress report during a 300 ms wait";
  EXPECT_EQ(busy.load(), 1u);
  EXPECT_EQ(pg->state(), State::live);
  ASSERT_EQ(h.release(), Errc::ok);
  EXPECT_TRUE(pg->memunmap());
}

// Issue 7 item 11: a range that merely contains a live pagemap is not "a concurrent memremap".
TEST(DevPagemapOverlap, ContainingALivePagemapNamesIt) {
  auto b = make_backing(8 * kMiB2);
  MemremapParams inner = make_params(Strategy::sweep, b);
  inner.ranges[0].offset = 2 * kMiB2;
  inner.ranges[0].size = 2 * kMiB2;
  inner.name = "inner-pagemap";
  auto pg = must_memremap(inner);
  ASSERT_TRUE(pg);
  auto r = memremap(make_params(Strategy::sweep, b));  // first and last pfn are both free
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), Errc::overlap);
  EXPECT_NE(r.error().message().find("inner-pagemap"), std::string::npos) << r.error().message();
  EXPECT_EQ(r.error().message().find("concurrent"), std::string::npos) << r.error().message();
  EXPECT_TRUE(pg->memunmap());
}

// Issue 7 item 9: a late access after teardown is a typed error and a count, never a crash, with
// the default options (no quarantine) and whatever the retired metadata reads as.
TEST_P(TeardownMisuseTest, LateAccessAfterTeardownIsATypedError) {
  MemremapParams p = make_params(GetParam(), make_backing(4 * kMiB2));
  p.quarantine = false;
  auto pg = must_memremap(p);
  ASSERT_TRUE(pg);
  const Pfn pfn = pg->range(0).start + 11;
  const bool none = GetParam() == Strategy::none;
  if (none) {  // leaked on purpose: the founding hazard
    ASSERT_EQ(pg->get_folio(pfn), Errc::ok);
    ASSERT_EQ(pg->pin_folio(pfn + 1), Errc::ok);
  }
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(pg->get_folio(pfn), Errc::use_after_teardown);
  EXPECT_EQ(pg->put_folio(pfn), Errc::use_after_teardown);
  EXPECT_EQ(pg->pin_folio(pfn + 1), Errc::use_after_teardown);
  EXPECT_EQ(pg->unpin_folio(pfn + 1), Errc::use_after_teardown);
  EXPECT_EQ(pg->late_accesses(), 4u);
  EXPECT_EQ(pg->folio_ref_count(pfn), 0u);
  EXPECT_FALSE(pg->folio_maybe_dma_pinned(pfn + 1));
}

}  // namespace
}  // namespace pgmap

namespace pgmap {
namespace {

// Issue 7 item 5: ~DevPagemap's every-5-s report works under sweep as well.
TEST(DevPagemapLifetime, DestructorWaitingForAHolderReportsItUnderSweep) {
  std::shared_ptr<DevPagemap> pgmap = testutil::must_memremap(
      testutil::make_params(Strategy::sweep, testutil::make_backing(4 * kPmdSize)));
  ASSERT_NE(pgmap, nullptr);
  DevPagemap* raw = pgmap.get();
  const Pfn pfn = raw->range(0).start + 9;
  ASSERT_EQ(raw->get_folio(pfn), Errc::ok);
  ::testing::internal::CaptureStderr();
  std::atomic<bool> destroyed{false};
  std::thread owner([&] {
    pgmap.reset();
    destroyed.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(5600));
  EXPECT_FALSE(destroyed.load());
  EXPECT_EQ(raw->put_folio(pfn), Errc::ok);
  owner.join();
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(destroyed.load());
  EXPECT_NE(err.find("still waiting"), std::string::npos) << err;
  EXPECT_NE(err.find(fmt::format("pfn {:#x}", pfn)), std::string::npos) << err;
}

}  // namespace
}  // namespace pgmap

// ---- The FREEING protocol's back-out (sweep, alloc_event) ---------------------------------------
//
// Gets that find the pagemap killed after their add back out (back_out). These tests stop such a
// get right after its add (yield point sweep.get_after_add), let other references come and go,
// kill the pagemap, and let it finish: every busy period that a successful get took part in ends
// with exactly one page_free, and one made only of backing-out adds ends with none.
namespace pgmap {
namespace {

namespace backout_race {
constexpr int kThreads = 2;
std::atomic<bool> in_window[kThreads + 1];
std::atomic<bool> go[kThreads + 1];
thread_local int me = 0;  // 1..kThreads for the gets under test; 0 for every other thread

void hook(const char* name) noexcept {
  if (me == 0 || std::strcmp(name, "sweep.get_after_add") != 0) return;
  const int i = std::exchange(me, 0);  // once per thread
  in_window[i].store(true);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!go[i].load() && std::chrono::steady_clock::now() < until)
    std::this_thread::yield();
}

void reset() {
  for (int i = 0; i <= kThreads; ++i) {
    in_window[i] = false;
    go[i] = false;
  }
}
}  // namespace backout_race

class FreeingBackOutTest : public ::testing::TestWithParam<Strategy> {
 protected:
  void SetUp() override {
    if (!kYieldPointsEnabled) GTEST_SKIP() << "needs yield points (debug, asan, tsan presets)";
    backout_race::reset();
    old_hook_ = set_yield_hook(&backout_race::hook);
    MemremapParams p = testutil::make_params(GetParam(), testutil::make_backing(4 * kMiB), 0,
                                             PagemapType::generic);
    if (with_page_free()) {
      p.ops.page_free = [this](DevPagemap&, Pfn, unsigned) { frees_.fetch_add(1); };
    }
    pg_ = testutil::must_memremap(std::move(p));
    ASSERT_TRUE(pg_);
    pfn_ = pg_->range(0).start;
    // Under alloc_event every folio reference is taken inside an allocation (the protocol).
    if (GetParam() == Strategy::alloc_event) {
      auto a = pg_->request(pfn_, 1);
      ASSERT_TRUE(a);
      alloc_ = std::move(a).value();
    }
  }
  void TearDown() override {
    if (!kYieldPointsEnabled) return;
    (void)set_yield_hook(old_hook_);
    alloc_.reset();
    if (pg_ && pg_->state() != DevPagemap::State::dead) {
      auto r = testutil::bounded_call("memunmap", [&] { return pg_->memunmap(); });
      EXPECT_TRUE(r) << r.error().to_string();
    }
  }
  // Starts a get on thread i that stops right after its add; returns when it is there.
  std::thread stopped_get(int i) {
    std::thread t([this, i] {
      backout_race::me = i;
      EXPECT_EQ(pg_->get_folio(pfn_), Errc::dead) << "get " << i << " after the kill";
    });
    EXPECT_TRUE(testutil::eventually([i] { return backout_race::in_window[i].load(); }));
    return t;
  }

  // Without a page_free the pagemap takes the lean protocol (no FREEING state).
  virtual bool with_page_free() const { return true; }

  std::atomic<int> frees_{0};
  YieldHook old_hook_ = nullptr;
  std::shared_ptr<DevPagemap> pg_;
  Pfn pfn_ = 0;
  DevPagemap::Allocation alloc_;
};
INSTANTIATE_TEST_SUITE_P(FreeingProtocol, FreeingBackOutTest,
                         ::testing::Values(Strategy::sweep, Strategy::alloc_event),
                         testutil::strategy_param_name);

// The same race on a pagemap without page_free (the lean protocol): a back-out that ends the busy
// period leaves the folio idle, never FREEING, and wakes a waiter (B3).
class LeanBackOutTest : public FreeingBackOutTest {
 protected:
  bool with_page_free() const override { return false; }
};
INSTANTIATE_TEST_SUITE_P(LeanProtocol, LeanBackOutTest,
                         ::testing::Values(Strategy::sweep, Strategy::alloc_event),
                         testutil::strategy_param_name);

TEST_P(LeanBackOutTest, BackOutAfterAJoinedGetCameAndWentLeavesTheFolioIdle) {
  std::thread b = stopped_get(1);
  ASSERT_EQ(pg_->get_folio(pfn_), Errc::ok);  // G joins on B's add
  EXPECT_EQ(pg_->put_folio(pfn_), Errc::ok);  // G is done; B's add keeps the count at 1
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 1u);
  ASSERT_EQ(pg_->kill(), Errc::ok);
  PageArray* a = pg_->array_for(pfn_);
  ASSERT_NE(a, nullptr);
  std::atomic<std::uint32_t>& ref = a->ref(a->index_of(pfn_));
  IdleWaiter waiter(ref);
  ASSERT_TRUE(waiter.start());
  backout_race::go[1] = true;
  b.join();
  EXPECT_TRUE(waiter.woken_within())
      << "the back-out that left the folio idle did not wake its waiter";
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 0u);
  EXPECT_EQ(frees_.load(), 0);
}

// Defect A (the model's sweep/page_free_owed trail): B adds 0 -> 1 and stops; G gets 1 -> 2
// (the pagemap is live: G succeeds) and puts 2 -> 1; the kill; B backs out 1 -> 0. G's busy
// period must end with page_free although the last put of the count is B's back-out (the count
// went 1 -> 2 -> 1: B cannot see it). It used to end without one.
TEST_P(FreeingBackOutTest, BackOutAfterAJoinedGetCameAndWentRunsPageFree) {
  std::thread b = stopped_get(1);
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 1u);
  ASSERT_EQ(pg_->get_folio(pfn_), Errc::ok);  // G joins on B's add
  EXPECT_EQ(pg_->put_folio(pfn_), Errc::ok);  // G is done; B's add keeps the count at 1
  EXPECT_EQ(frees_.load(), 0);
  ASSERT_EQ(pg_->kill(), Errc::ok);
  backout_race::go[1] = true;
  b.join();
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 0u);
  EXPECT_EQ(frees_.load(), 1) << "a busy period with a successful get ended without page_free";
}

// Two gets back out of a busy period nobody else took part in: no page_free (there was nothing to
// free), whichever backs out last. The second get's add found the count at 1 (B's add), which the
// old back_out took for a real busy period and freed.
TEST_P(FreeingBackOutTest, TwoBackOutsAloneRunNoPageFree) {
  std::thread b1 = stopped_get(1);
  std::thread b2 = stopped_get(2);
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 2u);
  ASSERT_EQ(pg_->kill(), Errc::ok);
  backout_race::go[1] = true;
  b1.join();
  backout_race::go[2] = true;
  b2.join();
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 0u);
  EXPECT_EQ(frees_.load(), 0) << "page_free for a busy period without a successful get";
}

// A successful get that still holds when the backing-out get lets go: its own put ends the busy
// period and runs page_free once; the back-out does not.
TEST_P(FreeingBackOutTest, BackOutWhileAJoinedGetHoldsLeavesPageFreeToIt) {
  std::thread b = stopped_get(1);
  ASSERT_EQ(pg_->get_folio(pfn_), Errc::ok);  // G joins on B's add and keeps its reference
  ASSERT_EQ(pg_->kill(), Errc::ok);
  backout_race::go[1] = true;
  b.join();
  EXPECT_EQ(frees_.load(), 0);
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 1u);
  EXPECT_EQ(pg_->put_folio(pfn_), Errc::ok);
  EXPECT_EQ(frees_.load(), 1);
  EXPECT_EQ(pg_->folio_ref_count(pfn_), 0u);
}

// ---- the page cycle's fast paths and their out-of-line siblings ---------------------------------
//
// per_lookup and transition take their pagemap references on an inline fast path (the rseq
// section alone) when the free path has nothing to do (a generic pagemap without page_free), and
// out of line otherwise (page_free set, FS_DAX's wake-up, the ref in atomic mode after the kill).
// Every path must count the same: under per_lookup one pagemap reference per folio reference,
// under transition one per busy folio, and page_free once per busy period.
class PagemapRefPathTest
    : public DevPagemapTest,
      public ::testing::WithParamInterface<std::tuple<Strategy, PagemapType, bool>> {};

INSTANTIATE_TEST_SUITE_P(
    RefStrategies, PagemapRefPathTest,
    ::testing::Combine(::testing::Values(Strategy::per_lookup, Strategy::transition),
                       ::testing::Values(PagemapType::generic, PagemapType::fs_dax),
                       ::testing::Bool()),
    [](const auto& p) {
      return std::string(strategy_name(std::get<0>(p.param))) + "_" +
             std::string(pagemap_type_name(std::get<1>(p.param))) +
             (std::get<2>(p.param) ? "_page_free" : "_no_page_free");
    });

TEST_P(PagemapRefPathTest, EveryPathCountsThePagemapReferences) {
  const auto [s, type, with_free] = GetParam();
  FreeLog log;
  auto pg = map(s, 4 * kMiB, 0, with_free ? log.ops() : PagemapOps{}, type);
  ASSERT_TRUE(pg);
  const Pfn a = first_pfn(*pg) + 3;
  const Pfn b = first_pfn(*pg) + 4;
  auto refs = [&](std::int64_t per_lookup, std::int64_t transition) {
    return s == Strategy::per_lookup ? per_lookup : transition;
  };
  ASSERT_EQ(pg->get_folio(a), Errc::ok);  // 0 -> 1
  EXPECT_EQ(pg->holders().pagemap_refs, refs(1, 1));
  ASSERT_EQ(pg->get_folio(a, 3), Errc::ok);  // busy, compound
  EXPECT_EQ(pg->holders().pagemap_refs, refs(4, 1));
  ASSERT_EQ(pg->get_folio(b), Errc::ok);
  EXPECT_EQ(pg->holders().pagemap_refs, refs(5, 2));
  ASSERT_EQ(pg->put_folio(a, 3), Errc::ok);  // stays busy
  EXPECT_EQ(pg->holders().pagemap_refs, refs(2, 2));
  ASSERT_EQ(pg->put_folio(a), Errc::ok);  // 1 -> 0
  EXPECT_EQ(pg->holders().pagemap_refs, refs(1, 1));
  EXPECT_EQ(pg->folio_ref_count(a), 0u);
  ASSERT_EQ(pg->get_folio(a, 2), Errc::ok);  // 0 -> 2
  EXPECT_EQ(pg->holders().pagemap_refs, refs(3, 2));
  ASSERT_EQ(pg->put_folio(a, 2), Errc::ok);  // 2 -> 0
  EXPECT_EQ(pg->holders().pagemap_refs, refs(1, 1));
  EXPECT_EQ(log.count(), with_free ? 2u : 0u);  // a's two busy periods

  // After the kill the ref is atomic: gets of an idle folio fail, and the held folio's puts go
  // through the out-of-line paths and release the pagemap.
  ASSERT_EQ(pg->get_folio(b, 2), Errc::ok);
  EXPECT_EQ(pg->holders().pagemap_refs, refs(3, 1));
  ASSERT_EQ(pg->kill(), Errc::ok);
  EXPECT_EQ(pg->get_folio(a), Errc::dead);
  EXPECT_EQ(pg->holders().pagemap_refs, refs(3, 1));
  ASSERT_EQ(pg->put_folio(b, 2), Errc::ok);
  EXPECT_EQ(pg->holders().pagemap_refs, refs(1, 1));
  ASSERT_EQ(pg->put_folio(b), Errc::ok);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(log.count(), with_free ? 3u : 0u);
  EXPECT_EQ(pg->put_folio(b), Errc::underflow);  // nothing held: refused, nothing changed
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(misuse_.reported(), 1u);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

// A pagemap of two ranges with a gap between them. per_lookup's get takes its pagemap references
// before it locates the folio, so a pfn outside the first range, found in the second or in none,
// goes through an out-of-line path that holds them already: the second range must count them as
// the first does, and a pfn in no range must give them back.
TEST_P(PagemapRefPathTest, OtherRangesAndPfnsOutsideEveryRangeCountThePagemapReferences) {
  const auto [s, type, with_free] = GetParam();
  FreeLog log;
  auto b = make_backing(8 * kMiB);
  MemremapParams p = make_params(s, b, 0, type);
  if (with_free) p.ops = log.ops();
  p.ranges[0].size = 2 * kMiB;
  p.ranges.push_back(PagemapRangeSpec{b, 4 * kMiB, 2 * kMiB});
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  const PfnRange r0 = pg->range(0);
  const PfnRange r1 = pg->range(1);
  const Pfn gap = r0.end();
  const Pfn c = r1.start + 5;
  auto refs = [&](std::int64_t per_lookup, std::int64_t transition) {
    return s == Strategy::per_lookup ? per_lookup : transition;
  };
  ASSERT_EQ(pg->get_folio(c, 2), Errc::ok);  // second range, 0 -> 2
  EXPECT_EQ(pg->holders().pagemap_refs, refs(2, 1));
  EXPECT_EQ(pg->folio_ref_count(c), 2u);
  ASSERT_EQ(pg->get_folio(c), Errc::ok);  // busy
  EXPECT_EQ(pg->holders().pagemap_refs, refs(3, 1));
  for (Pfn outside : {gap, r0.start - 1, r1.end(), Pfn{~std::uint64_t{0}}}) {
    EXPECT_EQ(pg->get_folio(outside), Errc::out_of_range) << outside;
    EXPECT_EQ(pg->get_folio(outside, 4), Errc::out_of_range) << outside;
    EXPECT_EQ(pg->holders().pagemap_refs, refs(3, 1)) << outside;
  }
  EXPECT_EQ(pg->folio_ref_count(gap), 0u);
  ASSERT_EQ(pg->put_folio(c, 3), Errc::ok);  // 3 -> 0
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(pg->folio_ref_count(c), 0u);
  EXPECT_EQ(log.count(), with_free ? 1u : 0u);

  // Killed: the ref is atomic, so the get takes the general path, which refuses a pfn outside
  // every range before it looks at the ref.
  ASSERT_EQ(pg->get_folio(r0.start), Errc::ok);
  ASSERT_EQ(pg->kill(), Errc::ok);
  EXPECT_EQ(pg->get_folio(gap), Errc::out_of_range);
  EXPECT_EQ(pg->get_folio(c), Errc::dead);
  EXPECT_EQ(pg->holders().pagemap_refs, 1);
  ASSERT_EQ(pg->put_folio(r0.start), Errc::ok);
  EXPECT_EQ(pg->holders().pagemap_refs, 0);
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg->memunmap().code(), Errc::ok);
}

}  // namespace
}  // namespace pgmap
