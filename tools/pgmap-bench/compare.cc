#include "compare.h"

#include <algorithm>
#include <functional>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace pgmap::bench {
namespace {

std::string member_label(const Row& r) {
  std::string s = r.name;
  if (r.strategy != "-") s += " " + r.strategy;
  if (r.threads != 1) s += fmt::format(" threads={}", r.threads);
  return s;
}

Summary ratio_summary(const std::vector<Sample>& a, const std::vector<Sample>& b) {
  std::vector<double> ratios;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (b[i].wall_ns > 0) ratios.push_back(a[i].wall_ns / b[i].wall_ns);
  }
  if (ratios.empty()) return {};
  return summarize(std::move(ratios));
}

}  // namespace

int find_member(const Comparison& c, const std::string& name, const std::string& strategy,
                unsigned threads) {
  for (std::size_t i = 0; i < c.members.size(); ++i) {
    const Row& r = c.members[i].row;
    if (r.name == name && r.strategy == strategy && r.threads == threads) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

std::vector<Row> run_comparison(const Config& cfg, Comparison& c) {
  std::vector<Variant> variants;
  variants.reserve(c.members.size());
  for (Member& m : c.members)
    variants.push_back(m.variant);
  const std::uint64_t seed = cfg.seed ^ std::hash<std::string>{}(c.name);
  const bool sliced = c.slice_seconds > 0;
  const unsigned reps = std::max(1u, cfg.reps);
  InterleavedRun run;
  if (sliced) {
    SliceOptions so;
    so.slice_seconds = std::min(c.slice_seconds, std::max(cfg.min_rep_seconds, 1e-4));
    const double rounds = reps * cfg.min_rep_seconds / so.slice_seconds;
    so.rounds = std::max(reps, static_cast<unsigned>(rounds));
    so.seed = seed;
    run = run_sliced(variants, so);
  } else {
    run = run_interleaved(variants, reps, seed);
  }

  const double other = run.other_cpu_share.empty() ? 0
                                                   : *std::max_element(run.other_cpu_share.begin(),
                                                                       run.other_cpu_share.end());
  double spread = 0;
  if (c.stability_floor >= 0) {
    const std::vector<Sample>& f = run.samples[static_cast<std::size_t>(c.stability_floor)];
    // Per repetition; sliced: per block of consecutive rounds (its median), one block per rep.
    std::vector<double> reps_ns;
    const std::size_t per_block = sliced ? std::max<std::size_t>(1, f.size() / reps) : 1;
    for (std::size_t b = 0; b + per_block <= f.size(); b += per_block) {
      std::vector<double> block;
      for (std::size_t k = b; k < b + per_block; ++k)
        block.push_back(f[k].wall_ns);
      reps_ns.push_back(summarize(std::move(block)).median);
    }
    const double lo = *std::min_element(reps_ns.begin(), reps_ns.end());
    const double hi = *std::max_element(reps_ns.begin(), reps_ns.end());
    spread = lo > 0 ? hi / lo - 1 : 0;
  }
  const bool disturbed = other > kMaxOtherCpuShare || spread > kMaxFloorSpread;

  std::vector<Row> rows;
  for (std::size_t i = 0; i < c.members.size(); ++i) {
    const Member& m = c.members[i];
    const std::vector<Sample>& samples = run.samples[i];
    Row row = m.row;
    std::vector<double> wall;
    std::vector<double> cpu;
    for (const Sample& s : samples) {
      wall.push_back(s.wall_ns);
      cpu.push_back(s.cpu_ns);
    }
    row.metric = Metric::ns_per_op;
    row.summary = summarize(std::move(wall));
    row.extra["cpu_ns_per_op"] = summarize(std::move(cpu)).median;
    row.extra["comparison"] = c.name;
    if (m.baseline >= 0) {
      const auto b = static_cast<std::size_t>(m.baseline);
      const Summary r = ratio_summary(samples, run.samples[b]);
      row.extra["baseline"] = member_label(c.members[b].row);
      row.extra["ratio_to_baseline"] = r.median;
      row.extra["ratio_min"] = r.min;
      row.extra["ratio_max"] = r.max;
    }
    if (m.floor >= 0) {
      const auto f = static_cast<std::size_t>(m.floor);
      row.extra["floor"] = member_label(c.members[f].row);
      row.extra["floor_ratio"] = ratio_summary(samples, run.samples[f]).median;
    }
    row.extra["disturbed"] = disturbed;
    row.extra["other_cpu_share"] = other;
    row.extra["floor_spread"] = spread;
    if (!run.cpu_share_readable) row.extra["other_cpu_share_unknown"] = true;
    if (sliced) {
      // A slice whose threads ran less than 90 % of its wall time was (partly) preempted.
      std::size_t preempted = 0;
      for (const Sample& s : samples) {
        if (s.cpu_ns < 0.9 * s.wall_ns) ++preempted;
      }
      row.extra["interleave"] = "slices";
      row.extra["slice_seconds"] = run.slice_seconds;
      row.extra["slices"] = samples.size();
      row.extra["preempted_slices"] =
          samples.empty() ? 0.0
                          : static_cast<double>(preempted) / static_cast<double>(samples.size());
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace pgmap::bench
