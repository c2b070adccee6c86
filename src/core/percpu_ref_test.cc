#include "pgmap/core/percpu_ref.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "core/percpu_ref_comdat_test.h"
#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"

namespace pgmap {
namespace {

std::atomic<int> g_misuse_calls{0};
std::atomic<Errc> g_misuse_code{Errc::ok};
void counting_handler(Errc code, const char*) {
  g_misuse_calls.fetch_add(1);
  g_misuse_code.store(code);
}

// Installs a counting misuse handler, so PGMAP_DEBUG_INVARIANTS builds report instead of abort.
class PercpuRefTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_misuse_calls = 0;
    g_misuse_code.store(Errc::ok);
    previous_ = set_misuse_handler(&counting_handler);
    misuse_before_ = misuse_count();
  }
  void TearDown() override { set_misuse_handler(previous_); }

  // Asserts that exactly `n` misuse reports happened since SetUp, the last one with `code`.
  void expect_misuse(int n, Errc code) {
    EXPECT_EQ(g_misuse_calls.load(), n);
    EXPECT_EQ(misuse_count(), misuse_before_ + static_cast<std::uint64_t>(n));
    if (n > 0) {
      EXPECT_EQ(g_misuse_code.load(), code);
    }
  }
  void expect_no_misuse() { expect_misuse(0, Errc::ok); }

  MisuseHandler previous_ = nullptr;
  std::uint64_t misuse_before_ = 0;
};

// A ref whose release counts its calls.
struct Counted {
  std::atomic<int> releases{0};
  PercpuRef ref;
  explicit Counted(unsigned flags = 0) : ref([this] { releases.fetch_add(1); }, flags) {}
};

// ---- implementation -----------------------------------------------------------------------------

TEST_F(PercpuRefTest, ImplementationIsChosenOnceAndCanBeForced) {
  std::string_view impl = PercpuRef::implementation();
  std::printf("PercpuRef implementation: %.*s\n", static_cast<int>(impl.size()), impl.data());
  EXPECT_TRUE(impl == "rseq" || impl == "per-thread") << impl;
  const char* force = std::getenv("PGMAP_PERCPU_IMPL");
  if (force != nullptr && std::string_view(force) == "per-thread") {
    EXPECT_EQ(impl, "per-thread");
  }
  if (sanitizer::kThread) {
    EXPECT_EQ(impl, "per-thread");  // TSan cannot see the rseq asm
  }
#if !PGMAP_PERCPU_RSEQ_INLINE
  EXPECT_EQ(impl, "per-thread");
#endif
  Counted c;
  EXPECT_EQ(PercpuRef::implementation(), impl);  // fixed for the life of the process
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  expect_no_misuse();
}

// The bare barrier (pgmap-bench's kill floor) changes no ref: a live ref keeps its mode and its
// count, and its kill afterwards folds the same count.
TEST_F(PercpuRefTest, KillBarrierAloneChangesNoRef) {
  Counted c;
  ASSERT_EQ(c.ref.get_many(3), Errc::ok);
  const bool percpu = c.ref.is_percpu();
  PercpuRef::kill_barrier();
  EXPECT_EQ(c.ref.is_percpu(), percpu);
  EXPECT_FALSE(c.ref.is_dying());
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 0);  // the three gets still hold it
  ASSERT_EQ(c.ref.put_many(3), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// membarrier registration belongs to the process's mm: a forked child must still be able to kill
// (with both implementations' barriers), including a ref that was live percpu at the fork.
TEST_F(PercpuRefTest, KillWorksInAForkedChild) {
  Counted before;  // makes sure the implementation was chosen (and registered) before the fork
  ASSERT_EQ(before.ref.get(), Errc::ok);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int bad = 0;
    PercpuRef ref(nullptr);
    bad += ref.get() != Errc::ok;
    bad += ref.kill() != Errc::ok;
    bad += ref.approx_count() != 1;
    bad += ref.put() != Errc::ok;
    bad += !ref.is_zero();
    bad += before.ref.kill() != Errc::ok;  // a ref made before the fork, live percpu in the child
    bad += before.ref.approx_count() != 1;
    _exit(bad);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child died (signal " << WTERMSIG(status) << ")";
  EXPECT_EQ(WEXITSTATUS(status), 0);
  ASSERT_EQ(before.ref.put(), Errc::ok);
  ASSERT_EQ(before.ref.kill(), Errc::ok);
  EXPECT_EQ(before.releases.load(), 1);
  expect_no_misuse();
}

// Gets and puts spread over threads that migrate between CPUs: the per-CPU (or per-thread) sums
// only add up as a whole, and the fold must find the exact total.
TEST_F(PercpuRefTest, CountsFromManyThreadsAddUpAtTheFold) {
  Counted c;
  constexpr int kThreads = 4;
  constexpr int kEach = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        ASSERT_EQ(c.ref.get_many(3), Errc::ok);
        if (i % 1000 == 0) std::this_thread::yield();  // invites migration
        ASSERT_EQ(c.ref.put_many(t % 2 == 0 ? 3 : 2), Errc::ok);
      }
    });
  }
  for (auto& th : threads)
    th.join();
  EXPECT_TRUE(c.ref.is_percpu());
  const std::int64_t held = kThreads / 2 * kEach;  // the odd threads kept one per iteration
  EXPECT_EQ(c.ref.approx_count(), 1 + held);
  ASSERT_EQ(c.ref.switch_to_atomic(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1 + held);
  ASSERT_EQ(c.ref.switch_to_percpu(), Errc::ok);
  ASSERT_EQ(c.ref.put_many(static_cast<std::uint64_t>(held)), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// ---- basic semantics ----------------------------------------------------------------------------

TEST_F(PercpuRefTest, NewRefIsLivePercpu) {
  Counted c;
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_zero());
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), 1);

  EXPECT_EQ(c.ref.get(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 2);
  EXPECT_TRUE(c.ref.tryget());
  EXPECT_EQ(c.ref.approx_count(), 3);
  EXPECT_TRUE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 4);
  EXPECT_EQ(c.ref.get_many(10), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 14);
  EXPECT_EQ(c.ref.put_many(10), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 4);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_TRUE(c.ref.is_percpu());  // the fast path never switched it
  EXPECT_EQ(c.releases.load(), 0);

  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_TRUE(c.ref.is_zero());
  expect_no_misuse();
}

