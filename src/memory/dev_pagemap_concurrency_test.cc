// Concurrency tests of DevPagemap: folio references, pins and lookups racing memunmap under every
// safe strategy, concurrent memunmaps, and memremap/memunmap churn racing lookups. The invariants
// are the strategies' common guarantee (strategy.h, I1-I3): when memunmap returns nothing is held
// and no free path is still running, and nothing can be taken afterwards.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;
using State = DevPagemap::State;
using testutil::eventually;
using testutil::FolioHold;
using testutil::kSanitized;
using testutil::make_backing;
using testutil::make_params;
using testutil::must_memremap;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
// Release: ~3 s in all on 2 cores; sanitizer builds run about a third of it.
constexpr int kRaceRounds = kSanitized ? 100 : 300;
constexpr int kLookupRounds = kSanitized ? 20 : 50;
constexpr int kUnmapRounds = kSanitized ? 20 : 50;
constexpr int kChurnCycles = kSanitized ? 500 : 1500;

class ConcurrencyTest : public ::testing::TestWithParam<Strategy> {
 protected:
  testutil::MisuseCounter misuse_;
};

INSTANTIATE_TEST_SUITE_P(SafeStrategies, ConcurrencyTest, ::testing::ValuesIn(kSafeStrategies),
                         testutil::strategy_param_name);

class AllStrategiesConcurrencyTest : public ConcurrencyTest {};
INSTANTIATE_TEST_SUITE_P(AllStrategies, AllStrategiesConcurrencyTest,
                         ::testing::ValuesIn(kAllStrategies), testutil::strategy_param_name);

// A few nanoseconds to a microsecond of "use" while a reference is held.
void hold_for_a_while(std::minstd_rand& rng) {
  const unsigned spins = static_cast<unsigned>(rng() % 64);
  for (unsigned i = 0; i < spins; ++i)
    asm volatile("" ::: "memory");
  if (rng() % 16 == 0) std::this_thread::yield();
}

// ---- folio references and pins racing memunmap
// ---------------------------------------------------

struct RaceState {
  DevPagemap* pg = nullptr;
  PfnRange range;
  std::atomic<bool> unmapped{false};        // memunmap has returned
  std::atomic<int> held{0};                 // folio references held by the workers right now
  std::atomic<int> in_free{0};              // page_free calls in progress
  std::atomic<std::uint64_t> gets{0};       // successful gets and pins
  std::atomic<std::uint64_t> late_gets{0};  // successful ones that started after memunmap returned
  std::atomic<std::uint64_t> killed_gets{0};  // successful ones that started once it was dying
  std::atomic<std::uint64_t> frees{0};
  std::atomic<std::uint64_t> errors{0};  // unexpected results
  std::atomic<std::uint64_t> stopped_dead{0};
};

// Worker `w` of 2 uses the pfns of parity w and holds one folio at a time, so every get it makes
// is on an idle folio: none may succeed once the pagemap is dying.
void folio_worker(RaceState& st, unsigned w, unsigned seed) {
  std::minstd_rand rng(seed);
  DevPagemap& pg = *st.pg;
  const bool alloc_event = pg.strategy() == Strategy::alloc_event;
  for (;;) {
    const bool after = st.unmapped.load(std::memory_order_seq_cst);
    const bool killed = pg.state() != State::live;
    const Pfn pfn = st.range.start + 2 * (rng() % (st.range.count / 2)) + w;
    const bool pin = rng() % 4 == 0;
    DevPagemap::Allocation alloc;  // alloc_event: the allocation covers the reference
    if (alloc_event) {
      auto a = pg.request(pfn, 1);
      if (!a) {
        if (a.code() != Errc::dead) st.errors.fetch_add(1);
        st.stopped_dead.fetch_add(1);
        return;
      }
      if (after) st.late_gets.fetch_add(1);
      alloc = std::move(a).value();
    }
    const Errc e = pin ? pg.pin_folio(pfn) : pg.get_folio(pfn);
    if (e == Errc::dead || e == Errc::use_after_teardown) {
      // use_after_teardown: this thread slept through the whole memunmap and reached the
      // quarantined metadata; the get did not succeed, which is what matters here.
      st.stopped_dead.fetch_add(1);
      return;
    }
    if (e != Errc::ok) {
      st.errors.fetch_add(1);
      return;
    }
    if (after) st.late_gets.fetch_add(1);
    if (killed) st.killed_gets.fetch_add(1);
    st.held.fetch_add(1, std::memory_order_seq_cst);
    st.gets.fetch_add(1, std::memory_order_relaxed);
    hold_for_a_while(rng);
    st.held.fetch_sub(1, std::memory_order_seq_cst);  // just before the put
    if ((pin ? pg.unpin_folio(pfn) : pg.put_folio(pfn)) != Errc::ok) st.errors.fetch_add(1);
  }
}

