// Microbenchmarks of the core reference counting primitives against the usual alternatives and
// against the machine's floors, measured in the same run:
//
//   percpu_ref_benchmark --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true
//       --benchmark_report_aggregates_only=true --benchmark_min_time=0.1   (one command line)
//
// (PGMAP_PERCPU_IMPL=per-thread measures the fallback implementation.)
//
// Floors: BM_RelaxedPairFloor: two relaxed increments (load+store) of a thread-local counter, the
// least a get+put can cost. BM_LockPair: fetch_add+fetch_sub on a thread-private atomic (the
// uncontended bare atomic pair).
// BM_PercpuRefLive / BM_PercpuRefAtomic: one get+put pair on a shared PercpuRef in percpu (live)
// and atomic mode; BM_PercpuRefLiveAfterResurrect: live mode on a kAllowReinit ref that was
// killed and resurrected (must cost what BM_PercpuRefLive costs). The label names the
// implementation. BM_SharedAtomic: fetch_add+fetch_sub on one shared std::atomic.
// BM_SharedPtrCopy: copy and destroy a shared std::shared_ptr. BM_UrcuRef: liburcu's
// urcu_ref_get/urcu_ref_put. Each runs on 1 and 2 threads sharing the same object. BM_KillConfirm:
// create + kill + destroy a PercpuRef (the process-wide barrier dominates), with and without
// another thread hammering a different percpu ref. BM_SynchronizeRcu: one grace period, with and
// without a busy reader.
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <urcu/ref.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "core/heavy_barrier.h"
#include "pgmap/core/percpu_ref.h"
#include "pgmap/core/rcu.h"

// Every measured loop starts on a 64-byte boundary. The op cache of this Zen 3 works in 64-byte
// windows; the same relaxed_floor loop measured 0.88 ns per pair when its 30 bytes sat inside one
// window and 1.5 ns when a rebuild moved it across a boundary, which swung the floor ratios by
// 1.7x for no change in the code measured. Aligning every case's loop the same way removes code
// placement from the comparison.
#pragma GCC optimize("align-loops=64")

