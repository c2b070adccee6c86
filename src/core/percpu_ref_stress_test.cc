// Concurrency stress for PercpuRef: kill, tryget_live, mode switches and thread exit racing with
// the fast path. Time-bounded: PGMAP_STRESS_SECONDS (default 2) is the budget of the main kill
// test; the other tests take half of it each. Sanitizer builds also cap the number of rounds.
#include "pgmap/core/percpu_ref.h"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/heavy_barrier.h"
#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;

constexpr bool kSlowBuild = sanitizer::kThread || sanitizer::kAddress;

std::chrono::duration<double> stress_budget(double fraction) {
  double seconds = 2.0;
  if (const char* env = std::getenv("PGMAP_STRESS_SECONDS")) {
    char* end = nullptr;
    double v = std::strtod(env, &end);
    if (end != env && v > 0) seconds = v;
  }
  return std::chrono::duration<double>(seconds * fraction);
}

std::atomic<int> g_misuse_calls{0};
void counting_handler(Errc, const char*) {
  g_misuse_calls.fetch_add(1);
}

// Worker threads check operations that cannot fail in a correct implementation with must(): a
// failure is counted (and reported by the fixture) rather than asserted in a hot loop.
std::atomic<std::uint64_t> g_op_failures{0};
void must(bool ok) {
  if (!ok) g_op_failures.fetch_add(1);
}

class PercpuRefStressTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_misuse_calls = 0;
    g_op_failures = 0;
    previous_ = set_misuse_handler(&counting_handler);
    std::printf("implementation: %s, heavy barrier (per-thread): %s\n",
                std::string(PercpuRef::implementation()).c_str(), detail::heavy_barrier_name());
  }
  void TearDown() override {
    EXPECT_EQ(g_misuse_calls.load(), 0) << "no operation in a stress test is misuse";
    EXPECT_EQ(g_op_failures.load(), 0u) << "an operation that cannot fail failed";
    set_misuse_handler(previous_);
  }
  MisuseHandler previous_ = nullptr;
};

// Waits (bounded) until `counter` is at least `value`; release callbacks wake it.
bool wait_for_at_least(const std::atomic<int>& counter, int value) {
  WaitOptions opts;
  opts.deadline = deadline_after(30s);
  return wait_var_event(
             &counter, [&] { return counter.load() >= value; }, opts) == Errc::ok;
}

struct alignas(64) Held {
  std::atomic<std::int64_t> n{0};  // references this worker holds right now
};

// ---- kill while two workers hammer get/put ------------------------------------------------------

