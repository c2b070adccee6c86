#include "timing.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
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

// Per-thread wall and CPU seconds of one run of `ops` operations each -> per-op figures (the
// threads' mean) and the slowest thread's time.
RunTimes run_times_of(const std::vector<double>& seconds, const std::vector<double>& cpu,
                      std::uint64_t ops) {
  RunTimes r;
  double sum = 0;
  double cpu_sum = 0;
  for (std::size_t i = 0; i < seconds.size(); ++i) {
    r.slowest_seconds = std::max(r.slowest_seconds, seconds[i]);
    sum += seconds[i];
    cpu_sum += cpu[i];
  }
  const double n = static_cast<double>(seconds.size());
  r.ns_per_op = sum / n * 1e9 / static_cast<double>(ops);
  r.cpu_ns_per_op = cpu_sum / n * 1e9 / static_cast<double>(ops);
  return r;
}

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
  return run_times_of(seconds, cpu, ops);
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
  v.threads = std::max(1u, loop.threads);
  v.body = st->body;
  v.ops_scale = ops_scale;
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

namespace {

// Operations each thread of a slice runs before the start barrier (outside the measurement): the
// previous slice was another case, with other cache lines.
constexpr std::uint64_t kSliceWarmupOps = 256;

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// `size` persistent threads, thread i pinned to usable CPU i, asleep between jobs. Every job runs
// on all of them (one team per thread count), so no thread reads a job it is not part of.
class ThreadTeam {
 public:
  explicit ThreadTeam(unsigned size) : size_(size), seconds_(size), cpu_(size) {
    for (unsigned i = 0; i < size; ++i)
      workers_.emplace_back([this, i] { work(i); });
  }
  ~ThreadTeam() {
    stop_ = true;
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    for (std::thread& w : workers_)
      w.join();
  }
  ThreadTeam(const ThreadTeam&) = delete;
  ThreadTeam& operator=(const ThreadTeam&) = delete;

  // Runs `body` for `ops` operations on every thread of the team, timed from a common start.
  RunTimes run(std::uint64_t ops, const ThreadBody& body) {
    body_ = &body;
    ops_ = ops;
    arrived_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    for (unsigned d = done_.load(std::memory_order_acquire); d < size_;
         d = done_.load(std::memory_order_acquire)) {
      done_.wait(d, std::memory_order_acquire);
    }
    return run_times_of(seconds_, cpu_, ops);
  }

 private:
  void work(unsigned i) {
    pin_to_cpu_index(i);
    std::uint64_t seen = 0;
    for (;;) {
      gen_.wait(seen, std::memory_order_acquire);
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      const ThreadBody& body = *body_;
      body(i, kSliceWarmupOps);
      arrived_.fetch_add(1, std::memory_order_acq_rel);
      while (arrived_.load(std::memory_order_acquire) < size_)
        cpu_relax();
      const double c0 = thread_cpu_seconds();
      const auto t0 = SteadyClock::now();
      body(i, ops_);
      seconds_[i] = seconds_since(t0);
      cpu_[i] = thread_cpu_seconds() - c0;
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_) done_.notify_one();
    }
  }

  const unsigned size_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> gen_{0};
  std::atomic<unsigned> arrived_{0};
  std::atomic<unsigned> done_{0};
  // The job: written by run() before gen_ is bumped, read by the workers after they see it.
  const ThreadBody* body_ = nullptr;
  std::uint64_t ops_ = 0;
  std::atomic<bool> stop_{false};
  std::vector<double> seconds_;
  std::vector<double> cpu_;
};

// N for one slice: grow until a run lasts a quarter of the slice, then scale; the median of three
// probes at that N decides (one probe may land in the slow mode or be preempted).
std::uint64_t calibrate_slice(ThreadTeam& team, const ThreadBody& body, double slice_seconds) {
  std::uint64_t ops = 64;
  RunTimes probe = team.run(ops, body);
  while (probe.slowest_seconds < slice_seconds / 4 && ops < kMaxOps) {
    ops *= 4;
    probe = team.run(ops, body);
  }
  std::vector<double> per_op;
  for (int i = 0; i < 3; ++i)
    per_op.push_back(team.run(ops, body).slowest_seconds / static_cast<double>(ops));
  const double s = std::max(summarize(per_op).median, 1e-12);
  return std::clamp<std::uint64_t>(static_cast<std::uint64_t>(slice_seconds / s), 1, kMaxOps);
}

}  // namespace

InterleavedRun run_sliced(std::vector<Variant>& variants, const SliceOptions& opts) {
  std::map<unsigned, std::unique_ptr<ThreadTeam>> teams;
  std::vector<std::uint64_t> ops(variants.size(), 0);
  for (std::size_t i = 0; i < variants.size(); ++i) {
    Variant& v = variants[i];
    if (v.threads == 0 || !v.body) {
      if (v.prepare) v.prepare();
      continue;
    }
    auto& team = teams[v.threads];
    if (!team) team = std::make_unique<ThreadTeam>(v.threads);
    ops[i] = calibrate_slice(*team, v.body, opts.slice_seconds);
  }
  InterleavedRun out;
  out.slice_seconds = opts.slice_seconds;
  out.samples.assign(variants.size(), {});
  for (auto& s : out.samples)
    s.reserve(opts.rounds);
  std::vector<std::size_t> order(variants.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::mt19937_64 rng(opts.seed);
  // The CPU share of other processes is read over blocks of rounds of at least kShareBlockSeconds:
  // /proc/stat counts in 10 ms ticks, a round lasts about variants.size() slices.
  constexpr double kShareBlockSeconds = 0.1;
  const unsigned rounds = std::max(1u, opts.rounds);
  std::optional<CpuShare> share;
  SteadyClock::time_point block_start;
  for (unsigned round = 0; round < rounds; ++round) {
    std::shuffle(order.begin(), order.end(), rng);
    if (!share) {
      share.emplace();
      block_start = SteadyClock::now();
    }
    for (std::size_t i : order) {
      Variant& v = variants[i];
      if (ops[i] == 0) {
        out.samples[i].push_back(v.run_rep());
        continue;
      }
      const RunTimes r = teams[v.threads]->run(ops[i], v.body);
      out.samples[i].push_back(Sample{r.ns_per_op / v.ops_scale, r.cpu_ns_per_op / v.ops_scale});
    }
    if (seconds_since(block_start) >= kShareBlockSeconds || round + 1 == rounds) {
      out.other_cpu_share.push_back(share->other());
      out.cpu_share_readable = out.cpu_share_readable && share->readable();
      share.reset();
    }
  }
  return out;
}

}  // namespace pgmap::bench
