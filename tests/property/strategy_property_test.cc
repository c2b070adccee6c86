// The guarantee of DESIGN.md §4, checked the same way for every strategy.
//
// Each round memremaps a small pagemap (4 KiB folios plus one 2 MiB folio), lets worker threads
// take and drop folio references, pins and pagemap lookups at random (touching the device bytes of
// whatever they hold), and tears the pagemap down at a random moment with a random policy (wait,
// wait with a short timeout, refuse), retrying until the memunmap succeeds.
//
// Three kinds of worker take folio references, so that the race each strategy's safety rests on
// really happens:
//
//   guarded   holds a pagemap reference (tryget_live) around every get, as any user that looks at
//             an idle folio may (I1); memunmap drains it before any scan starts.
//   bare      (sweep, none) gets idle folios with nothing held around the get, as the owner of a
//             sweep pagemap does: its gets race memunmap's kill-then-scan directly.
//   alloc     (alloc_event) takes each folio reference under its own allocation (request()), the
//             way the dax layer's direct_access users do.
//
// An invariant checker records three kinds of violation:
//
//   held-at-return     a worker started dropping a folio reference or an allocation after
//                      memunmap had returned (teardown must wait for every holder). The check is
//                      made before the put, so a put that lands after the return is never missed,
//                      and one that landed before it is never counted;
//   busy-after-kill    a get on an idle folio succeeded although the worker had already seen the
//                      kill (tryget_live failing) before trying (no folio becomes busy after kill);
//   dead-metadata      a worker holding a reference saw its folio's refcount out of range
//                      (refcount > 0 must prove the pagemap exists: I1), or an operation reached
//                      torn-down metadata.
//
// Safe strategies must show none of them; `none` must show some, which is how we know the checker
// can fail. per_lookup, transition and alloc_event run with the metadata retired the default way
// (ASan-poisoned in ASan builds) so a late access would also crash or be reported; `none` and
// sweep run with quarantine, because their bare workers may legitimately reach a torn-down
// pagemap with a get (refused: Errc::use_after_teardown), and `none`'s violations must be counted
// instead of crashing the suite. A get refused with Errc::busy (sweep, alloc_event: the folio's
// last put was running its free path) is a lost race, not a violation.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;

constexpr std::uint64_t kBytes = 4 * kPmdSize;  // 2048 4 KiB pages; the last 2 MiB is one folio
constexpr int kWorkers = 3;                     // guarded
constexpr int kDirectWorkers = 2;               // bare (sweep, none) or alloc (alloc_event)

double stress_seconds() {
  const char* env = std::getenv("PGMAP_STRESS_SECONDS");
  double s = env != nullptr ? std::atof(env) : 1.5;
  if (sanitizer::kAddress || sanitizer::kThread) s /= 2;
  return s;
}

struct Violations {
  std::atomic<std::uint64_t> held_at_return{0};
  std::atomic<std::uint64_t> busy_after_kill{0};
  std::atomic<std::uint64_t> dead_metadata{0};
  std::atomic<std::uint64_t> unexpected{0};
  std::uint64_t total() const {
    return held_at_return + busy_after_kill + dead_metadata + unexpected;
  }
};

struct Round {
  Strategy strategy;
  std::shared_ptr<DevPagemap> pgmap;
  PfnRange pfns;
  Pfn big_folio;                                  // head of the 2 MiB folio
  std::vector<std::atomic<std::int32_t>> intent;  // per folio: holders + would-be holders
  std::atomic<bool> stop{false};
  std::atomic<bool> returned{false};  // the successful memunmap has returned
  Violations* v;
  // Set before the memunmap call that cannot give up. A memunmap that times out or refuses makes
  // the pagemap live again after its kill was visible; a get that saw that kill and then ran after
  // the revival rightly succeeds. So "the kill was visible, the get must fail" is only asserted
  // for a kill observed after this was set (every earlier call has returned by then).
  std::atomic<bool> final_unmap{false};

  std::uint64_t folio_index(Pfn pfn) const {
    return pfn >= big_folio ? big_folio - pfns.start : pfn - pfns.start;
  }
};

struct Held {
  Pfn pfn;
  bool pin;
  DevPagemap::Allocation alloc;  // alloc workers: the allocation covering this reference
};

