#include "pgmap/core/wait_table.h"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "pgmap/core/sanitizer.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;

constexpr bool kSlowBuild = sanitizer::kThread || sanitizer::kAddress;

// Spins (with short sleeps) until pred() holds or `limit` passes; returns pred().
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 10s) {
  auto end = Clock::now() + limit;
  while (!pred()) {
    if (Clock::now() >= end) return pred();
    std::this_thread::sleep_for(100us);
  }
  return true;
}

// Waits for a waiter thread to report `done`. If it does not within `limit`, the wake-up was
// lost: the test fails, and we keep waking the key so the thread can still be joined.
void expect_woken(const std::atomic<bool>& done, const void* key,
                  std::chrono::milliseconds limit = 10s) {
  if (eventually([&] { return done.load(); }, limit)) return;
  ADD_FAILURE() << "waiter not woken within " << limit.count() << " ms: lost wake-up";
  while (!done.load()) {
    wake_up_var(key);
    std::this_thread::sleep_for(1ms);
  }
}

TEST(WaitTableTest, DeadlineAfter) {
  EXPECT_FALSE(deadline_after(std::nullopt).has_value());
  auto before = Clock::now();
  Deadline d = deadline_after(50ms);
  ASSERT_TRUE(d.has_value());
  EXPECT_GE(*d, before + 50ms);
  EXPECT_LE(*d, Clock::now() + 50ms);
}

TEST(WaitTableTest, ReturnsImmediatelyWhenConditionHolds) {
  int key = 0;
  int calls = 0;
  WaitOptions opts;
  opts.deadline = Clock::now() - 1s;  // already passed: must still report ok, not timed_out
  Errc e = wait_var_event(
      &key,
      [&] {
        ++calls;
        return true;
      },
      opts);
  EXPECT_EQ(e, Errc::ok);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(WaitTable::global().waiters(&key), 0u);
}

TEST(WaitTableTest, WakeWithoutWaitersIsHarmless) {
  int key = 0;
  EXPECT_EQ(WaitTable::global().waiters(&key), 0u);
  for (int i = 0; i < 1000; ++i)
    wake_up_var(&key);
  EXPECT_EQ(WaitTable::global().waiters(&key), 0u);
}

TEST(WaitTableTest, BlockedWaiterIsWokenByStoreAndWake) {
  std::atomic<int> var{0};
  std::atomic<bool> done{false};
  Errc result = Errc::invalid_argument;
  std::thread waiter([&] {
    // No deadline: only the wake-up can end this wait.
    result = wait_var_event(&var, [&] { return var.load() == 1; });
    done.store(true);
  });
  EXPECT_TRUE(eventually([&] { return WaitTable::global().waiters(&var) >= 1; }));
  std::this_thread::sleep_for(5ms);  // let it get from registration to sleeping (either is fine)
  EXPECT_FALSE(done.load());
  var.store(1);
  wake_up_var(&var);
  expect_woken(done, &var);
  waiter.join();
  EXPECT_EQ(result, Errc::ok);
  EXPECT_EQ(WaitTable::global().waiters(&var), 0u);
}

