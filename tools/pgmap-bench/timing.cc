#include "timing.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>

namespace pgmap::bench {

double thread_cpu_seconds() noexcept {
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return 0;
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

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
  double cpu_ns_per_op = 0;    // per-thread CPU time / ops, averaged over the threads
};

RunTimes run_once(unsigned threads, std::uint64_t ops, const ThreadBody& body) {
  std::barrier start(static_cast<std::ptrdiff_t>(threads));
  std::vector<double> seconds(threads, 0.0);
  std::vector<double> cpu(threads, 0.0);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      pin_to_cpu_index(i);
      body(i, kWarmupOps);
      start.arrive_and_wait();
      const double c0 = thread_cpu_seconds();
      const auto t0 = SteadyClock::now();
      body(i, ops);
      seconds[i] = seconds_since(t0);
      cpu[i] = thread_cpu_seconds() - c0;
    });
  }
  for (std::thread& w : workers)
    w.join();
  RunTimes r;
  double sum = 0;
  double cpu_sum = 0;
  for (unsigned i = 0; i < threads; ++i) {
    r.slowest_seconds = std::max(r.slowest_seconds, seconds[i]);
    sum += seconds[i];
    cpu_sum += cpu[i];
  }
  r.ns_per_op = sum / threads * 1e9 / static_cast<double>(ops);
  r.cpu_ns_per_op = cpu_sum / threads * 1e9 / static_cast<double>(ops);
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

namespace {

std::uint64_t calibrate(const TimedLoop& loop, const ThreadBody& body) {
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
  return ops;
}

}  // namespace

std::vector<double> measure_ns_per_op(const TimedLoop& loop, const ThreadBody& body) {
  const unsigned threads = std::max(1u, loop.threads);
  const std::uint64_t ops = calibrate(loop, body);
  std::vector<double> ns;
  ns.reserve(loop.reps);
  for (unsigned r = 0; r < loop.reps; ++r)
    ns.push_back(run_once(threads, ops, body).ns_per_op);
  return ns;
}

Variant loop_variant(std::string name, const TimedLoop& loop, ThreadBody body, double ops_scale) {
  struct State {
    TimedLoop loop;
    ThreadBody body;
    double scale;
    std::uint64_t ops = 0;
  };
  auto st = std::make_shared<State>(State{loop, std::move(body), ops_scale});
  Variant v;
  v.name = std::move(name);
  v.prepare = [st] { st->ops = calibrate(st->loop, st->body); };
  v.run_rep = [st] {
    const RunTimes r = run_once(std::max(1u, st->loop.threads), st->ops, st->body);
    return Sample{r.ns_per_op / st->scale, r.cpu_ns_per_op / st->scale};
  };
  return v;
}

namespace {

// The first line of /proc/stat: "cpu user nice system idle iowait irq softirq steal ...", in
// clock ticks summed over all CPUs. busy counts everything but idle and iowait (steal included:
// time the hypervisor gave to somebody else is time the benchmark did not have).
bool read_proc_stat(std::uint64_t& busy, std::uint64_t& total) {
  std::ifstream in("/proc/stat");
  std::string cpu;
  in >> cpu;
  if (!in || cpu != "cpu") return false;
  std::uint64_t v[8] = {};
  for (std::uint64_t& x : v)
    in >> x;
  if (!in) return false;
  total = std::accumulate(std::begin(v), std::end(v), std::uint64_t{0});
  busy = total - v[3] - v[4];
  return true;
}

double self_cpu_seconds() noexcept {
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  auto sec = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6;
  };
  return sec(ru.ru_utime) + sec(ru.ru_stime);
}

}  // namespace

CpuShare::CpuShare() : self_seconds_(self_cpu_seconds()) {
  ok_ = read_proc_stat(busy_, total_);
}

double CpuShare::other() const {
  std::uint64_t busy = 0;
  std::uint64_t total = 0;
  if (!ok_ || !read_proc_stat(busy, total) || total <= total_) return 0;
  const double ticks_per_second = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double self_ticks = (self_cpu_seconds() - self_seconds_) * ticks_per_second;
  const double other = static_cast<double>(busy - busy_) - self_ticks;
  return std::clamp(other / static_cast<double>(total - total_), 0.0, 1.0);
}

InterleavedRun run_interleaved(std::vector<Variant>& variants, unsigned rounds,
                               std::uint64_t seed) {
  for (Variant& v : variants) {
    if (v.prepare) v.prepare();
  }
  InterleavedRun out;
  out.samples.assign(variants.size(), {});
  std::vector<std::size_t> order(variants.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::mt19937_64 rng(seed);
  for (unsigned round = 0; round < rounds; ++round) {
    std::shuffle(order.begin(), order.end(), rng);
    const CpuShare share;
    for (std::size_t i : order)
      out.samples[i].push_back(variants[i].run_rep());
    out.other_cpu_share.push_back(share.other());
    out.cpu_share_readable = out.cpu_share_readable && share.readable();
  }
  return out;
}

}  // namespace pgmap::bench
