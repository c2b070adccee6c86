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
#include <string>
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

// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), in seconds.
double thread_cpu_seconds() noexcept;

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

// ---- interleaved comparisons --------------------------------------------------------------------
//
// The cases of one comparison (the strategies of a hot path, a case and its floor) are measured
// INTERLEAVED: every round runs one repetition of each case, in an order shuffled afresh for every
// round, so that a ratio of two cases compares the same time window and no case always runs
// first (after a setup) or last. Ratios are taken per round, then their median reported.

// One repetition of one case: wall and thread-CPU time per operation, averaged over the threads.
// cpu_ns well under wall_ns means the threads were off their CPUs for part of the repetition.
struct Sample {
  double wall_ns = 0;
  double cpu_ns = 0;
};

// One case of a comparison. `prepare` runs once before the first round (calibration); `run_rep`
// runs one repetition.
struct Variant {
  std::string name;
  std::function<void()> prepare;
  std::function<Sample()> run_rep;
  // A timed loop's threads, body and scale (set by loop_variant), for run_sliced; threads == 0
  // for a variant that is not a timed loop (run_sliced then calls run_rep once per slice).
  unsigned threads = 0;
  ThreadBody body;
  double ops_scale = 1;
};

// A timed-loop case: `prepare` calibrates N for `loop` (loop.reps is ignored), `run_rep` runs
// `loop.threads` threads of `body` once. Each figure is divided by `ops_scale` (e.g. pages per
// call, to report per page).
Variant loop_variant(std::string name, const TimedLoop& loop, ThreadBody body,
                     double ops_scale = 1);

// The machine's CPU time between two points, from /proc/stat (all CPUs) and getrusage (this
// process): the share of all CPUs' time that went to other processes or to the hypervisor
// (steal). Resolution is one clock tick (10 ms) per CPU, so read it over rounds of ~0.1 s or more.
class CpuShare {
 public:
  CpuShare();            // the start point
  double other() const;  // since the start point, in [0, 1]; 0 when /proc/stat is unreadable
  bool readable() const { return ok_; }

 private:
  std::uint64_t busy_ = 0, total_ = 0;
  double self_seconds_ = 0;
  bool ok_ = false;
};

struct InterleavedRun {
  std::vector<std::vector<Sample>> samples;  // [variant][round]
  std::vector<double> other_cpu_share;       // per round (CpuShare::other); run_sliced: per block
                                             // of rounds lasting at least 0.1 s
  bool cpu_share_readable = true;
  double slice_seconds = 0;  // run_sliced: the length of one slice; 0 for run_interleaved
};

// Prepares every variant, then runs `rounds` rounds, each one repetition of every variant in an
// order drawn from `seed` and the round number.
InterleavedRun run_interleaved(std::vector<Variant>& variants, unsigned rounds, std::uint64_t seed);

// ---- sliced interleaving ------------------------------------------------------------------------
//
// This machine (a 2-vCPU KVM guest) runs the same loop at one of two speeds (about 20 % apart)
// that alternate on a scale of tens to hundreds of milliseconds, and a loaded machine preempts a
// thread every few milliseconds. Repetitions of 50 ms therefore each see their own mix of modes,
// and the median of one case and that of another come from different mixes. run_sliced measures
// the cases in SHORT slices instead (about a millisecond, well under the time scale of a mode),
// many rounds of them, each round one slice of every case in a freshly shuffled order, so that
// every case sees the same mix of modes and the two slices of a per-round ratio mostly share a
// mode. docs/results-format.md ("Sliced comparisons") gives the measurement of the time scale.
//
// The slices run on persistent pinned threads (one team per thread count: thread i on usable CPU
// i, asleep between slices), so a slice costs no thread creation; each thread runs a short
// warm-up of the case, meets the others on a spin barrier, and times its own N operations (N
// calibrated per case so that a slice lasts about slice_seconds). Every case gets the same
// treatment, floors included.

struct SliceOptions {
  double slice_seconds = 0.001;  // the length of one slice of one case
  unsigned rounds = 1;           // each round runs one slice of every case
  std::uint64_t seed = 0;        // the order of every round
};

// Calibrates every variant for slices of opts.slice_seconds, then runs opts.rounds rounds. Each
// sample is one slice; other_cpu_share is measured per round.
InterleavedRun run_sliced(std::vector<Variant>& variants, const SliceOptions& opts);

}  // namespace pgmap::bench
