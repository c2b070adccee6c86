// Shared helpers for the memory-layer tests: a counting misuse handler (so PGMAP_DEBUG_INVARIANTS
// builds report misuse instead of aborting), backings, memremap parameters, and a FolioHold that
// holds a folio reference the way each strategy's contract requires (under alloc_event a folio
// reference must be covered by an Allocation).
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap::testutil {

inline constexpr bool kSanitized = sanitizer::kAddress || sanitizer::kThread;

// ---- misuse ------------------------------------------------------------------------------------

inline std::atomic<int> g_misuse_calls{0};
inline std::atomic<Errc> g_misuse_last{Errc::ok};

inline void counting_misuse_handler(Errc code, const char* /*what*/) {
  g_misuse_calls.fetch_add(1, std::memory_order_relaxed);
  g_misuse_last.store(code, std::memory_order_relaxed);
}

// Installs the counting handler for the lifetime of the object and restores the previous one.
class MisuseCounter {
 public:
  MisuseCounter()
      : previous_(set_misuse_handler(&counting_misuse_handler)), before_(misuse_count()) {
    g_misuse_calls.store(0);
    g_misuse_last.store(Errc::ok);
  }
  ~MisuseCounter() { set_misuse_handler(previous_); }
  MisuseCounter(const MisuseCounter&) = delete;
  MisuseCounter& operator=(const MisuseCounter&) = delete;

  // Reports since construction, as counted by the library.
  std::uint64_t reported() const { return misuse_count() - before_; }
  Errc last() const { return g_misuse_last.load(); }

 private:
  MisuseHandler previous_;
  std::uint64_t before_;
};

// ---- backings and pagemaps ---------------------------------------------------------------------

inline std::shared_ptr<Backing> make_backing(std::uint64_t size, std::uint64_t align = kPmdSize) {
  BackingOptions o;
  o.size = size;
  o.align = align;
  o.name = "pgmap-test";
  auto b = make_anonymous_backing(o);
  if (!b) {
    ADD_FAILURE() << "make_anonymous_backing: " << b.error().to_string();
    return nullptr;
  }
  return std::shared_ptr<Backing>(std::move(b).value());
}

inline MemremapParams make_params(Strategy s, std::shared_ptr<Backing> backing,
                                  unsigned base_order = 0, PagemapType type = PagemapType::fs_dax) {
  MemremapParams p;
  p.type = type;
  p.strategy = s;
  p.base_order = base_order;
  p.ranges.push_back(PagemapRangeSpec{std::move(backing), 0, 0});
  return p;
}

// memremap that must succeed (fails the test and returns nullptr otherwise).
inline std::shared_ptr<DevPagemap> must_memremap(MemremapParams p) {
  auto r = memremap(std::move(p));
  if (!r) {
    ADD_FAILURE() << "memremap: " << r.error().to_string();
    return nullptr;
  }
  return std::move(r).value();
}

inline std::string strategy_param_name(const ::testing::TestParamInfo<Strategy>& info) {
  return std::string(strategy_name(info.param));
}

// ---- holding a folio ---------------------------------------------------------------------------

// One folio reference held the way the strategy's contract wants it: under alloc_event, inside an
// Allocation covering the page (the allocation is what memunmap waits for).
class FolioHold {
 public:
  FolioHold() = default;
  FolioHold(FolioHold&& o) noexcept
      : pg_(std::exchange(o.pg_, nullptr)), pfn_(o.pfn_), alloc_(std::move(o.alloc_)) {}
  FolioHold& operator=(FolioHold&&) = delete;
  ~FolioHold() { (void)release(); }

  // Errc::ok if the reference is held afterwards.
  Errc take(DevPagemap& pg, Pfn pfn) {
    (void)release();
    if (pg.strategy() == Strategy::alloc_event) {
      auto a = pg.request(pfn, 1);
      if (!a) return a.code();
      alloc_ = std::move(a).value();
    }
    Errc e = pg.get_folio(pfn);
    if (e != Errc::ok) {
      alloc_.reset();
      return e;
    }
    pg_ = &pg;
    pfn_ = pfn;
    return Errc::ok;
  }
  bool held() const { return pg_ != nullptr; }
  Pfn pfn() const { return pfn_; }
  // Drops the folio reference, then the allocation. Returns put_folio's result.
  Errc release() {
    Errc e = Errc::ok;
    if (pg_ != nullptr) e = std::exchange(pg_, nullptr)->put_folio(pfn_);
    alloc_.reset();
    return e;
  }

 private:
  DevPagemap* pg_ = nullptr;
  Pfn pfn_ = 0;
  DevPagemap::Allocation alloc_;
};

// Records every page_free call.
class FreeLog {
 public:
  struct Free {
    Pfn head;
    unsigned order;
  };
  PagemapOps ops() {
    PagemapOps o;
    o.page_free = [this](DevPagemap&, Pfn head, unsigned order) {
      std::lock_guard<std::mutex> lock(mu_);
      frees_.push_back({head, order});
    };
    return o;
  }
  std::vector<Free> frees() const {
    std::lock_guard<std::mutex> lock(mu_);
    return frees_;
  }
  std::size_t count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return frees_.size();
  }

 private:
  mutable std::mutex mu_;
  std::vector<Free> frees_;
};

// A teardown (memunmap, unbind, ...) running on another thread. Declare it before the references
// the teardown waits for, so that on an early test failure those are released before the
// destructor joins.
class AsyncTeardown {
 public:
  AsyncTeardown() = default;
  AsyncTeardown(const AsyncTeardown&) = delete;
  AsyncTeardown& operator=(const AsyncTeardown&) = delete;
  ~AsyncTeardown() {
    if (thread_.joinable()) thread_.join();
  }
  // Runs `teardown()` (returning Result<TeardownStats>) on a new thread.
  template <typename Teardown>
  void start_with(Teardown teardown) {
    thread_ = std::thread([this, teardown = std::move(teardown)]() mutable {
      result_.emplace(teardown());
      done_.store(true, std::memory_order_release);
    });
  }
  bool done() const { return done_.load(std::memory_order_acquire); }
  Result<TeardownStats> join() {
    thread_.join();
    return std::move(*result_);
  }

 private:
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::optional<Result<TeardownStats>> result_;
};

// A memunmap running on another thread.
class AsyncMemunmap : public AsyncTeardown {
 public:
  void start(DevPagemap& pg, MemunmapOptions opts = {}) {
    start_with([&pg, opts] { return pg.memunmap(opts); });
  }
};

// Polls `cond` until it holds or `limit` passes; returns the final value.
template <typename Cond>
bool eventually(Cond&& cond, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (!cond()) {
    if (std::chrono::steady_clock::now() >= until) return cond();
    std::this_thread::yield();
  }
  return true;
}

// Runs `fn` on another thread and waits for it at most `limit`. A call that has not returned by
// then is a hang: it is reported and the test process ends with a failure, so that ctest sees a
// failed test instead of blocking until its own timeout.
template <typename Fn>
auto bounded_call(const char* what, Fn fn,
                  std::chrono::milliseconds limit = std::chrono::seconds(20)) -> decltype(fn()) {
  using R = decltype(fn());
  std::packaged_task<R()> task(std::move(fn));
  std::future<R> done = task.get_future();
  std::thread t(std::move(task));
  if (done.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "FAILED: %s did not return within %lld ms (hang)\n", what,
                 static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::_Exit(1);
  }
  t.join();
  return done.get();
}

}  // namespace pgmap::testutil