TEST_F(PercpuRefTest, PercpuModeNeverReleasesOnZeroSum) {
  // In percpu mode the count cannot be seen reaching zero: putting the initial reference (misuse
  // the implementation cannot detect yet) must not run release.
  Counted c;
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.approx_count(), 0);
  EXPECT_EQ(c.ref.get(), Errc::ok);  // restore the initial reference
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, KillStopsTrygetLiveAndReleasesOnLastPut) {
  Counted c;
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_TRUE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.kill(), Errc::ok);

  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_zero());
  EXPECT_EQ(c.ref.approx_count(), 2);  // exact now: initial reference dropped
  EXPECT_EQ(c.releases.load(), 0);

  EXPECT_FALSE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 2);  // a failed tryget_live takes nothing
  EXPECT_TRUE(c.ref.tryget());         // refs are still held: tryget works
  EXPECT_EQ(c.ref.approx_count(), 3);
  EXPECT_EQ(c.ref.get(), Errc::ok);  // get on a dying but unreleased ref is fine
  EXPECT_EQ(c.ref.approx_count(), 4);

  EXPECT_EQ(c.ref.put_many(3), Errc::ok);
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.put(), Errc::ok);  // the last one
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_TRUE(c.ref.is_zero());
  EXPECT_EQ(c.ref.approx_count(), 0);

  EXPECT_FALSE(c.ref.tryget());
  EXPECT_FALSE(c.ref.tryget_live());
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.approx_count(), 0);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, ReleaseRunsInsideKillWhenNothingHeld) {
  std::atomic<bool> in_kill{false};
  std::atomic<int> released_in_kill{0};
  std::atomic<int> releases{0};
  PercpuRef ref([&] {
    releases.fetch_add(1);
    if (in_kill.load()) released_in_kill.fetch_add(1);
  });
  in_kill = true;
  EXPECT_EQ(ref.kill(), Errc::ok);
  in_kill = false;
  EXPECT_EQ(releases.load(), 1);
  EXPECT_EQ(released_in_kill.load(), 1);
  EXPECT_TRUE(ref.is_zero());
  expect_no_misuse();
}

TEST_F(PercpuRefTest, ReleaseMayDestroyTheRef) {
  auto* holder = new std::unique_ptr<PercpuRef>;
  std::atomic<int> releases{0};
  *holder = std::make_unique<PercpuRef>([&] {
    releases.fetch_add(1);
    holder->reset();  // destroys the ref from inside its release
  });
  ASSERT_EQ((*holder)->get(), Errc::ok);
  EXPECT_EQ((*holder)->kill(), Errc::ok);
  EXPECT_EQ(releases.load(), 0);
  EXPECT_EQ((*holder)->put(), Errc::ok);
  EXPECT_EQ(releases.load(), 1);
  EXPECT_EQ(*holder, nullptr);
  delete holder;
  expect_no_misuse();
}

TEST_F(PercpuRefTest, KillAndConfirm) {
  Counted c;
  bool confirm_ran = false;
  bool tryget_live_in_confirm = true;
  bool dying_in_confirm = false;
  int releases_in_confirm = -1;
  ASSERT_EQ(c.ref.get(), Errc::ok);  // so release does not run inside kill
  EXPECT_EQ(c.ref.kill_and_confirm([&] {
    confirm_ran = true;
    tryget_live_in_confirm = c.ref.tryget_live();
    if (tryget_live_in_confirm) (void)c.ref.put();
    dying_in_confirm = c.ref.is_dying();
    releases_in_confirm = c.releases.load();
  }),
            Errc::ok);
  EXPECT_TRUE(confirm_ran);
  EXPECT_FALSE(tryget_live_in_confirm);
  EXPECT_TRUE(dying_in_confirm);
  EXPECT_EQ(releases_in_confirm, 0);  // confirm runs before the initial reference is dropped
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, KillAndConfirmWithNothingHeldReleasesAfterConfirm) {
  std::vector<int> order;
  PercpuRef ref([&] { order.push_back(2); });
  EXPECT_EQ(ref.kill_and_confirm([&] { order.push_back(1); }), Errc::ok);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  expect_no_misuse();
}

