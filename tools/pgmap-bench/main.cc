// pgmap-bench: the project's main job (`make run`). Runs the ref, hotpath, removal, gup, fault and
// fsdax suites (bench.h lists what each measures), prints a progress line on stderr and the results
// table on stdout, and writes results.json, results.csv, removal.svg, hotpath.svg and gup.svg
// under --out.
//
// Exit status: 0 when every case ran; 1 when a case failed (the results of the others are still
// written); 2 for a usage or output-directory error. CLI11 reports bad flags with its own codes.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cctype>
#include <ctime>
#include <exception>
#include <filesystem>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "bench.h"
#include "machine.h"
#include "pgmap/memory/pfn.h"
#include "report.h"

namespace pgmap::bench {
namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint64_t kTiB = std::uint64_t{1} << 40;
constexpr const char* kSuites[] = {"ref", "hotpath", "removal", "gup", "fault", "fsdax"};

// "4096", "64M", "64MiB", "16g", "1TiB": binary units, optional "i" and "B".
std::optional<std::uint64_t> parse_size(std::string_view s) {
  std::size_t i = 0;
  std::uint64_t n = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) != 0) {
    const auto digit = static_cast<std::uint64_t>(s[i] - '0');
    if (n > (UINT64_MAX - digit) / 10) return std::nullopt;
    n = n * 10 + digit;
    ++i;
  }
  if (i == 0) return std::nullopt;
  std::string unit;
  for (; i < s.size(); ++i)
    unit += static_cast<char>(std::tolower(static_cast<unsigned char>(s[i])));
  unsigned shift = 0;
  if (!unit.empty() && unit != "b") {
    const std::string_view prefixes = "kmgtp";
    const auto p = prefixes.find(unit[0]);
    const std::string_view rest = std::string_view(unit).substr(1);
    if (p == std::string_view::npos || !(rest.empty() || rest == "b" || rest == "ib")) {
      return std::nullopt;
    }
    shift = 10 * (static_cast<unsigned>(p) + 1);
  }
  if (shift > 0 && n > (UINT64_MAX >> shift)) return std::nullopt;
  return n << shift;
}

std::string iso8601_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

template <typename T>
void dedupe(std::vector<T>& v) {
  std::vector<T> out;
  for (const T& x : v) {
    if (std::find(out.begin(), out.end(), x) == out.end()) out.push_back(x);
  }
  v = std::move(out);
}

struct Flags {
  std::string out = "out";
  bool quick = false;
  bool full = false;
  std::vector<std::string> suites = {"ref", "hotpath", "removal", "gup", "fault", "fsdax"};
  std::vector<std::string> strategies;
  std::vector<unsigned> threads = {1, 2};
  unsigned reps = 0;
  bool reps_given = false;
  std::string max_bytes;
  bool no_plot = false;
  std::uint64_t seed = 1;
};

// The run's parameters: the mode's defaults, then the flags that override them.
Result<Config> resolve(const Flags& f) {
  Config c;
  c.out_dir = f.out;
  c.quick = f.quick;
  c.full = f.full;
  for (std::string_view s : kSuites) {  // canonical order
    if (std::find(f.suites.begin(), f.suites.end(), s) != f.suites.end()) {
      c.suites.emplace_back(s);
    }
  }
  for (const std::string& name : f.strategies)
    c.strategies.push_back(*parse_strategy(name));
  dedupe(c.strategies);
  c.threads = f.threads;
  dedupe(c.threads);
  c.plot = !f.no_plot;
  c.seed = f.seed;
  if (f.quick) {
    // Every suite and strategy at tiny sizes, once: a smoke test, not a measurement.
    c.reps = 1;
    c.removal_reps = 1;
    c.min_rep_seconds = 0.005;
    c.kills_per_rep = 200;
    c.removal_bytes = {64 * kMiB, 256 * kMiB};
  } else if (f.full) {
    c.reps = 11;
    c.removal_reps = 7;
    c.min_rep_seconds = 0.1;
    c.kills_per_rep = 5000;
    c.removal_bytes = {kGiB, 4 * kGiB, 16 * kGiB, 64 * kGiB, 256 * kGiB, kTiB};
  } else {
    // `make run`: 5 repetitions of everything, well under 3 minutes on 2 vCPUs.
    c.reps = 5;
    c.removal_reps = 5;
    c.min_rep_seconds = 0.05;
    c.kills_per_rep = 2000;
    c.removal_bytes = {kGiB, 16 * kGiB, 256 * kGiB, kTiB};
  }
  if (f.reps_given) {
    c.reps = f.reps;
    c.removal_reps = f.reps;
  }
  if (!f.max_bytes.empty()) {
    const std::uint64_t cap = *parse_size(f.max_bytes);
    std::erase_if(c.removal_bytes, [cap](std::uint64_t b) { return b > cap; });
    if (c.removal_bytes.empty()) {
      const std::uint64_t only = align_down(cap, kPmdSize);
      if (only == 0) {
        return Error(
            Errc::invalid_argument,
            fmt::format("--max-bytes {}: the removal suite needs at least 2 MiB", f.max_bytes));
      }
      c.removal_bytes.push_back(only);
    }
  }
  return c;
}