TEST_P(ConcurrencyTest, FolioReferencesRacingMemunmap) {
  auto backing = make_backing(4 * kMiB);
  ASSERT_TRUE(backing);
  std::uint64_t total_gets = 0;
  for (int round = 0; round < kRaceRounds; ++round) {
    RaceState st;
    MemremapParams p = make_params(GetParam(), backing);
    // Quarantine, so that a worker that sleeps through the whole memunmap and then touches the
    // metadata is reported instead of faulting (the workers act as the owner and hold nothing).
    p.quarantine = true;
    p.ops.page_free = [&st](DevPagemap&, Pfn, unsigned) {
      st.in_free.fetch_add(1, std::memory_order_seq_cst);
      std::this_thread::yield();
      st.frees.fetch_add(1, std::memory_order_relaxed);
      st.in_free.fetch_sub(1, std::memory_order_seq_cst);
    };
    auto pg = must_memremap(std::move(p));
    ASSERT_TRUE(pg);
    st.pg = pg.get();
    st.range = pg->range(0);

    std::vector<std::thread> workers;
    for (unsigned w = 0; w < 2; ++w) {
      workers.emplace_back(folio_worker, std::ref(st), w, 1000u * static_cast<unsigned>(round) + w);
    }
    // Let the workers get going, then tear down under them.
    eventually([&] { return st.gets.load() >= 200 || st.errors.load() != 0; }, 5s);
    auto r = pg->memunmap();
    const int held_at_return = st.held.load(std::memory_order_seq_cst);
    const int in_free_at_return = st.in_free.load(std::memory_order_seq_cst);
    st.unmapped.store(true, std::memory_order_seq_cst);
    for (std::thread& t : workers)
      t.join();

    ASSERT_TRUE(r) << "round " << round << ": " << r.error().to_string();
    EXPECT_EQ(pg->state(), State::dead);
    ASSERT_EQ(held_at_return, 0) << "round " << round << ": memunmap returned with folios held";
    ASSERT_EQ(in_free_at_return, 0) << "round " << round << ": memunmap returned during page_free";
    ASSERT_EQ(st.late_gets.load(), 0u) << "round " << round << ": a get succeeded after memunmap";
    ASSERT_EQ(st.killed_gets.load(), 0u) << "round " << round << ": an idle folio became busy "
                                         << "after the kill";
    ASSERT_EQ(st.errors.load(), 0u) << "round " << round;
    ASSERT_EQ(st.stopped_dead.load(), 2u) << "round " << round;
    EXPECT_FALSE(get_dev_pagemap(st.range.start));
    total_gets += st.gets.load();
  }
  EXPECT_EQ(misuse_.reported(), 0u);
  EXPECT_GT(total_gets, 0u);
}

// ---- lookups racing memunmap
// ----------------------------------------------------------------------

struct LookupState {
  DevPagemap* pg = nullptr;
  PfnRange range;
  std::string expected_description;
  std::atomic<bool> unmapped{false};
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> misses{0};
  std::atomic<std::uint64_t> late_hits{0};  // lookups that started after memunmap and succeeded
  std::atomic<std::uint64_t> errors{0};
};

