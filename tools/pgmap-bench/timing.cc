#include "timing.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <thread>

namespace pgmap::bench {
namespace {

// Operations each thread runs before the barrier, outside the measurement.
constexpr std::uint64_t kWarmupOps = 1024;
// Calibration: grow N until a run lasts 1/16 of the target, then scale to 1.25x the target so
// that noise rarely pushes a repetition under it.
constexpr double kCalibrationFraction = 1.0 / 16;
constexpr double kCalibrationMargin = 1.25;
constexpr std::uint64_t kMaxOps = std::uint64_t{1} << 40;

struct RunTimes {
  double slowest_seconds = 0;  // the longest thread's wall time
  double ns_per_op = 0;        // per-thread wall time / ops, averaged over the threads
};

RunTimes run_once(unsigned threads, std::uint64_t ops, const ThreadBody& body) {
  std::barrier start(static_cast<std::ptrdiff_t>(threads));
  std::vector<double> seconds(threads, 0.0);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      pin_to_cpu_index(i);
      body(i, kWarmupOps);
      start.arrive_and_wait();
      const auto t0 = SteadyClock::now();
      body(i, ops);
      seconds[i] = seconds_since(t0);
    });
  }
  for (std::thread& w : workers)
    w.join();
  RunTimes r;
  double sum = 0;
  for (double s : seconds) {
    r.slowest_seconds = std::max(r.slowest_seconds, s);
    sum += s;
  }
  r.ns_per_op = sum / threads * 1e9 / static_cast<double>(ops);
  return r;
}

}  // namespace

const std::vector<unsigned>& usable_cpus() {
  static const std::vector<unsigned> cpus = [] {
    std::vector<unsigned> out;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      for (unsigned c = 0; c < CPU_SETSIZE; ++c) {
        if (CPU_ISSET(c, &set)) out.push_back(c);
      }
    }
    if (out.empty()) out.push_back(0);
    return out;
  }();
  return cpus;
}

void pin_to_cpu_index(unsigned index) noexcept {
  const std::vector<unsigned>& cpus = usable_cpus();
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpus[index % cpus.size()], &set);
  (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

Summary summarize(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  Summary s;
  const std::size_t n = samples.size();
  s.reps = static_cast<unsigned>(n);
  s.min = samples.front();
  s.max = samples.back();
  s.median = n % 2 == 1 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2;
  return s;
}

std::vector<double> measure_ns_per_op(const TimedLoop& loop, const ThreadBody& body) {
  const unsigned threads = std::max(1u, loop.threads);
  std::uint64_t ops = kWarmupOps;
  RunTimes probe = run_once(threads, ops, body);
  while (probe.slowest_seconds < loop.min_rep_seconds * kCalibrationFraction && ops < kMaxOps) {
    ops *= 8;
    probe = run_once(threads, ops, body);
  }
  const double want = loop.min_rep_seconds * kCalibrationMargin;
  if (probe.slowest_seconds < want) {
    const double scaled =
        std::ceil(static_cast<double>(ops) * want / std::max(probe.slowest_seconds, 1e-9));
    ops = std::min(kMaxOps, static_cast<std::uint64_t>(scaled));
  }
  std::vector<double> ns;
  ns.reserve(loop.reps);
  for (unsigned r = 0; r < loop.reps; ++r)
    ns.push_back(run_once(threads, ops, body).ns_per_op);
  return ns;
}

}  // namespace pgmap::bench