// ---- misuse -------------------------------------------------------------------------------------

TEST_F(PercpuRefTest, DoubleKillIsMisuseAndChangesNothing) {
  Counted c;
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.ref.approx_count(), 1);
  bool confirm_ran = false;
  EXPECT_EQ(c.ref.kill_and_confirm([&] { confirm_ran = true; }), Errc::already_dead);
  EXPECT_FALSE(confirm_ran);
  EXPECT_EQ(c.ref.approx_count(), 1);  // the second kill did not drop another reference
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_TRUE(c.ref.is_dying());
  expect_misuse(1, Errc::already_dead);

  EXPECT_EQ(c.ref.kill(), Errc::already_dead);
  EXPECT_EQ(c.ref.approx_count(), 1);
  expect_misuse(2, Errc::already_dead);

  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.kill(), Errc::already_dead);  // also after release
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_TRUE(c.ref.is_zero());
  expect_misuse(3, Errc::already_dead);
}

TEST_F(PercpuRefTest, PutBelowZeroInAtomicModeIsUnderflow) {
  Counted c(PercpuRef::kInitAtomic);
  ASSERT_FALSE(c.ref.is_percpu());
  ASSERT_EQ(c.ref.get(), Errc::ok);
  EXPECT_EQ(c.ref.put_many(3), Errc::underflow);  // only 2 held
  EXPECT_EQ(c.ref.approx_count(), 2);             // unchanged
  EXPECT_EQ(c.releases.load(), 0);
  expect_misuse(1, Errc::underflow);

  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.put(), Errc::underflow);  // below zero after release
  EXPECT_EQ(c.ref.approx_count(), 0);
  EXPECT_TRUE(c.ref.is_zero());
  EXPECT_EQ(c.releases.load(), 1);  // not released twice
  expect_misuse(2, Errc::underflow);
}

TEST_F(PercpuRefTest, GetAfterReleaseIsMisuse) {
  Counted c;
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.get(), Errc::released);
  EXPECT_EQ(c.ref.approx_count(), 0);
  expect_misuse(1, Errc::released);
  EXPECT_EQ(c.ref.get_many(5), Errc::released);
  EXPECT_EQ(c.ref.approx_count(), 0);
  EXPECT_TRUE(c.ref.is_zero());
  EXPECT_FALSE(c.ref.tryget());  // not misuse: tryget is allowed to fail
  expect_misuse(2, Errc::released);
  EXPECT_EQ(c.releases.load(), 1);
}

TEST_F(PercpuRefTest, ResurrectOfLiveRefIsMisuse) {
  Counted c;
  EXPECT_EQ(c.ref.resurrect(), Errc::not_dead);
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), 1);
  expect_misuse(1, Errc::not_dead);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
}

TEST_F(PercpuRefTest, ResurrectAfterReleaseIsRefused) {
  Counted c(PercpuRef::kAllowReinit);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.resurrect(), Errc::released);
  EXPECT_TRUE(c.ref.is_zero());
  EXPECT_TRUE(c.ref.is_dying());
}

TEST_F(PercpuRefTest, ReinitOfNonZeroRefIsBusy) {
  Counted c(PercpuRef::kAllowReinit);
  EXPECT_EQ(c.ref.reinit(), Errc::busy);  // live, percpu
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 1);
  expect_misuse(1, Errc::busy);

  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.reinit(), Errc::busy);  // dead but still held
  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), 1);
  expect_misuse(2, Errc::busy);

  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
}

TEST_F(PercpuRefTest, PercpuUnderflowIsReportedByKill) {
  Counted c;
  ASSERT_EQ(c.ref.get(), Errc::ok);
  // Three puts for one get: the fast path cannot notice, the fold at kill does.
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  expect_no_misuse();
  bool confirm_ran = false;
  EXPECT_EQ(c.ref.kill_and_confirm([&] { confirm_ran = true; }), Errc::underflow);
  expect_misuse(1, Errc::underflow);
  EXPECT_FALSE(confirm_ran);
  // The kill is undone: live, in the mode it had, the count as the fold computed.
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), -1);
  EXPECT_EQ(c.releases.load(), 0);
  // Restoring the missing references makes the next kill succeed.
  EXPECT_EQ(c.ref.get_many(2), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_misuse(1, Errc::underflow);
}

TEST_F(PercpuRefTest, PercpuUnderflowToExactlyZeroIsReportedByKill) {
  Counted c;
  EXPECT_EQ(c.ref.put(), Errc::ok);  // drops the initial reference behind kill's back
  EXPECT_EQ(c.ref.kill(), Errc::underflow);
  EXPECT_EQ(c.ref.approx_count(), 0);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_zero());  // not released: it is live (percpu) again
  EXPECT_EQ(c.releases.load(), 0);
  expect_misuse(1, Errc::underflow);
  EXPECT_EQ(c.ref.get(), Errc::ok);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
}