TEST_F(PercpuRefStressTest, KillWhileHammering) {
  const auto budget = stress_budget(1.0);
  const int max_rounds = kSlowBuild ? 1000 : 1000000;
  const auto start = Clock::now();
  std::mt19937 rng(12345);
  int rounds = 0;
  std::uint64_t total_ops = 0;

  while (rounds < max_rounds && (rounds < 20 || Clock::now() - start < budget)) {
    ++rounds;
    std::array<Held, 2> held;
    std::atomic<int> releases{0};
    std::atomic<std::int64_t> held_at_release{-1};
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> ops{0};

    unsigned flags = 0;
    if (rounds % 5 == 0) flags |= PercpuRef::kInitAtomic;  // some rounds on the atomic path
    if (rounds % 7 == 0) flags |= PercpuRef::kAllowReinit;
    auto ref = std::make_unique<PercpuRef>(
        [&] {
          // The sum of what the workers believe they hold must be zero: every put is preceded by
          // the worker's decrement, every successful get followed by its increment.
          held_at_release.store(held[0].n.load() + held[1].n.load());
          releases.fetch_add(1);
          wake_up_var(&releases);
        },
        flags);

    auto worker = [&](int id) {
      std::atomic<std::int64_t>& mine = held[static_cast<std::size_t>(id)].n;
      std::uint64_t i = 0;
      std::uint64_t local_ops = 0;
      int trygets_after_kill = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        ++i;
        if ((i & 1023) == 0) std::this_thread::yield();  // 3 busy threads on 2 cores
        // The outer reference: tryget_live mostly, tryget sometimes. tryget keeps working after
        // kill until release, which races the atomic path with the last put; it is limited after
        // kill so that the workers cannot keep the count above zero for long.
        bool use_tryget = i % 4 == 0 && (!ref->is_dying() || ++trygets_after_kill <= 64);
        bool got = use_tryget ? ref->tryget() : ref->tryget_live();
        if (!got) {
          if (ref->is_zero()) std::this_thread::yield();
          continue;
        }
        mine.fetch_add(1);
        // While holding, get/put pairs and batches can never fail.
        for (int k = 0; k < 4; ++k) {
          must(ref->get() == Errc::ok);
          mine.fetch_add(1);
          mine.fetch_sub(1);
          must(ref->put() == Errc::ok);
        }
        std::uint64_t n = 1 + i % 16;
        must(ref->get_many(n) == Errc::ok);
        mine.fetch_add(static_cast<std::int64_t>(n));
        mine.fetch_sub(static_cast<std::int64_t>(n));
        must(ref->put_many(n) == Errc::ok);
        mine.fetch_sub(1);
        must(ref->put() == Errc::ok);
        local_ops += 12 + 2 * n;
      }
      ops.fetch_add(local_ops);
    };
    std::thread w0(worker, 0);
    std::thread w1(worker, 1);

    // Let the workers get going for a random little while, then kill.
    const auto spin = std::chrono::microseconds(rng() % 200);
    const auto spin_end = Clock::now() + spin;
    while (Clock::now() < spin_end)
      std::this_thread::yield();
    Errc killed = (rounds % 2 == 0) ? ref->kill() : ref->kill_and_confirm([&] {
      if (ref->tryget_live()) {  // must already fail inside confirm
        must(false);
        must(ref->put() == Errc::ok);
      }
    });
    EXPECT_EQ(killed, Errc::ok);

    bool released = wait_for_at_least(releases, 1);
    EXPECT_TRUE(released) << "round " << rounds << ": release did not run within 30 s";
    // Keep hammering a little after release: nothing may resurrect the count.
    std::this_thread::yield();
    stop.store(true);
    w0.join();
    w1.join();
    total_ops += ops.load();

    EXPECT_EQ(releases.load(), 1) << "round " << rounds;
    EXPECT_EQ(held_at_release.load(), 0) << "round " << rounds << ": released while held";
    EXPECT_EQ(held[0].n.load() + held[1].n.load(), 0);
    EXPECT_TRUE(ref->is_zero());
    EXPECT_FALSE(ref->tryget());
    if (::testing::Test::HasFailure()) break;
    ref.reset();
  }
  std::printf("KillWhileHammering: %d rounds, %llu ops\n", rounds,
              static_cast<unsigned long long>(total_ops));
  EXPECT_GE(rounds, 20);
}

// ---- tryget_live racing kill
// ---------------------------------------------------------------------

TEST_F(PercpuRefStressTest, TrygetLiveFailsOnceConfirmed) {
  const auto budget = stress_budget(0.5);
  const int max_rounds = kSlowBuild ? 1000 : 1000000;
  const auto start = Clock::now();
  std::mt19937 rng(777);
  int rounds = 0;
  std::uint64_t violations = 0;
  std::uint64_t successes_before_confirm = 0;
  std::uint64_t failures_after_confirm = 0;

  while (rounds < max_rounds && (rounds < 20 || Clock::now() - start < budget)) {
    ++rounds;
    std::atomic<bool> confirmed{false};
    std::atomic<bool> stop{false};
    std::atomic<int> releases{0};
    std::atomic<std::uint64_t> round_violations{0};
    std::atomic<std::uint64_t> round_successes{0};
    std::atomic<std::uint64_t> round_failures_confirmed{0};
    unsigned flags = (rounds % 4 == 0) ? PercpuRef::kInitAtomic : 0u;
    PercpuRef ref(
        [&] {
          releases.fetch_add(1);
          wake_up_var(&releases);
        },
        flags);

    auto worker = [&] {
      std::uint64_t v = 0;
      std::uint64_t ok = 0;
      std::uint64_t failed_confirmed = 0;
      std::uint64_t after = 0;
      std::uint64_t i = 0;
      while (!stop.load(std::memory_order_relaxed) && after < 64) {
        if ((++i & 1023) == 0) std::this_thread::yield();       // let the killer run
        bool seen = confirmed.load(std::memory_order_acquire);  // read BEFORE tryget_live
        if (ref.tryget_live()) {
          if (seen) ++v;  // started after confirm ran, and still succeeded
          ++ok;
          must(ref.put() == Errc::ok);
        } else if (seen) {
          ++failed_confirmed;
        }
        if (seen) ++after;
      }
      round_violations.fetch_add(v);
      round_successes.fetch_add(ok);
      round_failures_confirmed.fetch_add(failed_confirmed);
    };
    std::thread w0(worker);
    std::thread w1(worker);
    const auto spin_end = Clock::now() + std::chrono::microseconds(rng() % 150);
    while (Clock::now() < spin_end)
      std::this_thread::yield();

    EXPECT_EQ(ref.kill_and_confirm([&] { confirmed.store(true, std::memory_order_release); }),
              Errc::ok);
    EXPECT_TRUE(wait_for_at_least(releases, 1)) << "round " << rounds;
    stop.store(true);
    w0.join();
    w1.join();
    EXPECT_EQ(releases.load(), 1);
    EXPECT_TRUE(ref.is_zero());
    violations += round_violations.load();
    successes_before_confirm += round_successes.load();
    failures_after_confirm += round_failures_confirmed.load();
    if (::testing::Test::HasFailure()) break;
  }
  std::printf(
      "TrygetLiveFailsOnceConfirmed: %d rounds, %llu successes, %llu refused after "
      "confirm\n",
      rounds, static_cast<unsigned long long>(successes_before_confirm),
      static_cast<unsigned long long>(failures_after_confirm));
  EXPECT_EQ(violations, 0u);
  EXPECT_GT(failures_after_confirm, 0u);  // the race window was actually exercised
}

