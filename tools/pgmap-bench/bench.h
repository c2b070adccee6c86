// The shared vocabulary of pgmap-bench. A run is a list of Cases, one per output row, that the
// suites build from the Config; main.cc runs them in order with a progress line, collects the
// Rows, and report.cc prints and writes them (table, results.json, results.csv, plots).
//
// A case either returns its Row or an Error (a library call that must succeed did not, such as
// memunmap): the run then continues, writes what it has, and exits non-zero.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pgmap/core/error.h"
#include "pgmap/memory/strategy.h"
#include "timing.h"

namespace pgmap::bench {

using Json = nlohmann::ordered_json;

struct Config {
  std::string out_dir;
  bool quick = false;
  bool full = false;
  std::vector<std::string> suites;   // "ref", "hotpath", "removal", "gup", "fault", "fsdax"
  std::vector<Strategy> strategies;  // hotpath, removal, gup, fault and fsdax
  std::vector<unsigned> threads;     // ref, hotpath, gup and fsdax
  unsigned reps = 0;                 // repetitions of a ref, hotpath, gup, fault or fsdax case
  unsigned removal_reps = 0;         // repetitions of a removal case
  double min_rep_seconds = 0;        // ref, hotpath, gup, fault, fsdax: minimum length of one rep
  unsigned kills_per_rep = 0;        // kill_confirm: kills timed per repetition
  std::vector<std::uint64_t> removal_bytes;  // device sizes of the removal suite
  bool plot = true;
  std::uint64_t seed = 0;  // placement of the busy folios in the removal suite
};

enum class Metric { ns_per_op, seconds };

struct Row {
  std::string suite;
  std::string name;  // written as "case"
  std::string strategy = "-";
  unsigned threads = 1;
  std::uint64_t page_size = 0;
  std::uint64_t bytes = 0;
  std::uint64_t busy_pages = 0;
  Metric metric = Metric::ns_per_op;
  Summary summary;
  Json extra = Json::object();  // suite-specific fields, appended in JSON and CSV
  std::string note;             // a short remark for the table
};

// A case measures one Row (`run`) or, for an interleaved comparison (compare.h), several
// (`run_rows`); exactly one of the two is set.
struct Case {
  std::string label;                 // what the progress line shows while it runs
  std::function<Result<Row>()> run;  // measures; the Row, or why the case failed
  std::function<Result<std::vector<Row>>()> run_rows = {};
};

// The suites. The returned cases refer to `cfg`, which must outlive them.
std::vector<Case> ref_cases(const Config& cfg);
std::vector<Case> hotpath_cases(const Config& cfg);
std::vector<Case> removal_cases(const Config& cfg);
std::vector<Case> gup_cases(const Config& cfg);    // dax_suites.cc
std::vector<Case> fault_cases(const Config& cfg);  // dax_suites.cc
std::vector<Case> fsdax_cases(const Config& cfg);  // fsdax_suite.cc

}  // namespace pgmap::bench
