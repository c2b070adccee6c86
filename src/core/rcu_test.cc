#include "pgmap/core/rcu.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"

namespace pgmap {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr bool kSlowBuild = sanitizer::kThread || sanitizer::kAddress;

std::atomic<int> g_misuse_calls{0};
std::atomic<Errc> g_misuse_code{Errc::ok};
void counting_handler(Errc code, const char*) {
  g_misuse_calls.fetch_add(1);
  g_misuse_code.store(code);
}

class RcuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_misuse_calls = 0;
    g_misuse_code.store(Errc::ok);
    previous_ = set_misuse_handler(&counting_handler);
  }
  void TearDown() override {
    set_misuse_handler(previous_);
    EXPECT_FALSE(rcu::in_read_section()) << "a test leaked a read section";
  }
  MisuseHandler previous_ = nullptr;
};

TEST_F(RcuTest, ReadGuardNests) {
  EXPECT_FALSE(rcu::in_read_section());
  {
    rcu::ReadGuard outer;
    EXPECT_TRUE(rcu::in_read_section());
    {
      rcu::ReadGuard inner;
      EXPECT_TRUE(rcu::in_read_section());
      {
        rcu::ReadGuard innermost;
        EXPECT_TRUE(rcu::in_read_section());
      }
      EXPECT_TRUE(rcu::in_read_section());
    }
    EXPECT_TRUE(rcu::in_read_section());  // still inside the outer section
  }
  EXPECT_FALSE(rcu::in_read_section());
  EXPECT_EQ(rcu::synchronize(), Errc::ok);
  EXPECT_EQ(g_misuse_calls.load(), 0);
}

TEST_F(RcuTest, ReadSectionIsPerThread) {
  rcu::ReadGuard g;
  bool other_thread_inside = true;
  std::thread t([&] { other_thread_inside = rcu::in_read_section(); });
  t.join();
  EXPECT_FALSE(other_thread_inside);
}

TEST_F(RcuTest, SynchronizeWithoutReadersReturns) {
  for (int i = 0; i < 10; ++i)
    EXPECT_EQ(rcu::synchronize(), Errc::ok);
  // A thread that read once and exited does not hold up later grace periods.
  std::thread t([] { rcu::ReadGuard g; });
  t.join();
  EXPECT_EQ(rcu::synchronize(), Errc::ok);
}

TEST_F(RcuTest, SynchronizeInsideReadSectionIsMisuse) {
  std::uint64_t before = misuse_count();
  {
    rcu::ReadGuard g;
    EXPECT_EQ(rcu::synchronize(), Errc::invalid_argument);
    {
      rcu::ReadGuard nested;
      EXPECT_EQ(rcu::synchronize(), Errc::invalid_argument);
    }
    EXPECT_EQ(rcu::synchronize(), Errc::invalid_argument);  // still inside the outer one
  }
  EXPECT_EQ(g_misuse_calls.load(), 3);
  EXPECT_EQ(g_misuse_code.load(), Errc::invalid_argument);
  EXPECT_EQ(misuse_count(), before + 3);
  EXPECT_EQ(rcu::synchronize(), Errc::ok);  // outside again
  EXPECT_EQ(g_misuse_calls.load(), 3);
}

TEST_F(RcuTest, SynchronizeWaitsForReader) {
  std::atomic<bool> reader_inside{false};
  std::atomic<bool> release_reader{false};
  std::atomic<bool> reader_left{false};
  std::atomic<bool> sync_returned{false};
  std::atomic<bool> reader_left_before_sync_returned{false};

  std::thread reader([&] {
    {
      rcu::ReadGuard g;
      reader_inside.store(true);
      while (!release_reader.load())
        std::this_thread::sleep_for(100us);
      reader_left.store(true);
    }
  });
  while (!reader_inside.load())
    std::this_thread::yield();

  Errc sync_result = Errc::invalid_argument;
  std::thread writer([&] {
    sync_result = rcu::synchronize();
    reader_left_before_sync_returned.store(reader_left.load());
    sync_returned.store(true);
  });

  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(sync_returned.load()) << "synchronize() returned while a reader was inside";

  release_reader.store(true);
  auto limit = Clock::now() + 30s;
  while (!sync_returned.load() && Clock::now() < limit)
    std::this_thread::sleep_for(100us);
  EXPECT_TRUE(sync_returned.load()) << "synchronize() did not return after the reader left";
  writer.join();
  reader.join();
  EXPECT_EQ(sync_result, Errc::ok);
  EXPECT_TRUE(reader_left_before_sync_returned.load());
}

TEST_F(RcuTest, SynchronizeDoesNotWaitForLaterReaders) {
  // A reader that starts after synchronize() began cannot hold it up forever: run synchronize
  // while readers continuously enter and leave short sections.
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  for (int i = 0; i < 2; ++i) {
    readers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        rcu::ReadGuard g;
      }
    });
  }
  for (int i = 0; i < (kSlowBuild ? 20 : 200); ++i)
    EXPECT_EQ(rcu::synchronize(), Errc::ok);
  stop.store(true);
  for (auto& t : readers)
    t.join();
}

