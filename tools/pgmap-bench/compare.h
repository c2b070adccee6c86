// Comparisons: the cases whose ratios the DESIGN.md §5 targets are stated in, measured together.
//
// A Comparison is a list of Members, each one output Row and the Variant that measures it. They
// run interleaved (timing.h run_interleaved: every round one repetition of each, shuffled), and
// for every member that names a `baseline` (the case a target compares it with: `none` for a
// strategy, the same case on one thread for a two-thread row) or a `floor` (the machine's minimum
// for that work: two relaxed increments, a locked add/sub pair, the batched GUP kernel) the ratio
// is taken PER ROUND and its median reported: both sides of each ratio share one time window.
//
// A comparison is `disturbed` when, in some round, other processes (or the hypervisor) took more
// than kMaxOtherCpuShare of the machine's CPU time, or when its stability floor moved by more than
// kMaxFloorSpread between rounds (max/min - 1). Its figures are still reported, marked.
//
// Fields each row gains in results.json (docs/results-format.md): cpu_ns_per_op, comparison,
// baseline + ratio_to_baseline (+ ratio_min/ratio_max), floor + floor_ratio, disturbed,
// other_cpu_share (the worst round), floor_spread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench.h"
#include "timing.h"

namespace pgmap::bench {

inline constexpr double kMaxOtherCpuShare = 0.05;
inline constexpr double kMaxFloorSpread = 0.15;

struct Member {
  Row row;  // everything but summary and the comparison fields, which run_comparison fills
  Variant variant;
  int baseline = -1;  // index of the member this one's ratio_to_baseline is taken against
  int floor = -1;     // index of the member this one's floor_ratio is taken against
};

struct Comparison {
  std::string name;  // e.g. "hotpath page_cycle @4K"
  std::vector<Member> members;
  int stability_floor = -1;  // the member whose spread decides "the floor moved"
  // > 0: measured in slices of this length (timing.h run_sliced) instead of one repetition per
  // round: cfg.reps * cfg.min_rep_seconds / slice_seconds rounds (the same time per case), and
  // the floor's spread taken over cfg.reps blocks of consecutive rounds (block medians). Rows
  // gain `interleave` ("slices"), `slice_seconds`, `slices` and `preempted_slices`.
  double slice_seconds = 0;
};

// The slice length of every sliced comparison (ref, gup, hotpath, fsdax fault_unmap and
// entry_cycle): well under the time scale of this machine's speed modes (tens to hundreds of ms;
// docs/results-format.md, "Sliced comparisons"), so every case sees the same mix of them.
inline constexpr double kSliceSeconds = 0.001;

// Runs the comparison for cfg.reps rounds; returns one Row per member, in member order.
std::vector<Row> run_comparison(const Config& cfg, Comparison& c);

// Index of the member whose row has this case name, strategy and thread count, or -1.
int find_member(const Comparison& c, const std::string& name, const std::string& strategy,
                unsigned threads);

}  // namespace pgmap::bench
