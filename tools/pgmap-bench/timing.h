// Timing for pgmap-bench: thread pinning, the multi-threaded timed loop with its calibration, and
// the median/min/max summary of repetitions.
//
// A timed loop runs the same body on T threads pinned to the first T usable CPUs. The threads
// warm up (first-use registration of per-thread state happens there, not in the measurement),
// meet on a barrier, and each times its own N operations; a repetition's figure is each thread's
// wall time / N, averaged over the threads (per-thread ns/op). N is calibrated once per case so
// that one repetition lasts at least the configured minimum, which keeps timer resolution and
// thread start-up skew out of the numbers.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

namespace pgmap::bench {

using SteadyClock = std::chrono::steady_clock;

inline double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

// Keeps the compiler from caching values in registers or deleting stores across loop iterations,
// without emitting an instruction (Google Benchmark's ClobberMemory). Never an atomic: the loops
// must measure only the operations under test.
inline void clobber_memory() noexcept {
  asm volatile("" ::: "memory");
}

// CPUs this process may run on, in increasing order (the affinity mask seen at first call).
const std::vector<unsigned>& usable_cpus();

// Pins the calling thread to usable CPU number `index` (modulo their count). A failure is
// ignored: the figures are then noisier, not wrong.
void pin_to_cpu_index(unsigned index) noexcept;

struct Summary {
  double median = 0;
  double min = 0;
  double max = 0;
  unsigned reps = 0;
};

// Median (mean of the two middle samples for an even count), min and max of a non-empty sample.
Summary summarize(std::vector<double> samples);

// The measured work of thread `index`: `ops` operations, each followed by clobber_memory().
using ThreadBody = std::function<void(unsigned index, std::uint64_t ops)>;

struct TimedLoop {
  unsigned threads = 1;
  unsigned reps = 1;
  double min_rep_seconds = 0.05;  // one repetition lasts at least about this long
};

// Calibrates N, then runs loop.reps repetitions; returns one per-thread ns/op figure per
// repetition. May block for reps * min_rep_seconds and a little more.
std::vector<double> measure_ns_per_op(const TimedLoop& loop, const ThreadBody& body);

}  // namespace pgmap::bench
