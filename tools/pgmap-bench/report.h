// Output of pgmap-bench: the progress line (stderr), the table (stdout), results.json,
// results.csv, and the gnuplot charts removal.svg, hotpath.svg and gup.svg.
//
// results.json: {"machine": {...}, "config": {...}, "results": [row, ...]} where a row is
// {"suite", "case", "strategy", "threads", "page_size", "bytes", "busy_pages",
//  "ns_per_op" | "seconds" (the median), "min", "max", "reps", extra fields...};
// ../shared/tools/check-targets.py reads these names. results.csv has the same fields, one
// column per extra field seen in any row (empty where a row lacks it).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "bench.h"

namespace pgmap::bench {

// "4 KiB", "1 TiB", "23.4 GiB".
std::string format_bytes(std::uint64_t bytes);
// Page sizes as the table shows them: "4K", "2M".
std::string format_page_size(std::uint64_t bytes);

// One line on stderr, rewritten in place when stderr is a terminal ("[12/57 0:42] label").
class Progress {
 public:
  explicit Progress(std::size_t total);
  void start(std::size_t index, const std::string& label);  // index is 0-based
  // Prints a message on its own line without losing the progress line.
  void message(const std::string& text);
  void finish();

 private:
  std::size_t total_;
  bool tty_;
  std::size_t last_width_ = 0;
  SteadyClock::time_point t0_;
};

void print_table(std::FILE* out, const std::string& machine_line, const std::vector<Row>& rows);

Json results_json(const Json& machine, const Json& config, const std::vector<Row>& rows);

// Write one file each; the Status says why not.
Status write_json(const std::string& path, const Json& doc);
Status write_csv(const std::string& path, const std::vector<Row>& rows);

// Absolute path of gnuplot on $PATH, or empty.
std::string find_gnuplot();
// Run gnuplot to draw one chart each. `written` tells whether the file was drawn: a chart whose
// rows are absent (its suite did not run) is skipped without error.
Status write_removal_plot(const std::string& gnuplot, const std::string& path,
                          const std::vector<Row>& rows, bool& written);
Status write_hotpath_plot(const std::string& gnuplot, const std::string& path,
                          const std::vector<Row>& rows, bool& written);
// gup pin+unpin: ns per 4 KiB page per strategy, bars for 4K/2M folios x thread counts.
Status write_gup_plot(const std::string& gnuplot, const std::string& path,
                      const std::vector<Row>& rows, bool& written);

}  // namespace pgmap::bench