// Called just before a holder lets go: if memunmap has already returned, it returned while this
// was held.
void check_not_returned(Round& r) {
  if (r.returned.load(std::memory_order_seq_cst)) r.v->held_at_return.fetch_add(1);
}

void drop_held(Round& r, Held& h) {
  DevPagemap& pg = *r.pgmap;
  check_not_returned(r);
  Errc e = h.pin ? pg.unpin_folio(h.pfn) : pg.put_folio(h.pfn);
  if (e == Errc::use_after_teardown) {
    r.v->dead_metadata.fetch_add(1);
  } else if (e != Errc::ok) {
    r.v->unexpected.fetch_add(1);
    ADD_FAILURE() << "put/unpin failed: " << errc_name(e);
  }
  r.intent[r.folio_index(h.pfn)].fetch_sub(1, std::memory_order_seq_cst);
  if (h.alloc) {
    check_not_returned(r);
    h.alloc.reset();
  }
}

// A successful get: record it and check what holding it must mean.
void got(Round& r, std::vector<Held>& mine, Pfn pfn, bool pin, DevPagemap::Allocation alloc,
         bool killed_before, std::int32_t others) {
  DevPagemap& pg = *r.pgmap;
  // Nobody else held or was taking this folio and the kill was visible: a safe strategy had to
  // refuse (alloc_event too: the allocation keeps the pagemap, not new folios).
  if (killed_before && others == 0) r.v->busy_after_kill.fetch_add(1);
  std::uint32_t count = pg.folio_ref_count(pfn);
  if (count == 0 || count > PageArray::kMaxRef) r.v->dead_metadata.fetch_add(1);
  if (r.strategy != Strategy::none) {
    // Touch the device memory we hold: under ASan a revoked page is reported here. Other workers
    // may hold the same folio, so the touch is atomic (TSan).
    auto* byte = reinterpret_cast<std::uint8_t*>(pg.address_of(pfn));
    std::atomic_ref<std::uint8_t>(*byte).fetch_add(1, std::memory_order_relaxed);
  }
  mine.push_back({pfn, pin, std::move(alloc)});
}

// Result of a refused get: true if the worker should stop taking references (the kill is
// visible), false to go on.
bool refused(Round& r, Errc e) {
  if (e == Errc::dead || e == Errc::use_after_teardown) return true;
  if (e == Errc::busy && (r.strategy == Strategy::sweep || r.strategy == Strategy::alloc_event)) {
    return false;  // raced the folio's final put (FREEING): a lost race, nothing changed
  }
  r.v->unexpected.fetch_add(1);
  ADD_FAILURE() << "get/pin failed: " << errc_name(e);
  return true;
}

// bare (sweep, none) and alloc (alloc_event) workers: see the file comment.
void direct_worker(Round& r, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<Held> mine;
  DevPagemap& pg = *r.pgmap;
  const bool alloc_event = r.strategy == Strategy::alloc_event;
  bool stopping = false;
  while (!r.stop.load(std::memory_order_relaxed) && !stopping) {
    unsigned op = static_cast<unsigned>(rng() % 100);
    if (op < 50 && mine.size() < 4) {
      Pfn pfn = r.pfns.start + rng() % r.pfns.count;
      bool pin = rng() % 4 == 0;
      DevPagemap::Allocation alloc;
      if (alloc_event) {
        auto a = pg.request(pfn, 1);
        if (!a) {
          if (a.code() != Errc::dead) {
            r.v->unexpected.fetch_add(1);
            ADD_FAILURE() << "request failed: " << errc_name(a.code());
          }
          break;
        }
        alloc = std::move(a).value();
      }
      auto& intent = r.intent[r.folio_index(pfn)];
      std::int32_t others = intent.fetch_add(1, std::memory_order_seq_cst);
      // The kill is visible once the state says so (published after the kill completes); only
      // the final one counts (Round::final_unmap).
      const bool final_unmap = r.final_unmap.load(std::memory_order_seq_cst);
      bool killed_before = pg.state() != DevPagemap::State::live;
      Errc e = pin ? pg.pin_folio(pfn) : pg.get_folio(pfn);
      if (e == Errc::ok) {
        got(r, mine, pfn, pin, std::move(alloc), killed_before && final_unmap, others);
      } else {
        intent.fetch_sub(1, std::memory_order_seq_cst);
        if (alloc) alloc.reset();
        stopping = refused(r, e);
      }
    } else if (!mine.empty()) {
      std::size_t i = rng() % mine.size();
      Held h = std::move(mine[i]);
      if (i + 1 != mine.size()) mine[i] = std::move(mine.back());
      mine.pop_back();
      drop_held(r, h);
    }
    if (rng() % 64 == 0) std::this_thread::yield();
  }
  for (Held& h : mine)
    drop_held(r, h);
}