// Issue 7 item 2: one stray put, then the owner's teardown (kill; on failure undo it the way
// DevPagemap::revive does: resurrect, and after a release, wait for it and reinit). Run on a
// thread with a bounded wait: before the fix, kill left the ref dead at count 0, resurrect said
// `released`, and the owner waited forever for a release that never came.
TEST_F(PercpuRefTest, StrayPutThenKillNeverHangsTheOwner) {
  for (unsigned flags : {0u, unsigned{PercpuRef::kAllowReinit}, unsigned{PercpuRef::kInitAtomic}}) {
    SCOPED_TRACE(flags);
    auto c = std::make_shared<Counted>(flags);
    const bool was_percpu = c->ref.is_percpu();
    if (flags & PercpuRef::kInitAtomic) {
      // In atomic mode a put to zero releases at once (as the kernel's does): the stray put is
      // the owner's own initial reference.
      ASSERT_EQ(c->ref.get(), Errc::ok);
      ASSERT_EQ(c->ref.put_many(2), Errc::ok);
      ASSERT_EQ(c->releases.load(), 1);
    } else {
      ASSERT_EQ(c->ref.put(), Errc::ok);  // the stray put
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    auto kill_result = std::make_shared<std::atomic<Errc>>(Errc::ok);
    std::thread owner([c, done, kill_result] {
      Errc e = c->ref.kill();
      kill_result->store(e);
      if (e == Errc::ok || e == Errc::underflow) {
        if (c->ref.is_dying()) {
          // What an owner does after a kill it must give up on.
          if (c->ref.resurrect() == Errc::released) {
            while (c->releases.load() == 0)  // the release it must not wait for forever
              std::this_thread::yield();
            (void)c->ref.reinit();  // the test checks the outcome below
          }
        }
      }
      done->store(true);
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!done->load() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (!done->load()) {
      owner.detach();  // hung: the test fails, the thread is leaked with its shared state
      ADD_FAILURE() << "the owner's teardown after a stray put did not return within 20 s";
      return;
    }
    owner.join();
    EXPECT_EQ(kill_result->load(), Errc::underflow);
    // Nothing changed: live, same mode, count as the fold found it, nothing released by kill.
    EXPECT_FALSE(c->ref.is_dying());
    EXPECT_EQ(c->ref.is_percpu(), was_percpu);
    EXPECT_EQ(c->ref.approx_count(), 0);
    // Every follow-up call returns promptly with a typed result.
    EXPECT_EQ(c->ref.resurrect(), Errc::not_dead);
    EXPECT_EQ(c->ref.kill(), Errc::underflow);
    EXPECT_FALSE(c->ref.is_dying());
    if (was_percpu) {
      EXPECT_EQ(c->ref.reinit(), Errc::busy);  // percpu: not known to be zero
      EXPECT_EQ(c->ref.put(), Errc::ok);       // percpu puts are not checked
      EXPECT_EQ(c->ref.get_many(2), Errc::ok);
    } else {
      EXPECT_EQ(c->ref.put(), Errc::underflow);  // atomic: checked at the put
      EXPECT_EQ(c->ref.get(), Errc::released);
      EXPECT_EQ(c->ref.reinit(), Errc::ok);  // a released atomic ref may be reinitialized
    }
    EXPECT_EQ(c->ref.approx_count(), 1);
    EXPECT_EQ(c->ref.kill(), Errc::ok);
    EXPECT_TRUE(c->ref.is_zero());
    EXPECT_EQ(c->releases.load(), was_percpu ? 1 : 2);
    g_misuse_calls = 0;  // the misuse reports were checked piecewise above
    misuse_before_ = misuse_count();
  }
}

TEST_F(PercpuRefTest, DestroyingRefWithStrayPutReportsUnderflow) {
  {
    Counted c;
    ASSERT_EQ(c.ref.put(), Errc::ok);  // never killed
  }
  expect_misuse(1, Errc::underflow);
  {
    Counted c;
    ASSERT_EQ(c.ref.put(), Errc::ok);
    ASSERT_EQ(c.ref.kill(), Errc::underflow);  // undone: still live
  }
  expect_misuse(3, Errc::underflow);
}

TEST_F(PercpuRefTest, DestroyingHeldRefIsBusy) {
  {
    Counted c;
    ASSERT_EQ(c.ref.get(), Errc::ok);  // someone still holds it; never killed
  }
  expect_misuse(1, Errc::busy);
  {
    Counted c;
    ASSERT_EQ(c.ref.get(), Errc::ok);
    ASSERT_EQ(c.ref.kill(), Errc::ok);  // killed but not released
  }
  expect_misuse(2, Errc::busy);
  {
    Counted c(PercpuRef::kInitAtomic);
    ASSERT_EQ(c.ref.get_many(2), Errc::ok);
  }
  expect_misuse(3, Errc::busy);
}

TEST_F(PercpuRefTest, DestroyingUnusedOrReleasedRefIsFine) {
  { Counted c; }                          // never used: only the initial reference
  { Counted c(PercpuRef::kInitAtomic); }  // same, atomic
  { Counted c(PercpuRef::kInitDead); }    // dead, zero
  {
    Counted c;
    ASSERT_EQ(c.ref.get(), Errc::ok);
    ASSERT_EQ(c.ref.put(), Errc::ok);  // balanced traffic, never killed
  }
  {
    Counted c;
    ASSERT_EQ(c.ref.kill(), Errc::ok);
    ASSERT_EQ(c.releases.load(), 1);
  }
  expect_no_misuse();
}

// ---- resurrect / reinit
// ---------------------------------------------------------------------------

TEST_F(PercpuRefTest, ResurrectWithAllowReinitReturnsToPercpu) {
  Counted c(PercpuRef::kAllowReinit);
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_FALSE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 1);

  EXPECT_EQ(c.ref.resurrect(), Errc::ok);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 2);  // the initial reference is back
  EXPECT_TRUE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 3);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.put(), Errc::ok);  // the reference taken before the kill
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.releases.load(), 0);

  EXPECT_EQ(c.ref.kill(), Errc::ok);  // the cycle works again
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, ResurrectWithoutAllowReinitIsAtomic) {
  Counted c;
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.resurrect(), Errc::ok);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_percpu());  // the slot went back at kill
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::no_memory);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 2);
  EXPECT_TRUE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 3);
  EXPECT_EQ(c.ref.put_many(2), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, ReinitAfterReleaseCycles) {
  Counted c(PercpuRef::kAllowReinit);
  for (int cycle = 1; cycle <= 5; ++cycle) {
    ASSERT_EQ(c.ref.get(), Errc::ok);
    ASSERT_EQ(c.ref.kill(), Errc::ok);
    EXPECT_EQ(c.releases.load(), cycle - 1);
    ASSERT_EQ(c.ref.put(), Errc::ok);
    EXPECT_EQ(c.releases.load(), cycle);  // once per cycle
    EXPECT_TRUE(c.ref.is_zero());

    EXPECT_EQ(c.ref.reinit(), Errc::ok);
    EXPECT_FALSE(c.ref.is_dying());
    EXPECT_FALSE(c.ref.is_zero());
    EXPECT_TRUE(c.ref.is_percpu());
    EXPECT_EQ(c.ref.approx_count(), 1);
    EXPECT_TRUE(c.ref.tryget_live());
    EXPECT_EQ(c.ref.put(), Errc::ok);
  }
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 6);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, ReinitWithoutAllowReinitIsAtomic) {
  Counted c;
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.reinit(), Errc::ok);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 2);
  expect_no_misuse();
}