// ---- mode flapping under load
// ---------------------------------------------------------------------

TEST_F(PercpuRefStressTest, SwitchFlappingKeepsExactCount) {
  const auto budget = stress_budget(0.5);
  const int max_rounds = kSlowBuild ? 100 : 100000;
  const auto start = Clock::now();
  int rounds = 0;
  std::uint64_t switches = 0;

  while (rounds < max_rounds && (rounds < 5 || Clock::now() - start < budget)) {
    ++rounds;
    std::atomic<int> releases{0};
    PercpuRef ref([&] { releases.fetch_add(1); });
    std::array<Held, 2> held;
    std::atomic<bool> stop{false};

    auto worker = [&](int id) {
      std::atomic<std::int64_t>& mine = held[static_cast<std::size_t>(id)].n;
      std::mt19937 r(static_cast<unsigned>(id * 1000 + rounds));
      while (!stop.load(std::memory_order_relaxed)) {
        // A random walk that never drops below zero held: exercises gets and puts in both modes.
        std::uint64_t n = 1 + r() % 8;
        if (mine.load() >= static_cast<std::int64_t>(n) && r() % 2 == 0) {
          mine.fetch_sub(static_cast<std::int64_t>(n));
          must(ref.put_many(n) == Errc::ok);
        } else if (mine.load() < 1000) {
          must(ref.get_many(n) == Errc::ok);
          mine.fetch_add(static_cast<std::int64_t>(n));
        }
        must(ref.get() == Errc::ok);
        must(ref.put() == Errc::ok);
      }
    };
    std::thread w0(worker, 0);
    std::thread w1(worker, 1);
    const int flaps = kSlowBuild ? 50 : 400;
    for (int f = 0; f < flaps; ++f) {
      EXPECT_EQ(ref.switch_to_atomic(), Errc::ok);
      if (f % 8 == 0) std::this_thread::yield();
      EXPECT_EQ(ref.switch_to_percpu(), Errc::ok);
      switches += 2;
    }
    stop.store(true);
    w0.join();
    w1.join();

    // Exact after the fold: the initial reference plus what the workers still hold.
    std::int64_t still_held = held[0].n.load() + held[1].n.load();
    EXPECT_EQ(ref.switch_to_atomic(), Errc::ok);
    EXPECT_EQ(ref.approx_count(), 1 + still_held) << "round " << rounds;
    EXPECT_EQ(ref.switch_to_percpu(), Errc::ok);
    if (still_held > 0) {
      EXPECT_EQ(ref.put_many(static_cast<std::uint64_t>(still_held)), Errc::ok);
    }
    EXPECT_EQ(ref.kill(), Errc::ok);
    EXPECT_EQ(releases.load(), 1) << "round " << rounds;
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("SwitchFlappingKeepsExactCount: %d rounds, %llu switches\n", rounds,
              static_cast<unsigned long long>(switches));
}

// ---- threads exiting with references outstanding
// ---------------------------------------------------

TEST_F(PercpuRefStressTest, ThreadsExitWhileRefsOutstanding) {
  const auto budget = stress_budget(0.5);
  const int max_rounds = kSlowBuild ? 60 : 100000;
  const auto start = Clock::now();
  int rounds = 0;
  int threads_run = 0;

  while (rounds < max_rounds && (rounds < 3 || Clock::now() - start < budget)) {
    ++rounds;
    std::atomic<int> releases{0};
    std::atomic<std::int64_t> outstanding{0};  // refs passed to main and not yet put
    std::atomic<std::int64_t> outstanding_at_release{-1};
    PercpuRef ref(
        [&] {
          outstanding_at_release.store(outstanding.load());
          releases.fetch_add(1);
        },
        rounds % 3 == 0 ? PercpuRef::kInitAtomic : 0u);

    std::mutex mu;
    std::deque<int> queue;  // one entry per reference handed to main
    const int kThreads = kSlowBuild ? 16 : 64;
    constexpr int kConcurrent = 3;
    std::vector<std::thread> live;
    int spawned = 0;
    int kept_by_main = 0;
    while (spawned < kThreads || !live.empty()) {
      while (spawned < kThreads && static_cast<int>(live.size()) < kConcurrent) {
        live.emplace_back([&] {
          must(ref.get() == Errc::ok);
          must(ref.get_many(2) == Errc::ok);
          {
            std::lock_guard<std::mutex> lock(mu);
            outstanding.fetch_add(2);
            queue.push_back(1);
            queue.push_back(1);
          }
          must(ref.put() == Errc::ok);  // exits with its block at +2
        });
        ++spawned;
      }
      // Main drops handed-over refs while other threads start and exit (adopting parked blocks),
      // keeping a few until after the kill.
      for (;;) {
        {
          std::lock_guard<std::mutex> lock(mu);
          if (queue.empty()) break;
          queue.pop_front();
        }
        if (kept_by_main < 5) {
          ++kept_by_main;
          continue;
        }
        outstanding.fetch_sub(1);
        must(ref.put() == Errc::ok);
      }
      live.front().join();
      live.erase(live.begin());
    }
    threads_run += spawned;
    // Drain what the last threads handed over.
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (queue.empty()) break;
        queue.pop_front();
      }
      outstanding.fetch_sub(1);
      must(ref.put() == Errc::ok);
    }
    EXPECT_EQ(outstanding.load(), kept_by_main);
    EXPECT_EQ(ref.approx_count(), 1 + kept_by_main) << "round " << rounds;
    EXPECT_EQ(ref.kill(), Errc::ok);
    EXPECT_EQ(ref.approx_count(), kept_by_main);
    for (int i = 0; i < kept_by_main; ++i) {
      EXPECT_EQ(releases.load(), 0) << "released with " << kept_by_main - i << " outstanding";
      outstanding.fetch_sub(1);
      EXPECT_EQ(ref.put(), Errc::ok);
    }
    EXPECT_EQ(releases.load(), 1) << "round " << rounds;
    EXPECT_EQ(outstanding_at_release.load(), 0);
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("ThreadsExitWhileRefsOutstanding: %d rounds, %d threads\n", rounds, threads_run);
}