void lookup_reader(LookupState& st, unsigned seed) {
  std::minstd_rand rng(seed);
  while (!st.stop.load(std::memory_order_relaxed)) {
    const bool after = st.unmapped.load(std::memory_order_seq_cst);
    // Mostly pfns of the pagemap, sometimes just outside it.
    const Pfn pfn = st.range.start - 1 + rng() % (st.range.count + 2);
    PagemapRef ref = get_dev_pagemap(pfn);
    if (!ref) {
      st.misses.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (after) st.late_hits.fetch_add(1);
    if (ref.get() != st.pg || !st.range.contains(pfn)) st.errors.fetch_add(1);
    // The reference keeps the pagemap usable: describe it, and take and drop a folio reference.
    if (ref->describe() != st.expected_description) st.errors.fetch_add(1);
    if (ref->state() == State::dead) st.errors.fetch_add(1);
    const Errc e = ref->get_folio(pfn);
    if (e == Errc::ok) {
      hold_for_a_while(rng);
      if (ref->put_folio(pfn) != Errc::ok) st.errors.fetch_add(1);
    } else if (e != Errc::dead) {
      st.errors.fetch_add(1);
    }
    st.hits.fetch_add(1, std::memory_order_relaxed);
    ref.reset();
  }
}

TEST_P(ConcurrencyTest, LookupsRacingMemunmap) {
  auto backing = make_backing(4 * kMiB);
  ASSERT_TRUE(backing);
  std::uint64_t total_hits = 0;
  for (int round = 0; round < kLookupRounds; ++round) {
    LookupState st;
    MemremapParams p = make_params(GetParam(), backing);
    p.quarantine = true;
    auto pg = must_memremap(std::move(p));
    ASSERT_TRUE(pg);
    st.pg = pg.get();
    st.range = pg->range(0);
    st.expected_description = pg->describe();

    std::vector<std::thread> readers;
    for (unsigned t = 0; t < 2; ++t) {
      readers.emplace_back(lookup_reader, std::ref(st), 7000u * static_cast<unsigned>(round) + t);
    }
    eventually([&] { return st.hits.load() >= 100 || st.errors.load() != 0; }, 5s);
    auto r = pg->memunmap();
    st.unmapped.store(true, std::memory_order_seq_cst);
    // Let the readers look the stale pfns up for a moment before stopping them.
    const std::uint64_t misses = st.misses.load();
    eventually([&] { return st.misses.load() >= misses + 50; }, 5s);
    st.stop.store(true);
    for (std::thread& t : readers)
      t.join();

    ASSERT_TRUE(r) << "round " << round << ": " << r.error().to_string();
    ASSERT_EQ(st.late_hits.load(), 0u) << "round " << round << ": lookup after memunmap";
    ASSERT_EQ(st.errors.load(), 0u) << "round " << round;
    EXPECT_EQ(pg->late_accesses(), 0u);
    total_hits += st.hits.load();
  }
  EXPECT_GT(total_hits, 0u);
  EXPECT_EQ(misuse_.reported(), 0u);
}

// ---- concurrent memunmaps -----------------------------------------------------------------------

TEST_P(AllStrategiesConcurrencyTest, TwoMemunmapsOneWins) {
  auto backing = make_backing(2 * kMiB);
  ASSERT_TRUE(backing);
  const bool safe = GetParam() != Strategy::none;
  for (int round = 0; round < kUnmapRounds; ++round) {
    auto pg = must_memremap(make_params(GetParam(), backing));
    ASSERT_TRUE(pg);
    // A folio held for a moment, so the two calls overlap in the wait (safe strategies).
    FolioHold hold;
    if (safe) {
      ASSERT_EQ(hold.take(*pg, pg->range(0).start + 1), Errc::ok);
    }
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    Errc results[2] = {Errc::ok, Errc::ok};
    std::vector<std::thread> callers;
    for (int i = 0; i < 2; ++i) {
      callers.emplace_back([&, i] {
        ready.fetch_add(1);
        while (!go.load())
          std::this_thread::yield();
        results[i] = pg->memunmap().code();
      });
    }
    while (ready.load() < 2)
      std::this_thread::yield();
    go.store(true);
    if (safe) {
      eventually([&] { return pg->state() == State::dying; }, 5s);
      std::this_thread::sleep_for(1ms);
      EXPECT_EQ(hold.release(), Errc::ok);
    }
    for (std::thread& t : callers)
      t.join();
    const int ok = (results[0] == Errc::ok) + (results[1] == Errc::ok);
    const int dead = (results[0] == Errc::already_dead) + (results[1] == Errc::already_dead);
    ASSERT_EQ(ok, 1) << "round " << round << ": " << errc_name(results[0]) << ", "
                     << errc_name(results[1]);
    ASSERT_EQ(dead, 1) << "round " << round;
    EXPECT_EQ(pg->state(), State::dead);
  }
  EXPECT_EQ(misuse_.reported(), 0u);
}

// ---- memremap/memunmap churn racing lookups -----------------------------------------------------

TEST(DevPagemapChurnTest, DisjointChurnRacingLookups) {
  testutil::MisuseCounter misuse;
  std::shared_ptr<Backing> backings[2] = {make_backing(4 * kMiB), make_backing(2 * kMiB)};
  ASSERT_TRUE(backings[0] && backings[1]);
  const std::size_t published_before = pagemap_count();
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> errors{0};
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> lookups{0};
  std::atomic<int> churners_done{0};

  auto churn = [&](int id) {
    std::minstd_rand rng(static_cast<unsigned>(id) + 1);
    const std::shared_ptr<Backing>& b = backings[id];
    for (int cycle = 0; cycle < kChurnCycles; ++cycle) {
      const Strategy s = kSafeStrategies[static_cast<std::size_t>(cycle) % kSafeStrategies.size()];
      MemremapParams p = make_params(s, b, cycle % 3 == 0 ? kPmdOrder : 0);
      if (cycle % 2 == 1) {  // a part of the backing only, so lookups also see partial maps
        p.ranges[0].offset = 0;
        p.ranges[0].size = 2 * kMiB;
      }
      p.name = "churn-" + std::to_string(id);
      auto r = memremap(std::move(p));
      if (!r) {
        ADD_FAILURE() << "churner " << id << " cycle " << cycle << ": " << r.error().to_string();
        errors.fetch_add(1);
        break;
      }
      std::shared_ptr<DevPagemap> pg = std::move(r).value();
      FolioHold hold;
      const Pfn pfn = pg->range(0).start + rng() % pg->total_pages();
      if (hold.take(*pg, pfn) != Errc::ok) errors.fetch_add(1);
      std::this_thread::yield();
      if (hold.release() != Errc::ok) errors.fetch_add(1);
      auto u = pg->memunmap();
      if (!u) {
        ADD_FAILURE() << "churner " << id << " cycle " << cycle << ": " << u.error().to_string();
        errors.fetch_add(1);
        break;
      }
    }
    churners_done.fetch_add(1);
  };

  auto reader = [&] {
    std::minstd_rand rng(99);
    const PfnRange r0 = backings[0]->pfns();
    const PfnRange r1 = backings[1]->pfns();
    while (!stop.load(std::memory_order_relaxed)) {
      const PfnRange& r = rng() % 2 == 0 ? r0 : r1;
      const Pfn pfn = r.start + rng() % r.count;
      lookups.fetch_add(1, std::memory_order_relaxed);
      PagemapRef ref = get_dev_pagemap(pfn);
      if (!ref) continue;
      hits.fetch_add(1, std::memory_order_relaxed);
      const std::string expected = &r == &r0 ? "churn-0" : "churn-1";
      if (!ref->contains(pfn) || ref->state() == State::dead || ref->name() != expected ||
          ref->describe().find(expected) == std::string::npos) {
        errors.fetch_add(1);
      }
    }
  };

  std::thread readers(reader);
  std::thread c0(churn, 0);
  std::thread c1(churn, 1);
  c0.join();
  c1.join();
  stop.store(true);
  readers.join();

  EXPECT_EQ(churners_done.load(), 2);
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_GT(lookups.load(), 0u);
  EXPECT_EQ(pagemap_count(), published_before);
  EXPECT_FALSE(get_dev_pagemap(backings[0]->base_pfn()));
  EXPECT_FALSE(get_dev_pagemap(backings[1]->base_pfn()));
  EXPECT_EQ(misuse.reported(), 0u);
  std::printf("churn: %llu lookups, %llu hits\n", static_cast<unsigned long long>(lookups.load()),
              static_cast<unsigned long long>(hits.load()));
}

}  // namespace
}  // namespace pgmap