// A read section in a thread_local destructor that runs after the thread's RCU registration was
// torn down (the object was constructed before the thread's first read section, so it is
// destroyed after it) must still hold up synchronize(): "any thread may read".
std::atomic<bool> g_late_inside{false};
std::atomic<bool> g_late_release{false};
std::atomic<bool> g_late_left{false};

struct LateReader {
  bool armed = false;
  ~LateReader() {
    if (!armed) return;
    rcu::ReadGuard g;
    g_late_inside.store(true);
    auto limit = Clock::now() + 30s;
    while (!g_late_release.load() && Clock::now() < limit)
      std::this_thread::sleep_for(100us);
    g_late_left.store(true);
  }
};

TEST_F(RcuTest, ReaderInThreadExitDestructorIsWaitedFor) {
  g_late_inside = false;
  g_late_release = false;
  g_late_left = false;
  std::thread t([] {
    thread_local LateReader late;  // constructed before the first read section...
    late.armed = true;
    { rcu::ReadGuard g; }  // ...which registers this thread with liburcu
  });
  while (!g_late_inside.load())
    std::this_thread::yield();

  std::atomic<bool> sync_returned{false};
  std::atomic<bool> reader_left_first{false};
  std::thread writer([&] {
    EXPECT_EQ(rcu::synchronize(), Errc::ok);
    reader_left_first.store(g_late_left.load());
    sync_returned.store(true);
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(sync_returned.load())
      << "synchronize() ignored a reader in a thread-exit destructor";
  g_late_release.store(true);
  writer.join();
  t.join();
  EXPECT_TRUE(reader_left_first.load());
  // The exited thread does not hold up later grace periods.
  EXPECT_EQ(rcu::synchronize(), Errc::ok);
}

// A writer replaces a published object, waits for a grace period, and frees the old one, while
// readers dereference whatever is published under ReadGuard. Freed objects are poisoned first
// (magic overwritten) and then deleted, so a reader that sees a freed object fails the magic check
// and, under ASan, is reported as a heap use-after-free.
struct Node {
  static constexpr std::uint64_t kLive = 0x600DF00DCAFEF00Dull;
  std::atomic<std::uint64_t> magic{kLive};
  std::uint64_t generation = 0;
  std::uint64_t payload[7] = {};
};

TEST_F(RcuTest, PublishUnpublish) {
  std::atomic<Node*> published{new Node};
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> bad_reads{0};
  std::atomic<std::uint64_t> reads{0};
  std::atomic<std::uint64_t> reads_so_far{0};  // live progress, for the writer

  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&] {
      std::uint64_t local_reads = 0;
      std::uint64_t last_generation = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        rcu::ReadGuard g;
        Node* n = published.load(std::memory_order_acquire);
        // Touch the object across a little time, so the writer has a chance to race with us.
        for (int k = 0; k < 4; ++k) {
          if (n->magic.load(std::memory_order_relaxed) != Node::kLive) bad_reads.fetch_add(1);
          std::uint64_t sum = 0;
          for (std::uint64_t p : n->payload)
            sum += p;
          if (sum != n->generation * 7) bad_reads.fetch_add(1);
        }
        if (n->generation < last_generation) bad_reads.fetch_add(1);  // went back in time
        last_generation = n->generation;
        ++local_reads;
        reads_so_far.fetch_add(1, std::memory_order_relaxed);
      }
      reads.fetch_add(local_reads);
    });
  }

  // Swaps must overlap with reading: start once both readers read, and every 50 swaps wait for
  // the readers to make progress (a fast writer could otherwise finish before they start).
  auto wait_for_reads = [&](std::uint64_t at_least) {
    auto limit = Clock::now() + 30s;
    while (reads_so_far.load() < at_least && Clock::now() < limit)
      std::this_thread::yield();
  };
  wait_for_reads(2);
  const std::uint64_t kSwaps = kSlowBuild ? 300 : 3000;
  for (std::uint64_t gen = 1; gen <= kSwaps; ++gen) {
    if (gen % 50 == 0) wait_for_reads(reads_so_far.load() + 2);
    Node* fresh = new Node;
    fresh->generation = gen;
    for (std::uint64_t& p : fresh->payload)
      p = gen;
    Node* old = published.exchange(fresh, std::memory_order_acq_rel);
    if (rcu::synchronize() != Errc::ok) {  // never free without a grace period
      ADD_FAILURE() << "synchronize() failed";
      break;
    }
    old->magic.store(0xDEADDEADDEADDEADull, std::memory_order_relaxed);
    for (std::uint64_t& p : old->payload)
      p = ~std::uint64_t{0};
    delete old;
  }
  stop.store(true);
  for (auto& t : readers)
    t.join();
  delete published.load();

  EXPECT_EQ(bad_reads.load(), 0u);
  EXPECT_GE(reads.load(), 2 + 2 * (kSwaps / 50));
  EXPECT_EQ(g_misuse_calls.load(), 0);
}

}  // namespace
}  // namespace pgmap