// ---- modes --------------------------------------------------------------------------------------

TEST_F(PercpuRefTest, InitAtomicThenSwitchToPercpu) {
  Counted c(PercpuRef::kInitAtomic);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), 1);
  ASSERT_EQ(c.ref.get_many(3), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 4);

  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::ok);
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 4);
  EXPECT_EQ(c.ref.put_many(3), Errc::ok);  // taken in atomic mode, dropped in percpu mode
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::ok);  // idempotent
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, SwitchRoundTripPreservesCount) {
  Counted c;
  constexpr int kRefs = 37;
  for (int i = 0; i < kRefs; ++i)
    ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_TRUE(c.ref.is_percpu());

  EXPECT_EQ(c.ref.switch_to_atomic(), Errc::ok);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), kRefs + 1);     // exact in atomic mode
  EXPECT_EQ(c.ref.switch_to_atomic(), Errc::ok);  // idempotent
  EXPECT_EQ(c.ref.approx_count(), kRefs + 1);
  for (int i = 0; i < 7; ++i)
    ASSERT_EQ(c.ref.put(), Errc::ok);  // some dropped in atomic mode
  EXPECT_EQ(c.ref.approx_count(), kRefs + 1 - 7);

  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::ok);
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), kRefs + 1 - 7);
  for (int i = 7; i < kRefs; ++i)
    ASSERT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1);

  // Several more round trips, each checked exactly.
  for (int trip = 0; trip < 5; ++trip) {
    ASSERT_EQ(c.ref.get_many(static_cast<std::uint64_t>(trip) + 1), Errc::ok);
    ASSERT_EQ(c.ref.switch_to_atomic(), Errc::ok);
    EXPECT_EQ(c.ref.approx_count(), trip + 2);
    ASSERT_EQ(c.ref.switch_to_percpu(), Errc::ok);
    ASSERT_EQ(c.ref.put_many(static_cast<std::uint64_t>(trip) + 1), Errc::ok);
  }
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, SwitchToAtomicIsStickyAcrossResurrect) {
  Counted c(PercpuRef::kAllowReinit);
  ASSERT_EQ(c.ref.switch_to_atomic(), Errc::ok);
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.ref.resurrect(), Errc::ok);
  EXPECT_FALSE(c.ref.is_percpu());  // atomic mode was asked for and is kept
  EXPECT_EQ(c.ref.approx_count(), 2);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::ok);
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, SwitchToPercpuOnDeadRefFails) {
  Counted c(PercpuRef::kAllowReinit);
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::dead);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
}