TEST(WaitTableTest, WakeWithoutStateChangeDoesNotEndWait) {
  std::atomic<int> var{0};
  std::atomic<bool> done{false};
  std::atomic<int> checks{0};
  Errc result = Errc::invalid_argument;
  std::thread waiter([&] {
    result = wait_var_event(&var, [&] {
      checks.fetch_add(1);
      return var.load() == 1;
    });
    done.store(true);
  });
  EXPECT_TRUE(eventually([&] { return WaitTable::global().waiters(&var) >= 1; }));
  for (int i = 0; i < 20; ++i) {  // spurious wake-ups: the waiter re-checks and keeps waiting
    wake_up_var(&var);
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_FALSE(done.load());
  EXPECT_GE(checks.load(), 2);  // at least one re-check after a wake-up
  var.store(1);
  wake_up_var(&var);
  expect_woken(done, &var);
  waiter.join();
  EXPECT_EQ(result, Errc::ok);
}

TEST(WaitTableTest, TimeoutReturnsTimedOutAfterDeadline) {
  int key = 0;
  constexpr auto kTimeout = 100ms;
  WaitOptions opts;
  auto start = Clock::now();
  opts.deadline = start + kTimeout;
  int calls = 0;
  Errc e = wait_var_event(
      &key,
      [&] {
        ++calls;
        return false;
      },
      opts);
  auto elapsed = Clock::now() - start;
  EXPECT_EQ(e, Errc::timed_out);
  EXPECT_GE(elapsed, kTimeout);
  EXPECT_LT(elapsed, 5s);
  EXPECT_GE(calls, 2);  // checked before and after the sleep
  EXPECT_EQ(WaitTable::global().waiters(&key), 0u);
}

TEST(WaitTableTest, TimeoutOnPrivateTable) {
  auto table = std::make_unique<WaitTable>();
  int key = 0;
  WaitOptions opts;
  opts.deadline = deadline_after(20ms);
  EXPECT_EQ(table->wait(
                &key, [] { return false; }, opts),
            Errc::timed_out);
  EXPECT_GE(Clock::now(), *opts.deadline);
  EXPECT_EQ(table->waiters(&key), 0u);
}

TEST(WaitTableTest, ProgressRunsDuringLongWait) {
  std::atomic<int> var{0};
  std::atomic<int> progress_calls{0};
  WaitOptions opts;
  opts.deadline = deadline_after(20s);  // safety net only
  opts.progress_every = 10ms;
  opts.progress = [&] {
    // Runs without the bucket lock: waking the very bucket we wait in must not deadlock.
    wake_up_var(&var);
    if (progress_calls.fetch_add(1) + 1 == 3) {
      var.store(1);
      wake_up_var(&var);
    }
  };
  auto start = Clock::now();
  Errc e = wait_var_event(
      &var, [&] { return var.load() == 1; }, opts);
  auto elapsed = Clock::now() - start;
  EXPECT_EQ(e, Errc::ok);
  EXPECT_EQ(progress_calls.load(), 3);  // the condition became true in the third call
  EXPECT_GE(elapsed, 30ms);             // about every 10 ms, never earlier
  EXPECT_LT(elapsed, 10s);
}

TEST(WaitTableTest, ProgressWithTimeout) {
  int key = 0;
  std::atomic<int> progress_calls{0};
  WaitOptions opts;
  opts.deadline = deadline_after(300ms);
  opts.progress_every = 10ms;
  opts.progress = [&] { progress_calls.fetch_add(1); };
  EXPECT_EQ(wait_var_event(
                &key, [] { return false; }, opts),
            Errc::timed_out);
  EXPECT_GE(Clock::now(), *opts.deadline);
  EXPECT_GE(progress_calls.load(), 1);
  EXPECT_LE(progress_calls.load(), 30);  // never more often than every 10 ms
}

// Finds, among `candidates`, an address other than `a` whose bucket is `a`'s, using the public
// waiters() count while a thread waits on `a`: no assumption about the hash function.
template <std::size_t N>
const void* find_colliding_key(std::array<std::atomic<int>, N>& candidates, const void* a) {
  std::atomic<bool> stop{false};
  std::thread holder([&] { (void)wait_var_event(a, [&] { return stop.load(); }); });
  const void* found = nullptr;
  if (eventually([&] { return WaitTable::global().waiters(a) >= 1; })) {
    for (auto& c : candidates) {
      if (&c != a && WaitTable::global().waiters(&c) >= 1) {
        found = &c;
        break;
      }
    }
  }
  stop.store(true);
  wake_up_var(a);
  holder.join();
  return found;
}

TEST(WaitTableTest, CollidingKeysDoNotLoseWakeups) {
  // 4096 consecutive ints cover every bucket many times over for any reasonable hash.
  static std::array<std::atomic<int>, 4096> vars{};
  for (auto& v : vars)
    v.store(0);
  std::atomic<int>& a = vars[0];
  const void* b_key = find_colliding_key(vars, &a);
  ASSERT_NE(b_key, nullptr) << "no key shares a bucket with vars[0]";
  auto& b = *static_cast<std::atomic<int>*>(const_cast<void*>(b_key));

  for (int round = 0; round < (kSlowBuild ? 20 : 100); ++round) {
    a.store(0);
    b.store(0);
    std::atomic<bool> a_done{false};
    std::atomic<bool> b_done{false};
    Errc ra = Errc::invalid_argument;
    Errc rb = Errc::invalid_argument;
    std::thread ta([&] {
      ra = wait_var_event(&a, [&] { return a.load() == 1; });
      a_done.store(true);
    });
    std::thread tb([&] {
      rb = wait_var_event(&b, [&] { return b.load() == 1; });
      b_done.store(true);
    });
    EXPECT_TRUE(eventually([&] { return WaitTable::global().waiters(&a) >= 2; }));

    // Waking a wakes b too (shared bucket); b re-checks and keeps waiting.
    a.store(1);
    wake_up_var(&a);
    expect_woken(a_done, &a);
    if (round % 10 == 0) {
      std::this_thread::sleep_for(2ms);
      EXPECT_FALSE(b_done.load()) << "b returned while its condition was false";
    }
    b.store(1);
    wake_up_var(&b);
    expect_woken(b_done, &b);
    ta.join();
    tb.join();
    EXPECT_EQ(ra, Errc::ok);
    EXPECT_EQ(rb, Errc::ok);
  }
  EXPECT_EQ(WaitTable::global().waiters(&a), 0u);
}

TEST(WaitTableTest, CollidingKeysWakeOfOtherKeyWakesBucket) {
  // Documented: a wake-up wakes every waiter of the bucket, so b's waiter sees its new state even
  // when only a is woken.
  static std::array<std::atomic<int>, 4096> vars{};
  std::atomic<int>& a = vars[0];
  const void* b_key = find_colliding_key(vars, &a);
  ASSERT_NE(b_key, nullptr);
  auto& b = *static_cast<std::atomic<int>*>(const_cast<void*>(b_key));
  b.store(0);
  std::atomic<bool> done{false};
  std::thread tb([&] {
    EXPECT_EQ(wait_var_event(&b, [&] { return b.load() == 1; }), Errc::ok);
    done.store(true);
  });
  EXPECT_TRUE(eventually([&] { return WaitTable::global().waiters(&b) >= 1; }));
  b.store(1);
  wake_up_var(&a);
  expect_woken(done, &b);
  tb.join();
}

// N waiters, each waiting for its own counter to pass every value 1..K in turn, while one driver
// increments the counters round-robin and wakes them. Every wait must end with ok (the deadline
// is a safety net that turns a lost wake-up into a failure instead of a hang).
TEST(WaitTableStressTest, ManyWaitersOwnCounters) {
  constexpr int kWaiters = 4;
  const std::uint64_t kTarget = kSlowBuild ? 2000 : 20000;
  struct alignas(64) Counter {
    std::atomic<std::uint64_t> value{0};
  };
  std::array<Counter, kWaiters> counters;
  std::array<std::atomic<std::uint64_t>, kWaiters> waits{};
  std::array<std::atomic<int>, kWaiters> failures{};
  std::atomic<int> finished{0};

  std::vector<std::thread> waiters;
  for (int i = 0; i < kWaiters; ++i) {
    waiters.emplace_back([&, i] {
      auto& c = counters[static_cast<std::size_t>(i)].value;
      WaitOptions opts;
      opts.deadline = deadline_after(60s);
      for (std::uint64_t target = 1; target <= kTarget; ++target) {
        Errc e = wait_var_event(
            &c, [&] { return c.load(std::memory_order_acquire) >= target; }, opts);
        if (e != Errc::ok) {
          failures[static_cast<std::size_t>(i)].fetch_add(1);
          break;
        }
        waits[static_cast<std::size_t>(i)].fetch_add(1, std::memory_order_relaxed);
      }
      finished.fetch_add(1);
    });
  }

  std::uint64_t steps = 0;
  for (std::uint64_t round = 0; round < kTarget; ++round) {
    for (int i = 0; i < kWaiters; ++i) {
      auto& c = counters[static_cast<std::size_t>(i)].value;
      c.fetch_add(1, std::memory_order_release);
      wake_up_var(&c);
      ++steps;
    }
    if (round % 64 == 0) std::this_thread::yield();  // let waiters block now and then
  }
  EXPECT_EQ(steps, kTarget * kWaiters);  // the driver is bounded
  for (auto& t : waiters)
    t.join();
  EXPECT_EQ(finished.load(), kWaiters);
  for (int i = 0; i < kWaiters; ++i) {
    EXPECT_EQ(failures[static_cast<std::size_t>(i)].load(), 0) << "waiter " << i;
    EXPECT_EQ(waits[static_cast<std::size_t>(i)].load(), kTarget) << "waiter " << i;
    EXPECT_EQ(counters[static_cast<std::size_t>(i)].value.load(), kTarget);
    EXPECT_EQ(WaitTable::global().waiters(&counters[static_cast<std::size_t>(i)].value), 0u);
  }
}

}  // namespace
}  // namespace pgmap
