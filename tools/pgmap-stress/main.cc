// pgmap-stress: race-widening stress of the liveness strategies (stress.h describes a run).
//
//   pgmap-stress [--duration S] [--threads N] [--strategy all|safe|none|per_lookup|...]
//                [--seed X] [--quick] [--fs] [--phase S] [-v]
//
// --duration is the whole run, split evenly over the strategies. The seed is printed first; the
// same --seed replays the same operation choices and yield-point decisions (thread timing still
// varies). Exit status: 0 when no safe strategy showed a violation (violations under `none` are
// expected and only counted), 1 otherwise, 2 for a usage error.
#include <fmt/format.h>

#include <execinfo.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"
#include "stress.h"

namespace {

std::uint64_t g_seed = 0;

// A crash (SIGSEGV on torn-down metadata in a release build, for example) is a finding too: say
// which seed, print the stack, then die of the same signal. Sanitizer builds report it themselves.
[[noreturn]] void on_fatal_signal(int sig) {
  char msg[96];
  const int n = std::snprintf(msg, sizeof msg, "pgmap-stress: FATAL signal %d (seed %llu)\n", sig,
                              static_cast<unsigned long long>(g_seed));
  if (n > 0) (void)!write(STDERR_FILENO, msg, static_cast<std::size_t>(n));
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
  std::_Exit(128 + sig);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace pgmap;
  stress::Options o;
  double duration = 10;
  std::string strategy = "all";
  std::uint64_t seed = 0;
  auto usage = [] {
    std::fprintf(stderr,
                 "usage: pgmap-stress [--duration S] [--threads N] [--strategy all|safe|NAME] "
                 "[--seed X] [--quick] [--fs] [--phase S] [-v]\n");
    return 2;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    char* end = nullptr;
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--fs") {
      o.fs = true;
    } else if (a == "-v" || a == "--verbose") {
      o.verbose = true;
    } else if (a == "-h" || a == "--help") {
      (void)usage();
      return 0;
    } else if ((a == "--duration" || a == "--phase") && (v = next()) != nullptr) {
      const double d = std::strtod(v, &end);
      if (*end != '\0' || !(d >= 0)) return usage();
      (a == "--duration" ? duration : o.phase_seconds) = d;
    } else if (a == "--threads" && (v = next()) != nullptr) {
      const unsigned long n = std::strtoul(v, &end, 10);
      if (*end != '\0' || n < 1 || n > 63) return usage();
      o.threads = static_cast<unsigned>(n);
    } else if (a == "--seed" && (v = next()) != nullptr) {
      seed = std::strtoull(v, &end, 10);
      if (*end != '\0') return usage();
    } else if (a == "--strategy" && (v = next()) != nullptr) {
      strategy = v;
    } else {
      return usage();
    }
  }

  std::vector<Strategy> strategies;
  if (strategy == "all") {
    strategies.assign(kAllStrategies.begin(), kAllStrategies.end());
  } else if (strategy == "safe") {
    strategies.assign(kSafeStrategies.begin(), kSafeStrategies.end());
  } else if (auto s = parse_strategy(strategy)) {
    strategies.push_back(*s);
  } else {
    std::fprintf(stderr, "pgmap-stress: unknown strategy '%s'\n", strategy.c_str());
    return 2;
  }
  if (seed == 0) {
    seed = std::random_device{}();
    seed = (seed << 32) ^
           static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  o.seed = seed;
  o.seconds = duration / static_cast<double>(strategies.size());
  std::printf("pgmap-stress: seed %llu, %u threads, %.1f s per strategy, yield points %s\n",
              static_cast<unsigned long long>(seed), o.threads, o.seconds,
              kYieldPointsEnabled ? "compiled in" : "compiled out (release)");
  std::printf(
      "  reproduce: pgmap-stress --seed %llu --threads %u --duration %.1f --strategy %s%s%s\n",
      static_cast<unsigned long long>(seed), o.threads, duration, strategy.c_str(),
      o.quick ? " --quick" : "", o.fs ? " --fs" : "");
  std::fflush(stdout);
  stress::install_yield_hook(seed);
  g_seed = seed;
  if (!pgmap::sanitizer::kAddress && !pgmap::sanitizer::kThread) {
    std::signal(SIGSEGV, on_fatal_signal);
    std::signal(SIGBUS, on_fatal_signal);
  }

  bool failed = false;
  for (Strategy s : strategies) {
    stress::Figures f = o.fs ? stress::run_fs_strategy(s, o) : stress::run_strategy(s, o);
    const std::uint64_t v = f.total_violations();
    const bool expected = s == Strategy::none;
    std::printf(
        "%-11s %6.1f s  %4llu phases  %9llu ops  %8.0f ops/s  unbind %llu  memunmap %llu  "
        "refused/timed-out %llu  recreated %llu  checks %llu  violations %llu%s\n",
        std::string(strategy_name(s)).c_str(), f.seconds, static_cast<unsigned long long>(f.phases),
        static_cast<unsigned long long>(f.ops),
        f.seconds > 0 ? static_cast<double>(f.ops) / f.seconds : 0.0,
        static_cast<unsigned long long>(f.unbinds), static_cast<unsigned long long>(f.memunmaps),
        static_cast<unsigned long long>(f.refused), static_cast<unsigned long long>(f.recreated),
        static_cast<unsigned long long>(f.checker_runs), static_cast<unsigned long long>(v),
        expected ? " (expected: none is unsafe)" : "");
    if (v != 0) {
      std::string kinds;
      for (const auto& [k, n] : f.violations)
        kinds += fmt::format(" {}={}", k, n);
      std::printf("            by kind:%s\n", kinds.c_str());
      for (const std::string& r : f.first_reports)
        std::printf("            %s\n", r.c_str());
    }
    for (const auto& [k, n] : f.known)
      std::printf("            known defect (not counted as a violation): %s=%llu\n", k.c_str(),
                  static_cast<unsigned long long>(n));
    for (const std::string& r : f.known_first)
      std::printf("            %s\n", r.c_str());
    if (o.verbose) {
      std::string ops;
      for (const auto& [k, n] : f.op_counts)
        ops += fmt::format(" {}={}", k, n);
      std::printf("            ops:%s\n", ops.c_str());
    }
    if (v != 0 && !expected) failed = true;
    std::fflush(stdout);
  }
  if (kYieldPointsEnabled) {
    std::string hits;
    for (const auto& [name, n] : stress::yield_point_hits())
      hits += fmt::format(" {}={}", name, n);
    std::printf("yield points reached:%s\n", hits.empty() ? " (none)" : hits.c_str());
  }
  std::printf("pgmap-stress: %s (seed %llu)\n", failed ? "FAILED" : "ok",
              static_cast<unsigned long long>(seed));
  return failed ? 1 : 0;
}