// ---- the critical section widened ---------------------------------------------------------------
//
// With yield points compiled in (debug, asan, tsan presets), every get/put spins inside its
// critical section (rseq: between reading the word and the committing add; per-thread: between
// the word check and the slot store), and the kill's windows yield now and then. A kill whose
// barrier did not abort (rseq) or wait for (per-thread) an operation caught in that window would
// let its add land after the fold: the count would go wrong, which this test sees exactly, with
// the workers still running, over many kill/resurrect rounds. Without yield points it still runs,
// unwidened.

#ifdef PGMAP_YIELD_POINTS
std::atomic<std::uint32_t> g_yield_rng{1};
void kill_window_hook(const char* name) noexcept {
  if (std::strncmp(name, "percpu.", 7) != 0) return;
  std::uint32_t x = g_yield_rng.fetch_add(0x9e3779b9u, std::memory_order_relaxed);
  if ((x >> 28) < 6) std::this_thread::yield();
}
#endif

TEST_F(PercpuRefStressTest, WidenedCriticalSectionStaysExactOverKillRounds) {
#ifdef PGMAP_YIELD_POINTS
  constexpr std::uint32_t kSpins = 300;
  detail::g_rseq_widen_spins.store(kSpins);
  YieldHook previous_hook = set_yield_hook(&kill_window_hook);
  std::printf("widened: %u spins inside every critical section\n", kSpins);
#else
  std::printf("not widened: yield points are not compiled in\n");
#endif
  const auto budget = stress_budget(1.0);
  const int max_rounds = kSlowBuild ? 400 : 100000;
  const auto start = Clock::now();
  std::mt19937 rng(4242);
  int rounds = 0;
  int kills = 0;
  std::uint64_t total_ops = 0;

  while (rounds < max_rounds && (rounds < 10 || Clock::now() - start < budget)) {
    ++rounds;
    std::atomic<int> releases{0};
    std::array<Held, 2> held;
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> ops{0};
    PercpuRef ref([&] { releases.fetch_add(1); }, PercpuRef::kAllowReinit);

    // Each worker keeps up to 8 references, taking them with tryget_live (which fails while the
    // ref is dead) and dropping them at random; `held` counts them: incremented after a get,
    // decremented before a put, so once the workers stop it is exactly what they hold.
    auto worker = [&](int id) {
      std::atomic<std::int64_t>& mine = held[static_cast<std::size_t>(id)].n;
      std::mt19937 r(static_cast<unsigned>(rounds * 7 + id));
      std::uint64_t local = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        if (mine.load() < 8 && r() % 2 == 0) {
          if (ref.tryget_live()) mine.fetch_add(1);
        } else if (mine.load() > 0) {
          mine.fetch_sub(1);
          must(ref.put() == Errc::ok);
        }
        if (mine.load() > 0) {  // while holding, get/put can never fail
          std::uint64_t n = 1 + r() % 4;
          must(ref.get_many(n) == Errc::ok);
          must(ref.put_many(n) == Errc::ok);
        }
        local += 2;
        if ((local & 1023) == 0) std::this_thread::yield();
      }
      ops.fetch_add(local);
    };
    std::thread w0(worker, 0);
    std::thread w1(worker, 1);

    // Several kill -> resurrect cycles per ref, with the workers running throughout. The main
    // thread holds one reference across them, so the ref cannot be released in between.
    must(ref.get() == Errc::ok);
    for (int cycle = 0; cycle < 4; ++cycle) {
      const auto spin_end = Clock::now() + std::chrono::microseconds(rng() % 300);
      while (Clock::now() < spin_end)
        std::this_thread::yield();
      EXPECT_EQ(ref.kill(), Errc::ok) << "round " << rounds << " cycle " << cycle;
      ++kills;
      // Atomic and exact now; the workers keep running, but can only drop references or get
      // within what they hold (tryget_live fails), until the resurrect.
      std::this_thread::yield();
      EXPECT_EQ(releases.load(), 0) << "released while the main thread holds a reference";
      if (cycle < 3) {
        EXPECT_EQ(ref.resurrect(), Errc::ok);
        EXPECT_TRUE(ref.is_percpu());
      }
    }
    stop.store(true);
    w0.join();
    w1.join();
    total_ops += ops.load();
    const std::int64_t still = held[0].n.load() + held[1].n.load() + 1;  // + main's
    EXPECT_EQ(ref.approx_count(), still) << "round " << rounds << ": the count is off";
    for (std::int64_t i = 0; i < still; ++i) {
      EXPECT_EQ(releases.load(), 0) << "released early, " << still - i << " still held";
      EXPECT_EQ(ref.put(), Errc::ok);
    }
    EXPECT_EQ(releases.load(), 1) << "round " << rounds;
    EXPECT_TRUE(ref.is_zero());
    if (::testing::Test::HasFailure()) break;
  }
#ifdef PGMAP_YIELD_POINTS
  detail::g_rseq_widen_spins.store(0);
  set_yield_hook(previous_hook);
#endif
  std::printf("WidenedCriticalSectionStaysExactOverKillRounds: %d rounds, %d kills, %llu ops\n",
              rounds, kills, static_cast<unsigned long long>(total_ops));
  EXPECT_GE(kills, 10);
}

}  // namespace
}  // namespace pgmap
