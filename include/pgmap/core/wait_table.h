// Hashed wait table: wait until a condition on some object becomes true, keyed by the object's
// address (the kernel's wait_var_event() / wake_up_var()).
//
// Protocol. A waiter registers in the bucket of `key`, then evaluates its condition, and sleeps
// only while the condition is false; it re-checks after every wake-up (wake-ups are shared by all
// keys of a bucket, so spurious ones are normal). A waker first makes the condition true with an
// atomic operation, then calls wake_up_var(key). The waiter count check in wake_up_var is ordered
// after the waker's update by a full fence, and the waiter's registration before its check, so a
// wake-up is never lost: either the waker sees the waiter registered, or the waiter sees the new
// state. wake_up_var() with nobody waiting in the bucket costs one fence and one load.
//
// Every wait takes a deadline (or none) and returns Errc::timed_out when it passes: waits never
// hang silently. A `progress` callback, if given, runs about every `progress_every` while waiting
// (without the bucket lock), for a CLI that shows what a drain is waiting on.
//
// When to use: waiting for a counter to reach a value that another thread will drive there
// (page refcount idle, pagemap ref released). Not for: mutual exclusion (use a mutex), or waits
// whose condition is changed without calling wake_up_var (they will time out, not hang).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>

#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"

namespace pgmap {

using Clock = std::chrono::steady_clock;
using Deadline = std::optional<Clock::time_point>;

inline Deadline deadline_after(std::optional<std::chrono::nanoseconds> timeout) {
  if (!timeout) return std::nullopt;
  return Clock::now() + *timeout;
}

struct WaitOptions {
  Deadline deadline;                              // none: wait forever
  std::function<void()> progress;                 // optional, called without locks held
  std::chrono::milliseconds progress_every{500};  // how often `progress` runs
};

class WaitTable {
 public:
  static constexpr std::size_t kBuckets = 256;

  static WaitTable& global();

  // Waits until `cond()` returns true. Returns Errc::ok, or Errc::timed_out once the deadline
  // passes (cond() was false at the last check). May block; holds no lock of the caller's.
  template <typename Cond>
  Errc wait(const void* key, Cond&& cond, const WaitOptions& opts = {});

  // Wakes every waiter whose key hashes to the bucket of `key`. Call after making the condition
  // true. Never blocks for long (takes the bucket lock only when someone waits there).
  void wake(const void* key) noexcept;

  // Number of threads currently waiting in key's bucket (diagnostics and tests).
  std::uint32_t waiters(const void* key) const noexcept;

 private:
  struct alignas(64) Bucket {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<std::uint32_t> waiters{0};
  };
  Bucket& bucket(const void* key) noexcept;
  const Bucket& bucket(const void* key) const noexcept;
  Bucket buckets_[kBuckets];
};

// Kernel-style spellings on the global table.
template <typename Cond>
Errc wait_var_event(const void* key, Cond&& cond, const WaitOptions& opts = {}) {
  return WaitTable::global().wait(key, std::forward<Cond>(cond), opts);
}
inline void wake_up_var(const void* key) noexcept {
  WaitTable::global().wake(key);
}

// ---- implementation ---------------------------------------------------------------------------

template <typename Cond>
Errc WaitTable::wait(const void* key, Cond&& cond, const WaitOptions& opts) {
  if (cond()) return Errc::ok;
  Bucket& b = bucket(key);
  auto next_progress = Clock::now() + opts.progress_every;
  std::unique_lock<std::mutex> lock(b.mu);
  b.waiters.fetch_add(1, std::memory_order_seq_cst);
  sanitizer::full_fence();  // registration before the first check
  Errc result = Errc::ok;
  while (!cond()) {
    auto now = Clock::now();
    if (opts.deadline && now >= *opts.deadline) {
      result = Errc::timed_out;
      break;
    }
    if (opts.progress && now >= next_progress) {
      lock.unlock();
      opts.progress();
      lock.lock();
      next_progress = Clock::now() + opts.progress_every;
      continue;
    }
    auto until = opts.progress ? next_progress : Clock::time_point::max();
    if (opts.deadline && *opts.deadline < until) until = *opts.deadline;
    if (until == Clock::time_point::max()) {
      b.cv.wait(lock);
    } else {
      b.cv.wait_until(lock, until);
    }
  }
  b.waiters.fetch_sub(1, std::memory_order_relaxed);
  return result;
}

}  // namespace pgmap
