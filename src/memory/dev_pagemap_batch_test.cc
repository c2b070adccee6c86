// DevPagemap's batched folio operations (get_folios / put_folios / pin_folios / unpin_folios):
// under every strategy a batch leaves exactly what the single operations, called once per entry in
// order, would leave — the same refcounts, pincounts, page_free calls and pagemap reference count —
// and a failure in the middle leaves exactly the leading entries done and says how many.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap {
namespace {

using testutil::FreeLog;
using testutil::make_backing;
using testutil::make_params;
using testutil::must_memremap;
using BatchResult = DevPagemap::BatchResult;
using ListOp = Errc (DevPagemap::*)(std::span<const Pfn>, BatchResult*) noexcept;
using RangeOp = Errc (DevPagemap::*)(PfnRange, BatchResult*) noexcept;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kBias = PageArray::kPinBias;

class BatchTest : public ::testing::TestWithParam<Strategy> {
 protected:
  // A pagemap of 8 MiB at base order 0 whose whole range is covered by one Allocation (what a
  // folio reference needs under alloc_event; harmless for the other strategies).
  void SetUp() override {
    MemremapParams p = make_params(GetParam(), make_backing(8 * kMiB));
    p.ops = log_.ops();
    pg_ = must_memremap(std::move(p));
    ASSERT_TRUE(pg_);
    first_ = pg_->range(0).start;
    auto a = pg_->request(first_, pg_->range(0).count);
    ASSERT_TRUE(a) << a.error().to_string();
    alloc_ = std::move(a).value();
    refs0_ = pg_->ref_count_snapshot();
  }
  void TearDown() override {
    if (!pg_) return;
    alloc_.reset();
    if (pg_->state() != DevPagemap::State::dead) {
      MemunmapOptions o;
      o.policy = UnmapPolicy::refuse;
      auto r = pg_->memunmap(o);
      EXPECT_TRUE(r) << r.error().to_string();
    }
  }

  Pfn pfn(std::uint64_t i) const { return first_ + i; }
  std::vector<Pfn> pfns(std::uint64_t from, std::uint64_t n) const {
    std::vector<Pfn> v;
    for (std::uint64_t i = 0; i < n; ++i)
      v.push_back(pfn(from + i));
    return v;
  }
  std::uint32_t ref(std::uint64_t i) const { return pg_->folio_ref_count(pfn(i)); }
  PageArray& array() const { return *pg_->array_for(first_); }
  std::uint32_t pincount(std::uint64_t i) const { return array().pincount(i).load(); }
  void make_pmd_folio(std::uint64_t head) {
    ASSERT_EQ(array().set_folio_order(head, kPmdOrder), Errc::ok);
  }
  void poison(std::uint64_t i) { array().flags(i).fetch_or(kPagePoisoned); }