namespace pgmap {
namespace {

// Shared objects are function-local statics: initialized once, thread-safely, by whichever
// benchmark thread gets there first, and never destroyed (threads may still use them at exit).

PercpuRef& live_ref() {
  static PercpuRef* ref = new PercpuRef(nullptr);
  return *ref;
}

PercpuRef& atomic_ref() {
  static PercpuRef* ref = [] {
    auto* r = new PercpuRef(nullptr);
    if (r->switch_to_atomic() != Errc::ok) std::abort();
    return r;
  }();
  return *ref;
}

PercpuRef& resurrected_ref() {
  static PercpuRef* ref = [] {
    auto* r = new PercpuRef(nullptr, PercpuRef::kAllowReinit);
    if (r->get() != Errc::ok || r->kill() != Errc::ok || r->resurrect() != Errc::ok ||
        r->put() != Errc::ok) {
      std::abort();
    }
    return r;
  }();
  return *ref;
}

std::string impl_label() {
  return std::string(PercpuRef::implementation());
}

// A counter on its own cache line pair, private to the benchmark thread that allocated it.
struct alignas(128) PrivateCounter {
  std::atomic<std::uint64_t> value{0};
};

void BM_RelaxedPairFloor(benchmark::State& state) {
  // On the heap, reached through a pointer held in a register, as pgmap-bench's relaxed_floor
  // and every counter the refs use. (The loop's alignment matters more than where the counter
  // lives: see the pragma above; the stack version of this floor read 1.5 ns per pair because
  // its loop crossed a 64-byte window.)
  auto owned = std::make_unique<PrivateCounter>();
  std::atomic<std::uint64_t>* counter = &owned->value;
  for (auto _ : state) {
    counter->store(counter->load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    benchmark::ClobberMemory();
    counter->store(counter->load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
    benchmark::ClobberMemory();
  }
  if (counter->load() != 0) state.SkipWithError("unbalanced");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RelaxedPairFloor)->ThreadRange(1, 2)->UseRealTime();

void BM_LockPair(benchmark::State& state) {
  auto owned = std::make_unique<PrivateCounter>();  // this thread's own: uncontended
  std::atomic<std::uint64_t>* counter = &owned->value;
  for (auto _ : state) {
    benchmark::DoNotOptimize(counter->fetch_add(1, std::memory_order_acq_rel));
    benchmark::DoNotOptimize(counter->fetch_sub(1, std::memory_order_acq_rel));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LockPair)->ThreadRange(1, 2)->UseRealTime();

#if PGMAP_PERCPU_RSEQ_INLINE
// The honest floor of the rseq technique: one critical section per get and per put (arm rseq_cs,
// read cpu_id, one add to that CPU's counter), without PercpuRef's word load and flag test.
// BM_PercpuRefLive / BM_RseqFloor is what the mode word costs.
std::atomic<std::uint64_t>* rseq_floor_counters() {
  static std::atomic<std::uint64_t>* cpu0 = [] {
    const std::size_t bytes = static_cast<std::size_t>(get_nprocs_conf()) << detail::kCpuShift;
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    return static_cast<std::atomic<std::uint64_t>*>(mem);
  }();
  return cpu0;
}

void BM_RseqFloor(benchmark::State& state) {
  if (PercpuRef::implementation() != "rseq") {
    state.SkipWithError("rseq is not in use in this process");
    return;
  }
  std::atomic<std::uint64_t>* cpu0 = rseq_floor_counters();
  for (auto _ : state) {
    detail::rseq_floor_add(cpu0, 1);
    detail::rseq_floor_add(cpu0, -1);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RseqFloor)->ThreadRange(1, 2)->UseRealTime();
#endif

void live_pairs(benchmark::State& state, PercpuRef& ref) {
  if (!ref.is_percpu()) state.SkipWithError("ref is not percpu");
  for (auto _ : state) {
    benchmark::DoNotOptimize(ref.get());
    benchmark::DoNotOptimize(ref.put());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(impl_label());
}

void BM_PercpuRefLive(benchmark::State& state) {
  live_pairs(state, live_ref());
}
BENCHMARK(BM_PercpuRefLive)->ThreadRange(1, 2)->UseRealTime();

void BM_PercpuRefLiveAfterResurrect(benchmark::State& state) {
  live_pairs(state, resurrected_ref());
}
BENCHMARK(BM_PercpuRefLiveAfterResurrect)->ThreadRange(1, 2)->UseRealTime();

void BM_PercpuRefAtomic(benchmark::State& state) {
  PercpuRef& ref = atomic_ref();
  if (ref.is_percpu()) state.SkipWithError("ref is not atomic");
  for (auto _ : state) {
    benchmark::DoNotOptimize(ref.get());
    benchmark::DoNotOptimize(ref.put());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(impl_label());
}
BENCHMARK(BM_PercpuRefAtomic)->ThreadRange(1, 2)->UseRealTime();

void BM_SharedAtomic(benchmark::State& state) {
  static std::atomic<std::int64_t> counter{1};
  for (auto _ : state) {
    benchmark::DoNotOptimize(counter.fetch_add(1, std::memory_order_acq_rel));
    benchmark::DoNotOptimize(counter.fetch_sub(1, std::memory_order_acq_rel));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SharedAtomic)->ThreadRange(1, 2)->UseRealTime();

void BM_SharedPtrCopy(benchmark::State& state) {
  static const std::shared_ptr<int>* shared = new std::shared_ptr<int>(std::make_shared<int>(42));
  for (auto _ : state) {
    std::shared_ptr<int> copy = *shared;
    benchmark::DoNotOptimize(copy);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SharedPtrCopy)->ThreadRange(1, 2)->UseRealTime();

void urcu_release_never(urcu_ref*) {
  std::abort();
}  // the count never reaches zero here

void BM_UrcuRef(benchmark::State& state) {
  static urcu_ref* ref = [] {
    auto* r = new urcu_ref;
    urcu_ref_init(r);
    return r;
  }();
  for (auto _ : state) {
    urcu_ref_get(ref);
    urcu_ref_put(ref, &urcu_release_never);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_UrcuRef)->ThreadRange(1, 2)->UseRealTime();

// A background thread hammering get/put on its own percpu ref: the barrier of every kill must
// interrupt it, and the fold must wait for its in-flight operations.
class BackgroundHammer {
 public:
  explicit BackgroundHammer(bool enabled) {
    if (!enabled) return;
    thread_ = std::thread([this] {
      PercpuRef ref(nullptr);
      started_.store(true);
      while (!stop_.load(std::memory_order_relaxed)) {
        benchmark::DoNotOptimize(ref.get());
        benchmark::DoNotOptimize(ref.put());
        ops_.fetch_add(1, std::memory_order_relaxed);
      }
      (void)ref.kill();
    });
    while (!started_.load())
      std::this_thread::yield();
  }
  ~BackgroundHammer() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  std::uint64_t ops() const { return ops_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<bool> started_{false};
  std::atomic<std::uint64_t> ops_{0};
  std::thread thread_;
};

void BM_KillConfirm(benchmark::State& state) {
  BackgroundHammer hammer(state.range(0) != 0);
  std::uint64_t confirms = 0;
  for (auto _ : state) {
    PercpuRef ref(nullptr);
    benchmark::DoNotOptimize(ref.get());  // a reference taken on the fast path: the fold has work
    benchmark::DoNotOptimize(ref.put());
    benchmark::DoNotOptimize(ref.kill_and_confirm([&] { ++confirms; }));
    benchmark::ClobberMemory();
  }
  if (confirms != static_cast<std::uint64_t>(state.iterations())) state.SkipWithError("confirm");
  state.counters["reader_ops"] = static_cast<double>(hammer.ops());
  state.SetLabel(PercpuRef::implementation() == "rseq" ? "rseq membarrier"
                                                       : detail::heavy_barrier_name());
}
BENCHMARK(BM_KillConfirm)->ArgName("reader")->Arg(0)->Arg(1)->UseRealTime();

void BM_SynchronizeRcu(benchmark::State& state) {
  std::atomic<bool> stop{false};
  std::atomic<bool> started{false};
  std::thread reader;
  if (state.range(0) != 0) {
    reader = std::thread([&] {
      started.store(true);
      while (!stop.load(std::memory_order_relaxed)) {
        rcu::ReadGuard g;
        benchmark::ClobberMemory();
      }
    });
    while (!started.load())
      std::this_thread::yield();
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(rcu::synchronize());
  }
  stop.store(true);
  if (reader.joinable()) reader.join();
}
BENCHMARK(BM_SynchronizeRcu)->ArgName("reader")->Arg(0)->Arg(1)->UseRealTime();

}  // namespace
}  // namespace pgmap

// Results on this machine (RelWithDebInfo -O2, GCC 12, 2 vCPU EPYC Zen 3, Linux 6.18, glibc 2.36),
// 2026-12-01 17:50 UTC, implementation "rseq", medians of 7 repetitions, randomly interleaved, one
// run, every measured loop 64-byte aligned, the section taking +1/-1 as an immediate:
//
//   percpu_ref_benchmark --benchmark_repetitions=7 --benchmark_enable_random_interleaving=true
//       --benchmark_report_aggregates_only=true --benchmark_min_time=0.1
//       --benchmark_filter='Floor|LockPair|PercpuRef|SharedAtomic|KillConfirm'
//
// The machine was heavily shared (load average ~11 on 2 vCPUs: wall time is 3-5x CPU time), so
// compare the CPU column, and ratios within the run. CPU time: live get+put 1.88 ns = 2.23x the
// relaxed-pair floor (0.842 ns) and 1.10x BM_RseqFloor (1.71 ns, the section without the word
// load); 2 threads 1.63 ns; after kill+resurrect 1.93 ns; atomic mode 7.02 ns = 1.10x the bare
// lock pair (6.41 ns); kill->confirm with an active reader 4.1 us wall. The per-thread fallback
// (PGMAP_PERCPU_IMPL=per-thread) measured 3.9-6.4 ns CPU per pair in alternating runs at load ~10,
// and 2.2-3.1 ns in a build with -DPGMAP_PERCPU_NO_RSEQ (docs/percpu-ref.md, "The per-thread
// fallback").
//
// clang-format off
// BM_KillConfirm/reader:0/real_time_median 1746 ns 358 ns 7 reader_ops=0 rseq membarrier
// BM_KillConfirm/reader:1/real_time_median 4149 ns 618 ns 7 reader_ops=9.21112M rseq membarrier
// BM_LockPair/real_time/threads:1_median 31.2 ns 6.41 ns 7 items_per_second=32.0501M/s
// BM_LockPair/real_time/threads:2_median 22.9 ns 5.94 ns 7 items_per_second=43.6824M/s
// BM_PercpuRefAtomic/real_time/threads:1_median 34.1 ns 7.02 ns 7 items_per_second=29.3592M/s rseq
// BM_PercpuRefAtomic/real_time/threads:2_median 25.3 ns 7.05 ns 7 items_per_second=39.5836M/s rseq
// BM_PercpuRefLive/real_time/threads:1_median 8.64 ns 1.88 ns 7 items_per_second=115.755M/s rseq
// BM_PercpuRefLive/real_time/threads:2_median 5.73 ns 1.63 ns 7 items_per_second=174.576M/s rseq
// BM_PercpuRefLiveAfterResurrect/real_time/threads:1_median 9.63 ns 1.93 ns 7 items_per_second=103.864M/s rseq
// BM_PercpuRefLiveAfterResurrect/real_time/threads:2_median 6.23 ns 1.99 ns 7 items_per_second=160.629M/s rseq
// BM_RelaxedPairFloor/real_time/threads:1_median 4.37 ns 0.842 ns 7 items_per_second=228.773M/s
// BM_RelaxedPairFloor/real_time/threads:2_median 2.98 ns 0.883 ns 7 items_per_second=335.384M/s
// BM_RseqFloor/real_time/threads:1_median 8.63 ns 1.71 ns 7 items_per_second=115.889M/s
// BM_RseqFloor/real_time/threads:2_median 5.97 ns 1.67 ns 7 items_per_second=167.502M/s
// BM_SharedAtomic/real_time/threads:1_median 26.6 ns 5.42 ns 7 items_per_second=37.5724M/s
// BM_SharedAtomic/real_time/threads:2_median 23.4 ns 6.52 ns 7 items_per_second=42.747M/s
// clang-format on