void worker(Round& r, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<Held> mine;
  DevPagemap::Allocation alloc;
  DevPagemap& pg = *r.pgmap;

  auto drop_all = [&] {
    for (Held& h : mine)
      drop_held(r, h);
    mine.clear();
    if (alloc) {
      check_not_returned(r);
      alloc.reset();
    }
  };

  while (!r.stop.load(std::memory_order_relaxed)) {
    // Each iteration holds a pagemap reference, as any user that looks at an idle folio must
    // (I1): it keeps the metadata alive under the safe strategies while we probe and get.
    // Failing to take it means the kill is visible: stop acquiring and let the teardown finish.
    if (!pg.tryget_live()) break;
    bool stop_after = false;
    unsigned op = static_cast<unsigned>(rng() % 100);
    if (op < 45 && mine.size() < 6) {
      if (r.strategy == Strategy::alloc_event && !alloc) {
        auto a = pg.request(r.pfns.start, r.pfns.count);
        if (a) {
          alloc = std::move(a).value();
        } else {
          stop_after = true;  // the kill happened since our guard: fine
        }
      }
      if (!stop_after) {
        Pfn pfn = r.pfns.start + rng() % r.pfns.count;
        bool pin = rng() % 4 == 0;
        auto& intent = r.intent[r.folio_index(pfn)];
        std::int32_t others = intent.fetch_add(1, std::memory_order_seq_cst);
        // Has the final kill become visible? Then this get must not make an idle folio busy.
        const bool final_unmap = r.final_unmap.load(std::memory_order_seq_cst);
        bool killed_before = !pg.tryget_live();
        if (!killed_before) {
          EXPECT_EQ(pg.put_ref(), Errc::ok);
        }
        Errc e = pin ? pg.pin_folio(pfn) : pg.get_folio(pfn);
        if (e == Errc::ok) {
          got(r, mine, pfn, pin, {}, killed_before && final_unmap, others);
        } else {
          intent.fetch_sub(1, std::memory_order_seq_cst);
          stop_after = refused(r, e);
        }
      }
    } else if (op < 90 && !mine.empty()) {
      std::size_t i = rng() % mine.size();
      Held h = std::move(mine[i]);
      if (i + 1 != mine.size()) mine[i] = std::move(mine.back());
      mine.pop_back();
      drop_held(r, h);
    } else {
      Pfn pfn = r.pfns.start + rng() % r.pfns.count;
      PagemapRef ref = get_dev_pagemap(pfn);
      if (ref && ref.get() != r.pgmap.get()) r.v->unexpected.fetch_add(1);
      if (ref && ref->describe().empty()) r.v->unexpected.fetch_add(1);
    }
    EXPECT_EQ(pg.put_ref(), Errc::ok);
    if (stop_after) break;
    if (rng() % 64 == 0) std::this_thread::yield();
  }
  drop_all();
}