  testutil::MisuseCounter misuse_;
  FreeLog log_;
  std::shared_ptr<DevPagemap> pg_;
  DevPagemap::Allocation alloc_;
  Pfn first_ = 0;
  std::int64_t refs0_ = 0;
};

INSTANTIATE_TEST_SUITE_P(AllStrategies, BatchTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_param_name);

// What a page of the pagemap holds, and what the pagemap as a whole does.
struct Counters {
  std::vector<std::uint32_t> ref;
  std::vector<std::uint32_t> pin;
  std::size_t frees = 0;
  std::int64_t pagemap_refs = 0;
  bool operator==(const Counters&) const = default;
};

// Batch and single calls on two disjoint sets of pages, in the same sequence: the batch's pages
// end with the same counters as the single calls' pages, after each step.
TEST_P(BatchTest, BatchEqualsSingleCallsPerEntry) {
  // Set A: pages [0, 16) and the 2M folio at 512; set B: pages [16, 32) and the 2M folio at 1024.
  // Each set: 4K pages, then 3 pages of its 2M folio.
  make_pmd_folio(512);
  make_pmd_folio(1024);
  auto set = [&](std::uint64_t small, std::uint64_t big) {
    std::vector<Pfn> v = pfns(small, 16);
    for (Pfn p : pfns(big + 5, 3))
      v.push_back(p);
    return v;
  };
  const std::vector<Pfn> a = set(0, 512);
  const std::vector<Pfn> b = set(16, 1024);
  auto counters = [&](std::uint64_t small, std::uint64_t big) {
    Counters c;
    for (std::uint64_t i = 0; i < 16; ++i) {
      c.ref.push_back(ref(small + i));
      c.pin.push_back(pincount(small + i));
    }
    c.ref.push_back(ref(big));
    c.pin.push_back(pincount(big));
    return c;
  };
  using BatchOp = ListOp;
  using SingleOp = Errc (DevPagemap::*)(Pfn, std::uint32_t) noexcept;
  struct Step {
    BatchOp batch;
    SingleOp single;
    std::size_t atomics;  // of the batch: 16 small folios + 1 large
  };
  const Step steps[] = {
      {&DevPagemap::get_folios, &DevPagemap::get_folio, 17},
      {&DevPagemap::pin_folios, &DevPagemap::pin_folio, 17},
      {&DevPagemap::pin_folios, &DevPagemap::pin_folio, 17},
      {&DevPagemap::unpin_folios, &DevPagemap::unpin_folio, 17},
      {&DevPagemap::put_folios, &DevPagemap::put_folio, 17},
      {&DevPagemap::unpin_folios, &DevPagemap::unpin_folio, 17},
  };
  std::size_t step = 0;
  for (const Step& s : steps) {
    const std::size_t frees_before = log_.count();
    const std::int64_t refs_before = pg_->ref_count_snapshot();
    BatchResult r;
    ASSERT_EQ(((*pg_).*s.batch)(a, &r), Errc::ok) << "step " << step;
    EXPECT_EQ(r.done, a.size());
    EXPECT_EQ(r.atomics, s.atomics);
    const std::size_t batch_frees = log_.count() - frees_before;
    const std::int64_t refs_mid = pg_->ref_count_snapshot();
    for (Pfn p : b)
      ASSERT_EQ(((*pg_).*s.single)(p, 1), Errc::ok) << "step " << step;
    // The pagemap references the batch took or dropped: what the single calls took or dropped.
    EXPECT_EQ(refs_mid - refs_before, pg_->ref_count_snapshot() - refs_mid) << "step " << step;
    const std::size_t single_frees = log_.count() - frees_before - batch_frees;
    Counters ca = counters(0, 512);
    Counters cb = counters(16, 1024);
    ca.frees = batch_frees;
    cb.frees = single_frees;
    EXPECT_EQ(ca, cb) << "step " << step;
    ++step;
  }
  // Everything dropped: idle, one page_free per folio of each set, the pagemap reference back
  // where it started.
  for (std::uint64_t i = 0; i < 32; ++i)
    EXPECT_EQ(ref(i), 0u) << i;
  EXPECT_EQ(ref(512), 0u);
  EXPECT_EQ(ref(1024), 0u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
  EXPECT_EQ(misuse_.reported(), 0u);
}

// 4K and 2M folios mixed in one batch: one refcount operation per small folio and one for the
// consecutive pages of the 2M folio (its exact pincount counts every page).
TEST_P(BatchTest, Mixed4KAnd2MFoliosOneAtomicPerFolio) {
  make_pmd_folio(512);
  std::vector<Pfn> v = pfns(510, 2 + 512);  // 510, 511, then all of the 2M folio
  v.push_back(pfn(1024));
  BatchResult r;
  ASSERT_EQ(pg_->pin_folios(v, &r), Errc::ok);
  EXPECT_EQ(r.done, v.size());
  EXPECT_EQ(r.atomics, 4u);
  EXPECT_EQ(ref(510), kBias);
  EXPECT_EQ(ref(511), kBias);
  EXPECT_EQ(ref(512), 512u);
  EXPECT_EQ(pincount(512), 512u);
  EXPECT_TRUE(pg_->folio_maybe_dma_pinned(pfn(700)));
  EXPECT_EQ(ref(1024), kBias);
  ASSERT_EQ(pg_->unpin_folios(v, &r), Errc::ok);
  EXPECT_EQ(r.atomics, 4u);
  EXPECT_EQ(ref(512), 0u);
  EXPECT_EQ(pincount(512), 0u);
  EXPECT_EQ(log_.count(), 4u);
  // Pages of the 2M folio that are not consecutive are separate operations.
  const std::vector<Pfn> gaps = {pfn(512), pfn(514), pfn(515)};
  ASSERT_EQ(pg_->get_folios(gaps, &r), Errc::ok);
  EXPECT_EQ(r.atomics, 2u);
  EXPECT_EQ(ref(512), 3u);
  ASSERT_EQ(pg_->put_folios(gaps, &r), Errc::ok);
  EXPECT_EQ(ref(512), 0u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

// A poisoned folio in the middle: the pages before it are pinned, it and every later page are
// untouched, and the error is the single pin's.
TEST_P(BatchTest, PoisonedFolioInTheMiddle) {
  poison(3);
  const std::vector<Pfn> v = pfns(0, 8);
  BatchResult r;
  EXPECT_EQ(pg_->pin_folios(v, &r), Errc::poisoned);
  EXPECT_EQ(r.done, 3u);
  EXPECT_EQ(r.atomics, 3u);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(ref(i), i < 3 ? kBias : 0u) << i;
  // A plain reference is not refused on poison (as get_folio).
  ASSERT_EQ(pg_->get_folios(std::span(v).subspan(3), &r), Errc::ok);
  ASSERT_EQ(pg_->put_folios(std::span(v).subspan(3), &r), Errc::ok);
  ASSERT_EQ(pg_->unpin_folios(std::span(v).first(3), &r), Errc::ok);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(ref(i), 0u) << i;
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

// A poisoned 2M folio after a small one: the small pin is kept, the large folio untouched.
TEST_P(BatchTest, PoisonedLargeFolioAfterSmallOnes) {
  make_pmd_folio(512);
  poison(512);
  const std::vector<Pfn> v = pfns(511, 4);
  BatchResult r;
  EXPECT_EQ(pg_->pin_folios(v, &r), Errc::poisoned);
  EXPECT_EQ(r.done, 1u);
  EXPECT_EQ(ref(511), kBias);
  EXPECT_EQ(ref(512), 0u);
  EXPECT_EQ(pincount(512), 0u);
  ASSERT_EQ(pg_->unpin_folios(std::span(v).first(1)), Errc::ok);
}

// An unpin of a page that is not pinned in the middle: the pages before it are unpinned, the
// underflow is reported once, the pages after it still hold their pins.
TEST_P(BatchTest, UnpinUnderflowInTheMiddle) {
  const std::vector<Pfn> v = pfns(0, 8);
  ASSERT_EQ(pg_->pin_folios(std::span(v).first(4)), Errc::ok);
  ASSERT_EQ(pg_->pin_folios(std::span(v).subspan(5)), Errc::ok);
  BatchResult r;
  EXPECT_EQ(pg_->unpin_folios(v, &r), Errc::underflow);
  EXPECT_EQ(r.done, 4u);
  EXPECT_EQ(misuse_.reported(), 1u);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(ref(i), i > 4 ? kBias : 0u) << i;
  ASSERT_EQ(pg_->unpin_folios(std::span(v).subspan(5), &r), Errc::ok);
  EXPECT_EQ(r.done, 3u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

// Unpinning more pages of a 2M folio than it has pins: as single calls, the pins that exist are
// dropped (the last one frees the folio), then the underflow.
TEST_P(BatchTest, UnpinOfMorePagesThanPinnedOnALargeFolio) {
  make_pmd_folio(512);
  const std::vector<Pfn> v = pfns(512, 4);
  ASSERT_EQ(pg_->pin_folios(std::span(v).first(2)), Errc::ok);
  EXPECT_EQ(pincount(512), 2u);
  BatchResult r;
  EXPECT_EQ(pg_->unpin_folios(v, &r), Errc::underflow);
  EXPECT_EQ(r.done, 2u);
  EXPECT_EQ(ref(512), 0u);
  EXPECT_EQ(pincount(512), 0u);
  EXPECT_EQ(log_.count(), 1u);
  EXPECT_EQ(misuse_.reported(), 1u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

// Bad input changes nothing: an entry outside the pagemap anywhere in the batch.
TEST_P(BatchTest, EntryOutsideThePagemapChangesNothing) {
  std::vector<Pfn> v = pfns(0, 4);
  v.push_back(pg_->range(0).end() + 7);
  v.push_back(pfn(4));
  for (ListOp op : {ListOp{&DevPagemap::get_folios}, ListOp{&DevPagemap::pin_folios},
                    ListOp{&DevPagemap::put_folios}, ListOp{&DevPagemap::unpin_folios}}) {
    BatchResult r{99, 99};
    EXPECT_EQ(((*pg_).*op)(v, &r), Errc::out_of_range);
    EXPECT_EQ(r.done, 0u);
    EXPECT_EQ(r.atomics, 0u);
    for (std::uint64_t i = 0; i < 5; ++i)
      EXPECT_EQ(ref(i), 0u) << i;
  }
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(log_.count(), 0u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

// The range form (consecutive pfns) is the list form without the list: the same counters, one
// operation for the pages of the 2M folio it covers; a range leaving the pagemap (or wrapping
// around) changes nothing.
TEST_P(BatchTest, RangeFormEqualsListForm) {
  make_pmd_folio(512);
  const PfnRange range{pfn(500), 40};  // 500..511 small, 512..539 of the 2M folio
  BatchResult r;
  ASSERT_EQ(pg_->pin_folios(range, &r), Errc::ok);
  EXPECT_EQ(r.done, 40u);
  EXPECT_EQ(r.atomics, 12u + 1u);
  EXPECT_EQ(ref(500), kBias);
  EXPECT_EQ(ref(512), 28u);
  EXPECT_EQ(pincount(512), 28u);
  const std::vector<Pfn> list = pfns(500, 40);
  ASSERT_EQ(pg_->unpin_folios(list, &r), Errc::ok);
  EXPECT_EQ(r.atomics, 13u);
  EXPECT_EQ(ref(512), 0u);
  ASSERT_EQ(pg_->get_folios(list, &r), Errc::ok);
  ASSERT_EQ(pg_->put_folios(range, &r), Errc::ok);
  EXPECT_EQ(r.atomics, 13u);
  EXPECT_EQ(ref(500), 0u);
  EXPECT_EQ(ref(512), 0u);
  // A poisoned folio in the middle of a range: the same partial result as the list form.
  poison(505);
  EXPECT_EQ(pg_->pin_folios(range, &r), Errc::poisoned);
  EXPECT_EQ(r.done, 5u);
  ASSERT_EQ(pg_->unpin_folios(PfnRange{pfn(500), 5}, &r), Errc::ok);
  for (RangeOp op : {RangeOp{&DevPagemap::get_folios}, RangeOp{&DevPagemap::pin_folios},
                     RangeOp{&DevPagemap::put_folios}, RangeOp{&DevPagemap::unpin_folios}}) {
    EXPECT_EQ(((*pg_).*op)(PfnRange{pfn(2040), 16}, &r), Errc::out_of_range);  // past the end
    EXPECT_EQ(r.done, 0u);
    EXPECT_EQ(((*pg_).*op)(PfnRange{pfn(1), ~std::uint64_t{0}}, &r), Errc::out_of_range);
    EXPECT_EQ(ref(2040), 0u);
    EXPECT_EQ(ref(1), 0u);
  }
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_EQ(pg_->ref_count_snapshot(), refs0_);
}

TEST_P(BatchTest, EmptyBatchIsANoOp) {
  BatchResult r{5, 5};
  EXPECT_EQ(pg_->pin_folios(std::span<const Pfn>{}, &r), Errc::ok);
  EXPECT_EQ(r.done, 0u);
  EXPECT_EQ(r.atomics, 0u);
  EXPECT_EQ(pg_->unpin_folios(std::span<const Pfn>{}), Errc::ok);
}

// A killed pagemap, with some folios of the batch already busy: each strategy refuses exactly the
// entries its single get refuses. transition: a busy folio's period covers the new reference, the
// first idle one is refused; per_lookup, sweep and alloc_event refuse every get after the kill;
// none refuses nothing.
TEST_P(BatchTest, KilledPagemapPartway) {
  const std::vector<Pfn> v = pfns(0, 8);
  ASSERT_EQ(pg_->get_folios(std::span(v).first(4)), Errc::ok);  // pages 0..3 busy
  ASSERT_EQ(pg_->kill(), Errc::ok);
  BatchResult r;
  const Errc e = pg_->pin_folios(v, &r);
  std::size_t expect_done = 0;
  switch (GetParam()) {
    case Strategy::none:
      expect_done = 8;
      break;
    case Strategy::transition:
      expect_done = 4;
      break;
    default:
      expect_done = 0;
  }
  EXPECT_EQ(e, expect_done == 8 ? Errc::ok : Errc::dead);
  EXPECT_EQ(r.done, expect_done);
  for (std::uint64_t i = 0; i < 8; ++i) {
    const std::uint32_t want = (i < expect_done ? kBias : 0u) + (i < 4 ? 1u : 0u);
    EXPECT_EQ(ref(i), want) << i;
  }
  // Releasing is never refused by a kill.
  ASSERT_EQ(pg_->unpin_folios(std::span(v).first(expect_done), &r), Errc::ok);
  ASSERT_EQ(pg_->put_folios(std::span(v).first(4), &r), Errc::ok);
  for (std::uint64_t i = 0; i < 8; ++i)
    EXPECT_EQ(ref(i), 0u) << i;
  alloc_.reset();
  auto m = pg_->memunmap();
  EXPECT_TRUE(m) << m.error().to_string();
}

// After teardown a batch touches no metadata: the first entry reports the late access, nothing
// else happens (identical to the first single call failing).
TEST_P(BatchTest, TornDownPagemap) {
  alloc_.reset();
  auto m = pg_->memunmap();
  ASSERT_TRUE(m) << m.error().to_string();
  const std::uint64_t late0 = pg_->late_accesses();
  const std::vector<Pfn> v = pfns(0, 8);
  for (ListOp op : {ListOp{&DevPagemap::get_folios}, ListOp{&DevPagemap::pin_folios},
                    ListOp{&DevPagemap::put_folios}, ListOp{&DevPagemap::unpin_folios}}) {
    BatchResult r{3, 3};
    EXPECT_EQ(((*pg_).*op)(v, &r), Errc::use_after_teardown);
    EXPECT_EQ(r.done, 0u);
  }
  EXPECT_EQ(pg_->late_accesses(), late0 + 4);
  // Outside the pagemap is still out_of_range (the ranges outlive the metadata).
  const std::vector<Pfn> outside = {pg_->range(0).end()};
  EXPECT_EQ(pg_->pin_folios(outside), Errc::out_of_range);
}

// Under `none`, the teardown does not wait: pins taken before it are released late, and the batch
// reports the late access of its first entry (the pins are gone with the metadata).
TEST(BatchNoneTest, LateUnpinAfterTeardownIsReportedNotACrash) {
  testutil::MisuseCounter misuse;
  auto pg = must_memremap(make_params(Strategy::none, make_backing(2 * kMiB)));
  ASSERT_TRUE(pg);
  std::vector<Pfn> v;
  for (std::uint64_t i = 0; i < 16; ++i)
    v.push_back(pg->range(0).start + i);
  ASSERT_EQ(pg->pin_folios(v), Errc::ok);
  auto m = pg->memunmap();
  ASSERT_TRUE(m) << m.error().to_string();
  DevPagemap::BatchResult r;
  EXPECT_EQ(pg->unpin_folios(v, &r), Errc::use_after_teardown);
  EXPECT_EQ(r.done, 0u);
  EXPECT_EQ(pg->late_accesses(), 1u);
}

// A batch across the two ranges of one pagemap: resolved once per range, every entry done.
TEST_P(BatchTest, AcrossTwoRanges) {
  auto b0 = make_backing(2 * kMiB);
  auto b1 = make_backing(2 * kMiB);
  MemremapParams p = make_params(GetParam(), b0);
  p.ranges.push_back(PagemapRangeSpec{b1, 0, 0});
  auto pg = must_memremap(std::move(p));
  ASSERT_TRUE(pg);
  std::optional<DevPagemap::Allocation> a0, a1;
  auto r0 = pg->request(b0->base_pfn(), 512);
  auto r1 = pg->request(b1->base_pfn(), 512);
  ASSERT_TRUE(r0 && r1);
  a0.emplace(std::move(r0).value());
  a1.emplace(std::move(r1).value());
  std::vector<Pfn> v;
  for (std::uint64_t i = 0; i < 4; ++i)
    v.push_back(b0->base_pfn() + 508 + i);
  for (std::uint64_t i = 0; i < 4; ++i)
    v.push_back(b1->base_pfn() + i);
  v.push_back(b0->base_pfn());
  BatchResult r;
  ASSERT_EQ(pg->pin_folios(v, &r), Errc::ok);
  EXPECT_EQ(r.done, v.size());
  EXPECT_EQ(r.atomics, v.size());
  for (Pfn q : v)
    EXPECT_EQ(pg->folio_ref_count(q), kBias) << q;
  ASSERT_EQ(pg->unpin_folios(v, &r), Errc::ok);
  for (Pfn q : v)
    EXPECT_EQ(pg->folio_ref_count(q), 0u) << q;
  a0.reset();
  a1.reset();
  auto m = pg->memunmap();
  EXPECT_TRUE(m) << m.error().to_string();
}

}  // namespace
}  // namespace pgmap