Json config_json(const Config& c, const Flags& f, int argc, char** argv) {
  Json j = Json::object();
  j["argv"] = std::vector<std::string>(argv, argv + argc);
  j["out"] = c.out_dir;
  j["mode"] = c.quick ? "quick" : c.full ? "full" : "default";
  j["suites"] = c.suites;
  std::vector<std::string> strategies;
  for (Strategy s : c.strategies)
    strategies.emplace_back(strategy_name(s));
  j["strategies"] = strategies;
  j["threads"] = c.threads;
  j["reps"] = c.reps;
  j["removal_reps"] = c.removal_reps;
  j["min_rep_seconds"] = c.min_rep_seconds;
  j["kills_per_rep"] = c.kills_per_rep;
  j["removal_bytes"] = c.removal_bytes;
  j["max_bytes"] = f.max_bytes.empty() ? Json(nullptr) : Json(*parse_size(f.max_bytes));
  j["plot"] = c.plot;
  j["seed"] = c.seed;
  j["date"] = iso8601_now();
  return j;
}

int run(int argc, char** argv) {
  Flags f;
  for (Strategy s : kAllStrategies)
    f.strategies.emplace_back(strategy_name(s));
  std::vector<std::string> strategy_names = f.strategies;

  CLI::App app{
      "pgmap-bench: measures the pagemap liveness strategies (reference primitives, folio hot "
      "paths, memunmap, device-dax GUP and first-touch faults, file-DAX faults, truncate and "
      "entry insert/delete) and writes results.json, "
      "results.csv, removal.svg, hotpath.svg and gup.svg.",
      "pgmap-bench"};
  app.footer(
      "Without --quick or --full it runs every suite with 5 repetitions per case (medians "
      "reported) and removal sizes 1 GiB, 16 GiB, 256 GiB and 1 TiB, in under 3 minutes on 2 "
      "vCPUs. Check the figures against DESIGN.md section 5 with "
      "../shared/tools/check-targets.py OUT/results.json.");
  app.add_option("--out", f.out,
                 "Directory for results.json, results.csv, removal.svg, hotpath.svg and gup.svg; "
                 "created if missing")
      ->capture_default_str();
  auto* quick = app.add_flag("--quick", f.quick,
                             "Smoke run: every suite and strategy at tiny sizes (removal 64 MiB "
                             "and 256 MiB), 1 repetition, ~5 ms loops; finishes in seconds");
  auto* full = app.add_flag("--full", f.full,
                            "Long run: 11 repetitions (7 for removal), 100 ms loops, removal "
                            "sizes 1, 4, 16, 64, 256 GiB and 1 TiB");
  quick->excludes(full);
  app.add_option(
         "--suite", f.suites,
         "Suites to run, comma-separated: ref (refcount primitives), hotpath (folio "
         "get/put and pin/unpin), removal (memunmap), gup (devdax pin_user_pages + "
         "unpin_user_pages of 512 pages), fault (devdax first-touch faults), fsdax (file-DAX "
         "fault+unmap, truncate of N mapped pages, entry insert+delete)")
      ->delimiter(',')
      ->check(CLI::IsMember(std::vector<std::string>(std::begin(kSuites), std::end(kSuites))))
      ->capture_default_str();
  app.add_option("--strategy", f.strategies,
                 "Liveness strategies for hotpath, removal, gup, fault and fsdax, comma-separated")
      ->delimiter(',')
      ->check(CLI::IsMember(strategy_names))
      ->capture_default_str();
  app.add_option(
         "--threads", f.threads,
         "Thread counts for ref, hotpath, gup and fsdax, comma-separated; thread i is pinned to "
         "the i-th usable CPU")
      ->delimiter(',')
      ->check(CLI::Range(1u, 256u))
      ->capture_default_str();
  auto* reps = app.add_option("--reps", f.reps,
                              "Repetitions per case, overriding the mode's default (5; --quick "
                              "1; --full 11, removal 7)")
                   ->check(CLI::Range(1u, 1000u));
  app.add_option("--max-bytes", f.max_bytes,
                 "Largest removal device size, e.g. 16GiB or 256M: larger sizes are skipped "
                 "(if none remains, this size itself is used)")
      ->check(CLI::Validator(
          [](std::string& s) {
            return parse_size(s) ? std::string() : "not a size like 4096, 64M or 16GiB: " + s;
          },
          "SIZE"));
  app.add_flag("--no-plot", f.no_plot,
               "Do not run gnuplot (no removal.svg, hotpath.svg or gup.svg)");
  app.add_option("--seed", f.seed,
                 "Seed for where the busy folios of the removal suite sit inside their evenly "
                 "spaced slots")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  f.reps_given = reps->count() > 0;

  auto resolved = resolve(f);
  if (!resolved) {
    fmt::print(stderr, "pgmap-bench: {}\n", resolved.error().message());
    return 2;
  }
  const Config& cfg = *resolved;
  std::error_code ec;
  std::filesystem::create_directories(cfg.out_dir, ec);
  if (ec) {
    fmt::print(stderr, "pgmap-bench: cannot create {}: {}\n", cfg.out_dir, ec.message());
    return 2;
  }

  const Json machine = describe_machine();
  const Json config = config_json(cfg, f, argc, argv);
  std::vector<Case> cases;
  for (const std::string& suite : cfg.suites) {
    std::vector<Case> more = suite == "ref"       ? ref_cases(cfg)
                             : suite == "hotpath" ? hotpath_cases(cfg)
                             : suite == "gup"     ? gup_cases(cfg)
                             : suite == "fault"   ? fault_cases(cfg)
                             : suite == "fsdax"   ? fsdax_cases(cfg)
                                                  : removal_cases(cfg);
    for (Case& c : more)
      cases.push_back(std::move(c));
  }

  Progress progress(cases.size());
  std::vector<Row> rows;
  std::vector<std::string> failures;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    progress.start(i, cases[i].label);
    std::string failure;
    try {
      if (cases[i].run_rows) {
        Result<std::vector<Row>> r = cases[i].run_rows();
        if (r) {
          for (Row& row : *r)
            rows.push_back(std::move(row));
        } else {
          failure = r.error().to_string();
        }
      } else {
        Result<Row> r = cases[i].run();
        if (r) {
          rows.push_back(std::move(r).value());
        } else {
          failure = r.error().to_string();
        }
      }
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (!failure.empty()) {
      failures.push_back(fmt::format("{}: {}", cases[i].label, failure));
      progress.message("FAILED " + failures.back());
    }
  }
  progress.finish();

  namespace fs = std::filesystem;
  std::vector<std::string> written;
  auto record = [&](const fs::path& path, const Status& st) {
    if (st.ok()) {
      written.push_back(path.string());
    } else {
      failures.push_back(fmt::format("writing {}: {}", path.string(), st.to_string()));
    }
  };
  const fs::path out(cfg.out_dir);
  record(out / "results.json",
         write_json((out / "results.json").string(), results_json(machine, config, rows)));
  record(out / "results.csv", write_csv((out / "results.csv").string(), rows));
  if (!cfg.plot) {
    fmt::print(stderr, "plots skipped (--no-plot)\n");
  } else if (const std::string gnuplot = find_gnuplot(); gnuplot.empty()) {
    fmt::print(stderr,
               "gnuplot not found on PATH: skipping removal.svg, hotpath.svg and gup.svg\n");
  } else {
    using ChartWriter = Status (*)(const std::string& gnuplot, const std::string& path,
                                   const std::vector<Row>& rows, bool& written);
    const std::pair<const char*, ChartWriter> charts[] = {{"removal.svg", write_removal_plot},
                                                          {"hotpath.svg", write_hotpath_plot},
                                                          {"gup.svg", write_gup_plot}};
    for (const auto& [name, write_chart] : charts) {
      const fs::path path = out / name;
      bool drawn = false;
      Status st = write_chart(gnuplot, path.string(), rows, drawn);
      if (!st.ok() || drawn) record(path, st);
    }
  }

  print_table(stdout, machine_summary(machine), rows);
  fmt::print("\nwrote:\n");
  for (const std::string& path : written)
    fmt::print("  {}\n", path);
  std::fflush(stdout);
  if (!failures.empty()) {
    fmt::print(stderr, "pgmap-bench: {} failure(s):\n", failures.size());
    for (const std::string& msg : failures)
      fmt::print(stderr, "  {}\n", msg);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace pgmap::bench

int main(int argc, char** argv) {
  return pgmap::bench::run(argc, argv);
}