// Issue 7 item 6: a refused switch_to_percpu changes nothing. Before the fix it cleared the
// sticky atomic request and then returned `dead`, so the resurrected ref came back percpu.
TEST_F(PercpuRefTest, RefusedSwitchToPercpuKeepsStickyAtomic) {
  Counted c(PercpuRef::kAllowReinit);
  ASSERT_EQ(c.ref.switch_to_atomic(), Errc::ok);
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::dead);
  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 1);
  ASSERT_EQ(c.ref.resurrect(), Errc::ok);
  EXPECT_FALSE(c.ref.is_percpu());  // the atomic request is still in force
  ASSERT_EQ(c.ref.put(), Errc::ok);
  // Same through release + reinit.
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.releases.load(), 1);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::dead);
  ASSERT_EQ(c.ref.reinit(), Errc::ok);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::ok);  // an accepted switch clears it
  EXPECT_TRUE(c.ref.is_percpu());
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 2);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, RefusedSwitchToPercpuWithoutSlotKeepsStickyAtomic) {
  Counted c;  // no kAllowReinit: the slot goes back at kill
  ASSERT_EQ(c.ref.switch_to_atomic(), Errc::ok);
  ASSERT_EQ(c.ref.get(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  ASSERT_EQ(c.ref.resurrect(), Errc::ok);
  EXPECT_EQ(c.ref.switch_to_percpu(), Errc::no_memory);
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_EQ(c.ref.approx_count(), 2);
  ASSERT_EQ(c.ref.put(), Errc::ok);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// Issue 7 item 3: with kAllowReinit, kill + resurrect and kill + release + reinit come back in
// percpu mode, and the fast path then really is the percpu one: the shared count (visible through
// approx_count after a switch to atomic) is not what the gets and puts touch.
TEST_F(PercpuRefTest, AllowReinitComesBackPercpuAfterResurrectAndReinit) {
  Counted c(PercpuRef::kAllowReinit);
  for (int cycle = 0; cycle < 3; ++cycle) {
    ASSERT_EQ(c.ref.get(), Errc::ok);
    ASSERT_EQ(c.ref.kill(), Errc::ok);
    EXPECT_FALSE(c.ref.is_percpu());
    ASSERT_EQ(c.ref.resurrect(), Errc::ok);
    EXPECT_TRUE(c.ref.is_percpu()) << "cycle " << cycle;
    EXPECT_FALSE(c.ref.is_dying());
    EXPECT_EQ(c.ref.approx_count(), 2);
    ASSERT_EQ(c.ref.put(), Errc::ok);
    // A stray put is not detected at the put in percpu mode: proof that the put did not go
    // through the checked atomic path.
    ASSERT_EQ(c.ref.put(), Errc::ok);
    EXPECT_EQ(c.ref.approx_count(), 0);
    ASSERT_EQ(c.ref.get(), Errc::ok);
    expect_no_misuse();

    ASSERT_EQ(c.ref.kill(), Errc::ok);
    ASSERT_EQ(c.releases.load(), cycle + 1);
    ASSERT_EQ(c.ref.reinit(), Errc::ok);
    EXPECT_TRUE(c.ref.is_percpu()) << "cycle " << cycle;
    EXPECT_EQ(c.ref.approx_count(), 1);
  }
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 4);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, InitDeadStartsDyingAtZero) {
  Counted c(PercpuRef::kInitDead);
  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_TRUE(c.ref.is_zero());
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 0);
  EXPECT_FALSE(c.ref.tryget());
  EXPECT_FALSE(c.ref.tryget_live());
  EXPECT_EQ(c.releases.load(), 0);  // release never ran: it was never live

  EXPECT_EQ(c.ref.reinit(), Errc::ok);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_zero());
  EXPECT_TRUE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_TRUE(c.ref.tryget_live());
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, InitDeadAtomicReinitsAtomic) {
  Counted c(PercpuRef::kInitDead | PercpuRef::kInitAtomic);
  EXPECT_TRUE(c.ref.is_dying());
  EXPECT_EQ(c.ref.reinit(), Errc::ok);
  EXPECT_FALSE(c.ref.is_dying());
  EXPECT_FALSE(c.ref.is_percpu());
  EXPECT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// ---- threads ------------------------------------------------------------------------------------

TEST_F(PercpuRefTest, RefsMovedBetweenThreads) {
  Counted c;
  // Taken on a thread, dropped on the main thread (the taker is still alive).
  std::atomic<bool> taken{false};
  std::atomic<bool> may_exit{false};
  std::thread taker([&] {
    for (int i = 0; i < 5; ++i)
      EXPECT_EQ(c.ref.get(), Errc::ok);
    taken = true;
    while (!may_exit.load())
      std::this_thread::yield();
  });
  while (!taken.load())
    std::this_thread::yield();
  EXPECT_EQ(c.ref.approx_count(), 6);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(c.ref.put(), Errc::ok);
  may_exit = true;
  taker.join();

  // Taken on the main thread, dropped on another.
  for (int i = 0; i < 4; ++i)
    ASSERT_EQ(c.ref.get(), Errc::ok);
  std::thread dropper([&] {
    for (int i = 0; i < 4; ++i)
      EXPECT_EQ(c.ref.put(), Errc::ok);
  });
  dropper.join();
  EXPECT_EQ(c.ref.approx_count(), 3);  // 1 initial + 2 left from the taker

  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 2);
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

TEST_F(PercpuRefTest, RefsDroppedAfterTakerExited) {
  Counted c;
  // Several short-lived threads each take references and exit holding them; their counter
  // blocks are parked and adopted by the next threads.
  constexpr int kThreads = 8;
  constexpr int kEach = 3;
  for (int t = 0; t < kThreads; ++t) {
    std::thread([&] {
      for (int i = 0; i < kEach; ++i)
        EXPECT_EQ(c.ref.get(), Errc::ok);
    }).join();
  }
  EXPECT_EQ(c.ref.approx_count(), 1 + kThreads * kEach);
  // Half of them dropped by new threads (which adopt the parked blocks), half by main.
  for (int t = 0; t < kThreads / 2; ++t) {
    std::thread([&] {
      for (int i = 0; i < kEach; ++i)
        EXPECT_EQ(c.ref.put(), Errc::ok);
    }).join();
  }
  EXPECT_EQ(c.ref.approx_count(), 1 + kThreads / 2 * kEach);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), kThreads / 2 * kEach);
  for (int i = 0; i < kThreads / 2 * kEach; ++i) {
    EXPECT_EQ(c.releases.load(), 0) << "released early, at put " << i;
    ASSERT_EQ(c.ref.put(), Errc::ok);
  }
  EXPECT_EQ(c.releases.load(), 1);
  EXPECT_TRUE(c.ref.is_zero());
  expect_no_misuse();
}