// Runs rounds for `seconds` and returns the violations seen.
void run_strategy(Strategy s, double seconds, Violations& v, int& rounds) {
  std::mt19937_64 rng(0x5eed + static_cast<unsigned>(s));
  auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  rounds = 0;
  while (std::chrono::steady_clock::now() < end || rounds < 5) {
    BackingOptions bo;
    bo.size = kBytes;
    auto backing = make_anonymous_backing(bo);
    ASSERT_TRUE(backing.ok()) << backing.error().to_string();
    std::shared_ptr<Backing> b = std::move(backing).value();

    MemremapParams params;
    params.type = rounds % 2 == 0 ? PagemapType::fs_dax : PagemapType::generic;
    params.strategy = s;
    params.ranges.push_back({b, 0, 0});
    // Bare workers may reach a torn-down pagemap with a get: keep its metadata mapped.
    params.quarantine = s == Strategy::none || s == Strategy::sweep;
    auto pgmap = memremap(params);
    ASSERT_TRUE(pgmap.ok()) << pgmap.error().to_string();

    Round r{s, std::move(pgmap).value(), {}, 0, {}, {}, {}, &v};
    r.pfns = PfnRange{b->base_pfn(), kBytes >> kPageShift};
    r.big_folio = r.pfns.end() - order_pages(kPmdOrder);
    PageArray* a = r.pgmap->array_for(r.big_folio);
    ASSERT_EQ(a->set_folio_order(a->index_of(r.big_folio), kPmdOrder), Errc::ok);
    r.intent = std::vector<std::atomic<std::int32_t>>(r.pfns.count);

    std::vector<std::thread> workers;
    for (int w = 0; w < kWorkers; ++w) {
      workers.emplace_back(worker, std::ref(r), static_cast<unsigned>(rng()));
    }
    if (s == Strategy::sweep || s == Strategy::none || s == Strategy::alloc_event) {
      for (int w = 0; w < kDirectWorkers; ++w) {
        workers.emplace_back(direct_worker, std::ref(r), static_cast<unsigned>(rng()));
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));

    // Random policy first; it may time out or be refused, which must leave the pagemap live.
    MemunmapOptions first;
    switch (rng() % 3) {
      case 0:
        r.final_unmap.store(true, std::memory_order_seq_cst);  // waits: cannot give up
        break;
      case 1:
        first.timeout = std::chrono::microseconds(200 + rng() % 2000);
        break;
      case 2:
        first.policy = UnmapPolicy::refuse;
        break;
    }
    auto res = r.pgmap->memunmap(first);
    r.final_unmap.store(true, std::memory_order_seq_cst);  // the retries below wait
    while (!res.ok()) {
      Errc c = res.code();
      EXPECT_TRUE(c == Errc::timed_out || c == Errc::busy) << res.error().to_string();
      EXPECT_NE(res.error().holders(), nullptr);
      EXPECT_EQ(r.pgmap->state(), DevPagemap::State::live);
      res = r.pgmap->memunmap();
    }
    r.returned.store(true, std::memory_order_seq_cst);
    EXPECT_EQ(r.pgmap->state(), DevPagemap::State::dead);
    r.stop.store(true);
    for (std::thread& t : workers)
      t.join();
    ++rounds;
  }
}

class StrategyProperty : public ::testing::TestWithParam<Strategy> {};

TEST_P(StrategyProperty, SafeStrategiesKeepTheGuarantee) {
  Violations v;
  int rounds = 0;
  run_strategy(GetParam(), stress_seconds(), v, rounds);
  EXPECT_EQ(v.held_at_return.load(), 0u);
  EXPECT_EQ(v.busy_after_kill.load(), 0u);
  EXPECT_EQ(v.dead_metadata.load(), 0u);
  EXPECT_EQ(v.unexpected.load(), 0u);
  RecordProperty("rounds", rounds);
  std::printf("%s: %d rounds, %llu violations\n", std::string(strategy_name(GetParam())).c_str(),
              rounds, static_cast<unsigned long long>(v.total()));
}

INSTANTIATE_TEST_SUITE_P(Safe, StrategyProperty, ::testing::ValuesIn(kSafeStrategies),
                         [](const auto& p) { return std::string(strategy_name(p.param)); });

// The same workload under `none` must be caught: this is what shows the checker can fail.
TEST(StrategyPropertyNone, NoneViolatesTheGuarantee) {
  Violations v;
  int rounds = 0;
  // Slices of at most 1 s until a violation shows (bounded: 20 slices), so a loaded machine that
  // happens to schedule the workers harmlessly in one slice does not make the test flaky.
  for (int slice = 0; slice < 20; ++slice) {
    run_strategy(Strategy::none, std::min(1.0, stress_seconds()), v, rounds);
    if (v.held_at_return.load() + v.dead_metadata.load() + v.busy_after_kill.load() > 0) break;
  }
  EXPECT_GT(v.held_at_return.load() + v.dead_metadata.load() + v.busy_after_kill.load(), 0u)
      << "the checker saw no violation under `none` in " << rounds << " rounds";
  EXPECT_EQ(v.unexpected.load(), 0u);
  std::printf("none: %d rounds, %llu held-at-return, %llu busy-after-kill, %llu dead-metadata\n",
              rounds, static_cast<unsigned long long>(v.held_at_return.load()),
              static_cast<unsigned long long>(v.busy_after_kill.load()),
              static_cast<unsigned long long>(v.dead_metadata.load()));
}

}  // namespace
}  // namespace pgmap