TEST_F(PercpuRefTest, KillOnAnotherThreadAfterTakerExited) {
  Counted c;
  std::thread([&] { EXPECT_EQ(c.ref.get_many(2), Errc::ok); }).join();
  std::thread([&] { EXPECT_EQ(c.ref.kill(), Errc::ok); }).join();
  EXPECT_EQ(c.ref.approx_count(), 2);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 0);
  std::thread([&] { EXPECT_EQ(c.ref.put(), Errc::ok); }).join();
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// Operations from thread-local destructors run after the thread's counter block was parked; they
// go to the shared atomic and must still be counted exactly once.
struct PutAtThreadExit {
  PercpuRef* ref = nullptr;
  int puts = 0;
  ~PutAtThreadExit() {
    for (int i = 0; i < puts; ++i)
      (void)ref->put();
  }
};

TEST_F(PercpuRefTest, PutsFromThreadLocalDestructors) {
  Counted c;
  std::thread([&] {
    // Constructed before the thread's first ref operation (which registers the counter block
    // and its exit hook), so destroyed after that hook: its puts find no counter block.
    thread_local PutAtThreadExit late;
    late.ref = &c.ref;
    late.puts = 3;
    ASSERT_EQ(c.ref.get_many(4), Errc::ok);  // counted in this thread's block
  }).join();
  EXPECT_EQ(c.ref.approx_count(), 2);
  ASSERT_EQ(c.ref.kill(), Errc::ok);
  EXPECT_EQ(c.ref.approx_count(), 1);
  EXPECT_EQ(c.releases.load(), 0);
  EXPECT_EQ(c.ref.put(), Errc::ok);
  EXPECT_EQ(c.releases.load(), 1);
  expect_no_misuse();
}

// ---- slots --------------------------------------------------------------------------------------

TEST_F(PercpuRefTest, SlotExhaustionFallsBackToAtomic) {
  constexpr std::size_t kExtra = 8;
  std::atomic<int> releases{0};
  std::vector<std::unique_ptr<PercpuRef>> refs;
  refs.reserve(kMaxPercpuRefs + kExtra);
  for (std::size_t i = 0; i < kMaxPercpuRefs + kExtra; ++i) {
    refs.push_back(std::make_unique<PercpuRef>([&] { releases.fetch_add(1); }));
  }
  // No other ref is alive in this process, so exactly the first kMaxPercpuRefs got a slot.
  std::size_t percpu = 0;
  for (std::size_t i = 0; i < refs.size(); ++i) {
    if (refs[i]->is_percpu()) {
      ++percpu;
      EXPECT_LT(i, kMaxPercpuRefs) << "ref " << i << " got a slot";
    }
  }
  EXPECT_EQ(percpu, kMaxPercpuRefs);

  // The slot-less ones are fully functional.
  for (std::size_t i = kMaxPercpuRefs; i < refs.size(); ++i) {
    PercpuRef& r = *refs[i];
    EXPECT_FALSE(r.is_percpu());
    EXPECT_FALSE(r.is_dying());
    ASSERT_EQ(r.get(), Errc::ok);
    ASSERT_TRUE(r.tryget_live());
    EXPECT_EQ(r.approx_count(), 3);
    EXPECT_EQ(r.switch_to_percpu(), Errc::no_memory);
    ASSERT_EQ(r.put_many(2), Errc::ok);
  }
  // Percpu and atomic refs count independently: exercise a few with distinct counts.
  for (std::size_t i = 0; i < 16; ++i)
    ASSERT_EQ(refs[i]->get_many(i), Errc::ok);
  for (std::size_t i = 0; i < 16; ++i)
    EXPECT_EQ(refs[i]->approx_count(), std::int64_t(i) + 1);
  for (std::size_t i = 0; i < 16; ++i)
    ASSERT_EQ(refs[i]->put_many(i), Errc::ok);

  // Destroying one percpu ref frees its slot: the next ref is percpu again.
  ASSERT_EQ(refs[5]->kill(), Errc::ok);
  EXPECT_EQ(releases.load(), 1);
  refs[5].reset();
  auto again = std::make_unique<PercpuRef>([&] { releases.fetch_add(1); });
  EXPECT_TRUE(again->is_percpu());
  EXPECT_EQ(again->approx_count(), 1);  // the reused slot starts from zero
  ASSERT_EQ(again->get_many(3), Errc::ok);
  EXPECT_EQ(again->approx_count(), 4);
  ASSERT_EQ(again->put_many(3), Errc::ok);
  auto none = std::make_unique<PercpuRef>([&] { releases.fetch_add(1); });
  EXPECT_FALSE(none->is_percpu());  // full again

  // Killing without kAllowReinit returns the slot right away.
  ASSERT_EQ(refs[9]->kill(), Errc::ok);
  EXPECT_EQ(releases.load(), 2);
  auto after_kill = std::make_unique<PercpuRef>([&] { releases.fetch_add(1); });
  EXPECT_TRUE(after_kill->is_percpu());

  // Tear everything down properly.
  int expected = 2;
  for (auto* r : {&again, &none, &after_kill}) {
    ASSERT_EQ((*r)->kill(), Errc::ok);
    EXPECT_EQ(releases.load(), ++expected);
  }
  for (std::size_t i = 0; i < refs.size(); ++i) {
    if (i == 5 || i == 9) continue;
    ASSERT_EQ(refs[i]->kill(), Errc::ok) << "ref " << i;
    ++expected;
  }
  EXPECT_EQ(releases.load(), expected);
  refs.clear();
  again.reset();
  none.reset();
  after_kill.reset();
  expect_no_misuse();

  // Every slot is free again.
  std::vector<std::unique_ptr<PercpuRef>> more;
  for (int i = 0; i < 64; ++i) {
    more.push_back(std::make_unique<PercpuRef>(nullptr));
    EXPECT_TRUE(more.back()->is_percpu());
  }
}

TEST_F(PercpuRefTest, ReleaseMayBeEmpty) {
  PercpuRef ref(nullptr);
  ASSERT_EQ(ref.get(), Errc::ok);
  EXPECT_EQ(ref.kill(), Errc::ok);
  EXPECT_EQ(ref.put(), Errc::ok);
  EXPECT_TRUE(ref.is_zero());
  expect_no_misuse();
}

// Links at all: the fast path's rseq sections sit in an inline function emitted by two
// translation units (percpu_ref_comdat_test.h), and the counts from both copies add up.
TEST_F(PercpuRefTest, FastPathInAnInlineFunctionOfTwoUnitsLinksAndCounts) {
  PercpuRef ref(nullptr);
  ASSERT_TRUE(comdat_test::get_put_out_of_line(ref));
  ASSERT_EQ(ref.get(), Errc::ok);  // one reference held across both units' loops
  EXPECT_TRUE(comdat_test::get_put_from_other_unit(ref, 1000));
  EXPECT_TRUE(comdat_test::get_put_out_of_line(ref));
  EXPECT_EQ(ref.approx_count(), 2);  // the initial reference and ours
  EXPECT_EQ(ref.put(), Errc::ok);
  EXPECT_EQ(ref.kill(), Errc::ok);
  EXPECT_TRUE(ref.is_zero());
  expect_no_misuse();
}

#if PGMAP_PERCPU_RSEQ_INLINE
// The benchmarks' rseq floor (detail::rseq_floor_add) is a real per-CPU counter: with more threads
// than CPUs (so sections are preempted, migrated and restarted) no add is lost or doubled. Its
// figure is only a floor for PercpuRef if it does the same work correctly.
TEST(RseqFloorAdd, CountsExactlyWithMoreThreadsThanCpus) {
  if (PercpuRef::implementation() != "rseq") GTEST_SKIP() << "rseq is not in use";
  const std::size_t cpus = static_cast<std::size_t>(get_nprocs_conf());
  const std::size_t stride = std::size_t{1} << detail::kCpuShift;
  void* mem = mmap(nullptr, cpus * stride, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* cpu0 = static_cast<std::atomic<std::uint64_t>*>(mem);
  constexpr unsigned kThreads = 6;
  constexpr std::uint64_t kAdds = 200000;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; ++t) {
    threads.emplace_back([cpu0] {
      for (std::uint64_t i = 0; i < kAdds; ++i) {
        detail::rseq_floor_add(cpu0, 3);
        detail::rseq_floor_add(cpu0, -1);
      }
    });
  }
  for (std::thread& t : threads)
    t.join();
  std::uint64_t sum = 0;
  for (std::size_t c = 0; c < cpus; ++c)
    sum +=
        reinterpret_cast<std::atomic<std::uint64_t>*>(static_cast<char*>(mem) + c * stride)->load();
  EXPECT_EQ(sum, std::uint64_t{2} * kAdds * kThreads);
  munmap(mem, cpus * stride);
}
#endif

}  // namespace
}  // namespace pgmap
