#include "report.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "pgmap/memory/pfn.h"

namespace pgmap::bench {
namespace {

constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};

std::string format_ns(double ns) {
  if (ns < 10) return fmt::format("{:.2f} ns", ns);
  if (ns < 1000) return fmt::format("{:.1f} ns", ns);
  return fmt::format("{:.2f} us", ns / 1000);
}

std::string format_seconds(double s) {
  if (s < 1e-3) return fmt::format("{:.1f} us", s * 1e6);
  if (s < 1) return fmt::format("{:.2f} ms", s * 1e3);
  return fmt::format("{:.3f} s", s);
}

std::string format_value(const Row& r, double v) {
  return r.metric == Metric::ns_per_op ? format_ns(v) : format_seconds(v);
}

const char* metric_key(Metric m) {
  return m == Metric::ns_per_op ? "ns_per_op" : "seconds";
}

Json row_json(const Row& r) {
  Json j = Json::object();
  j["suite"] = r.suite;
  j["case"] = r.name;
  j["strategy"] = r.strategy;
  j["threads"] = r.threads;
  j["page_size"] = r.page_size;
  j["bytes"] = r.bytes;
  j["busy_pages"] = r.busy_pages;
  j[metric_key(r.metric)] = r.summary.median;
  j["min"] = r.summary.min;
  j["max"] = r.summary.max;
  j["reps"] = r.summary.reps;
  for (const auto& [key, value] : r.extra.items())
    j[key] = value;
  return j;
}

std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + '"';
}

std::string csv_value(const Json& v) {
  return v.is_string() ? csv_field(v.get<std::string>()) : v.dump();
}

// For a single-quoted gnuplot string.
std::string gnuplot_quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += '\'';
    out += c;
  }
  return out + '\'';
}

// For a single-quoted /bin/sh word.
std::string shell_quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + '\'';
}

Status run_gnuplot(const std::string& gnuplot, const std::string& script) {
  const std::string cmd = shell_quote(gnuplot);
  std::FILE* pipe = popen(cmd.c_str(), "w");
  if (pipe == nullptr) {
    return Error(Errc::system_error, fmt::format("cannot start {}", gnuplot), errno);
  }
  const bool wrote = std::fwrite(script.data(), 1, script.size(), pipe) == script.size();
  const int status = pclose(pipe);
  if (!wrote || status != 0) {
    return Error(Errc::system_error, fmt::format("{} failed (exit status {})", gnuplot, status));
  }
  return {};
}

constexpr const char* kSvgTerminal =
    "set terminal svg size 1200,640 dynamic noenhanced font 'sans,11' background rgb 'white'\n";

int strategy_color(std::string_view strategy) {
  for (std::size_t i = 0; i < kAllStrategies.size(); ++i) {
    if (strategy_name(kAllStrategies[i]) == strategy) return static_cast<int>(i) + 1;
  }
  return static_cast<int>(kAllStrategies.size()) + 1;
}

}  // namespace

std::string format_bytes(std::uint64_t bytes) {
  unsigned unit = 0;
  while (unit + 1 < std::size(kUnits) && bytes >= (std::uint64_t{1} << (10 * (unit + 1)))) {
    ++unit;
  }
  const std::uint64_t scale = std::uint64_t{1} << (10 * unit);
  if (bytes % scale == 0) return fmt::format("{} {}", bytes / scale, kUnits[unit]);
  return fmt::format("{:.1f} {}", static_cast<double>(bytes) / static_cast<double>(scale),
                     kUnits[unit]);
}

std::string format_page_size(std::uint64_t bytes) {
  if (bytes >= (std::uint64_t{1} << 30) && bytes % (std::uint64_t{1} << 30) == 0) {
    return fmt::format("{}G", bytes >> 30);
  }
  if (bytes >= (std::uint64_t{1} << 20) && bytes % (std::uint64_t{1} << 20) == 0) {
    return fmt::format("{}M", bytes >> 20);
  }
  return fmt::format("{}K", bytes >> 10);
}

// ---- progress ---------------------------------------------------------------------------------

Progress::Progress(std::size_t total)
    : total_(total), tty_(isatty(fileno(stderr)) != 0), t0_(SteadyClock::now()) {}

void Progress::start(std::size_t index, const std::string& label) {
  const auto elapsed = static_cast<long>(seconds_since(t0_));
  std::string text =
      fmt::format("[{}/{} {}:{:02}] {}", index + 1, total_, elapsed / 60, elapsed % 60, label);
  if (!tty_) {
    fmt::print(stderr, "{}\n", text);
    return;
  }
  const std::size_t width = text.size();
  if (width < last_width_) text.append(last_width_ - width, ' ');
  fmt::print(stderr, "\r{}", text);
  std::fflush(stderr);
  last_width_ = width;
}

void Progress::message(const std::string& text) {
  if (tty_ && last_width_ > 0) {
    fmt::print(stderr, "\r{}\r", std::string(last_width_, ' '));
    last_width_ = 0;
  }
  fmt::print(stderr, "{}\n", text);
}

void Progress::finish() {
  if (tty_ && last_width_ > 0) fmt::print(stderr, "\r{}\r", std::string(last_width_, ' '));
  last_width_ = 0;
  fmt::print(stderr, "ran {} cases in {:.1f} s\n", total_, seconds_since(t0_));
}

// ---- table ------------------------------------------------------------------------------------

void print_table(std::FILE* out, const std::string& machine_line, const std::vector<Row>& rows) {
  const std::vector<std::string> header = {"suite", "case",   "strategy", "threads", "page",
                                           "bytes", "busy",   "median",   "min",     "max",
                                           "cpu",   "x base", "x floor",  "reps",    "notes"};
  // Numeric columns are right-aligned.
  const std::vector<bool> right = {false, false, false, true, true, true, true, true,
                                   true,  true,  true,  true, true, true, false};
  auto ratio_cell = [](const Row& r, const char* key) -> std::string {
    if (!r.extra.contains(key)) return "-";
    return fmt::format("{:.2f}x", r.extra[key].get<double>());
  };
  std::vector<std::vector<std::string>> cells;
  bool any_disturbed = false;
  for (const Row& r : rows) {
    std::string note = r.note;
    if (r.extra.value("disturbed", false)) {
      any_disturbed = true;
      note = fmt::format("DISTURBED (other CPU {:.0f} %, floor spread {:.0f} %)",
                         r.extra.value("other_cpu_share", 0.0) * 100,
                         r.extra.value("floor_spread", 0.0) * 100) +
             (note.empty() ? "" : "; " + note);
    }
    cells.push_back({r.suite, r.name, r.strategy, std::to_string(r.threads),
                     r.page_size == 0 ? "-" : format_page_size(r.page_size),
                     r.bytes == 0 ? "-" : format_bytes(r.bytes),
                     r.suite == "removal" ? std::to_string(r.busy_pages) : "-",
                     format_value(r, r.summary.median), format_value(r, r.summary.min),
                     format_value(r, r.summary.max),
                     r.extra.contains("cpu_ns_per_op")
                         ? format_ns(r.extra["cpu_ns_per_op"].get<double>())
                         : "-",
                     ratio_cell(r, "ratio_to_baseline"), ratio_cell(r, "floor_ratio"),
                     std::to_string(r.summary.reps), note});
  }
  std::vector<std::size_t> width(header.size());
  for (std::size_t c = 0; c < header.size(); ++c) {
    width[c] = header[c].size();
    for (const auto& line : cells)
      width[c] = std::max(width[c], line[c].size());
  }
  auto print_line = [&](const std::vector<std::string>& line) {
    std::string text;
    for (std::size_t c = 0; c < line.size(); ++c) {
      if (c > 0) text += "  ";
      text += right[c] ? fmt::format("{:>{}}", line[c], width[c])
                       : fmt::format("{:<{}}", line[c], width[c]);
    }
    while (!text.empty() && text.back() == ' ')
      text.pop_back();
    fmt::print(out, "{}\n", text);
  };
  fmt::print(out, "{}\n\n", machine_line);
  print_line(header);
  std::string previous_suite;
  for (std::size_t i = 0; i < cells.size(); ++i) {
    if (i > 0 && rows[i].suite != previous_suite) fmt::print(out, "\n");
    previous_suite = rows[i].suite;
    print_line(cells[i]);
  }
  fmt::print(out,
             "\nns figures are per operation per thread (gup: per 4 KiB page of a pin+unpin call;"
             " fault: per fault; fsdax: per fault+zap, per truncate, per entry insert+delete);"
             " median/min/max over the reps; cpu: thread CPU time per op.\n"
             "x base / x floor: median over the rounds of the per-round ratio to the row's "
             "baseline (none; 1 thread) and floor, measured interleaved in the same run.\n");
  if (any_disturbed) {
    fmt::print(out,
               "DISTURBED: other processes took more than {:.0f} % of the CPUs in some round, or "
               "the floor moved by more than {:.0f} % between rounds: treat those ratios with "
               "care.\n",
               100 * 0.05, 100 * 0.15);
  }
}

// ---- files ------------------------------------------------------------------------------------

Json results_json(const Json& machine, const Json& config, const std::vector<Row>& rows) {
  Json doc = Json::object();
  doc["machine"] = machine;
  doc["config"] = config;
  doc["results"] = Json::array();
  bool disturbed = false;
  for (const Row& r : rows) {
    doc["results"].push_back(row_json(r));
    disturbed = disturbed || r.extra.value("disturbed", false);
  }
  // True when any comparison of the run was disturbed (compare.h).
  doc["disturbed"] = disturbed;
  return doc;
}

Status write_json(const std::string& path, const Json& doc) {
  std::ofstream f(path);
  f << doc.dump(2) << '\n';
  f.close();
  if (!f) return Error(Errc::system_error, fmt::format("cannot write {}", path), errno);
  return {};
}

Status write_csv(const std::string& path, const std::vector<Row>& rows) {
  std::vector<std::string> columns = {"suite",     "case",  "strategy",   "threads",
                                      "page_size", "bytes", "busy_pages", "ns_per_op",
                                      "seconds",   "min",   "max",        "reps"};
  std::vector<Json> objects;
  for (const Row& r : rows) {
    objects.push_back(row_json(r));
    for (const auto& item : r.extra.items()) {
      if (std::find(columns.begin(), columns.end(), item.key()) == columns.end()) {
        columns.push_back(item.key());
      }
    }
  }
  std::ofstream f(path);
  for (std::size_t c = 0; c < columns.size(); ++c)
    f << (c > 0 ? "," : "") << columns[c];
  f << '\n';
  for (const Json& o : objects) {
    for (std::size_t c = 0; c < columns.size(); ++c) {
      if (c > 0) f << ',';
      if (o.contains(columns[c])) f << csv_value(o[columns[c]]);
    }
    f << '\n';
  }
  f.close();
  if (!f) return Error(Errc::system_error, fmt::format("cannot write {}", path), errno);
  return {};
}

// ---- charts -----------------------------------------------------------------------------------

std::string find_gnuplot() {
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!dirs.empty()) {
    const auto colon = dirs.find(':');
    const std::string_view dir = dirs.substr(0, colon);
    dirs = colon == std::string_view::npos ? std::string_view() : dirs.substr(colon + 1);
    const std::string candidate =
        fmt::format("{}/gnuplot", dir.empty() ? std::string_view(".") : dir);
    struct stat st {};
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return {};
}

// memunmap seconds against device size, log-log: one panel per busy count, one line per
// strategy x page size (and per scan thread count for sweep).
Status write_removal_plot(const std::string& gnuplot, const std::string& path,
                          const std::vector<Row>& rows, bool& written) {
  written = false;
  struct Series {
    std::string title;
    int color = 0;
    int dash = 1;
    int point = 7;
    std::vector<std::pair<std::uint64_t, double>> points;
  };
  std::map<std::uint64_t, std::vector<Series>> panels;  // by busy_pages
  std::vector<std::uint64_t> sizes;
  for (const Row& r : rows) {
    if (r.suite != "removal" || r.name != "memunmap") continue;
    const unsigned scan = r.extra.value("scan_threads", 1u);
    std::string title = fmt::format("{} {}", r.strategy, format_page_size(r.page_size));
    if (scan > 1) title += fmt::format(" ({} scan threads)", scan);
    std::vector<Series>& panel = panels[r.busy_pages];
    auto it =
        std::find_if(panel.begin(), panel.end(), [&](const Series& s) { return s.title == title; });
    if (it == panel.end()) {
      Series s;
      s.title = title;
      s.color = strategy_color(r.strategy);
      const bool huge = r.page_size > kPageSize;
      s.dash = scan > 1 ? (huge ? 4 : 3) : (huge ? 2 : 1);
      s.point = huge ? 5 : 7;
      panel.push_back(std::move(s));
      it = panel.end() - 1;
    }
    it->points.emplace_back(r.bytes, r.summary.median);
    if (std::find(sizes.begin(), sizes.end(), r.bytes) == sizes.end()) sizes.push_back(r.bytes);
  }
  if (panels.empty()) return {};
  std::sort(sizes.begin(), sizes.end());

  std::string script = kSvgTerminal;
  script += fmt::format("set output {}\n", gnuplot_quote(path));
  std::size_t block = 0;
  for (auto& [busy, panel] : panels) {
    for (Series& s : panel) {
      std::sort(s.points.begin(), s.points.end());
      script += fmt::format("$s{} << EOD\n", block++);
      for (const auto& [bytes, seconds] : s.points)
        script += fmt::format("{} {}\n", bytes, seconds);
      script += "EOD\n";
    }
  }
  script += fmt::format("set multiplot layout 1,{} title 'memunmap time vs device size'\n",
                        panels.size());
  script += "set logscale xy\nset format y '%g'\nset grid\n";
  script += "set key outside below center horizontal width -2 font ',9'\n";
  script += "set ylabel 'memunmap seconds (median)'\n";
  std::string tics;
  for (std::uint64_t s : sizes) {
    tics += fmt::format("{}{} {}", tics.empty() ? "" : ", ", gnuplot_quote(format_bytes(s)), s);
  }
  script += fmt::format("set xtics ({})\n", tics);
  script += fmt::format("set xrange [{}:{}]\n", static_cast<double>(sizes.front()) / 1.5,
                        static_cast<double>(sizes.back()) * 1.5);
  block = 0;
  for (const auto& [busy, panel] : panels) {
    script += fmt::format("set title {}\n",
                          gnuplot_quote(busy == 0 ? std::string("idle device")
                                                  : fmt::format("{} busy folios, released after "
                                                                "5 ms",
                                                                busy)));
    std::string plot = "plot ";
    for (std::size_t i = 0; i < panel.size(); ++i) {
      const Series& s = panel[i];
      plot += fmt::format("{}$s{} using 1:2 with linespoints lw 1.5 lc {} dt {} pt {} title {}",
                          i > 0 ? ", \\\n     " : "", block++, s.color, s.dash, s.point,
                          gnuplot_quote(s.title));
    }
    script += plot + "\n";
  }
  script += "unset multiplot\n";
  Status st = run_gnuplot(gnuplot, script);
  written = st.ok();
  return st;
}

namespace {

// ns/op per strategy of one suite's rows, clustered bars: one bar per series_name(row).
Status write_bars_plot(const std::string& gnuplot, const std::string& path,
                       const std::vector<Row>& rows, std::string_view suite,
                       std::string (*series_name)(const Row&), std::string_view title,
                       std::string_view ylabel, bool& written, std::string_view only_case = {}) {
  written = false;
  std::vector<std::string> series;
  std::vector<std::string> strategies;
  std::map<std::pair<std::string, std::string>, double> value;  // (strategy, series) -> ns/op
  for (const Row& r : rows) {
    if (r.suite != suite || (!only_case.empty() && r.name != only_case)) continue;
    std::string name = series_name(r);
    if (std::find(series.begin(), series.end(), name) == series.end()) series.push_back(name);
    if (std::find(strategies.begin(), strategies.end(), r.strategy) == strategies.end()) {
      strategies.push_back(r.strategy);
    }
    value[{r.strategy, name}] = r.summary.median;
  }
  if (series.empty()) return {};

  std::string script = kSvgTerminal;
  script += fmt::format("set output {}\n", gnuplot_quote(path));
  script += "$hot << EOD\nstrategy";
  for (const std::string& s : series)
    script += fmt::format(" \"{}\"", s);
  script += "\n";
  for (const std::string& st : strategies) {
    script += st;
    for (const std::string& s : series) {
      auto it = value.find({st, s});
      script += it == value.end() ? std::string(" -") : fmt::format(" {}", it->second);
    }
    script += "\n";
  }
  script += "EOD\n";
  script += fmt::format(
      "set datafile missing '-'\n"
      "set title {}\n"
      "set style data histograms\nset style histogram clustered gap 1\n"
      "set style fill solid 0.85 border -1\nset boxwidth 0.9\n"
      "set grid ytics\nset yrange [0:*]\nset key outside right top\n"
      "set ylabel {}\nset xlabel 'strategy'\n",
      gnuplot_quote(title), gnuplot_quote(ylabel));
  script += fmt::format("plot for [i=2:{}] $hot using i:xtic(1) title columnheader(i)\n",
                        series.size() + 1);
  Status st = run_gnuplot(gnuplot, script);
  written = st.ok();
  return st;
}

}  // namespace

Status write_hotpath_plot(const std::string& gnuplot, const std::string& path,
                          const std::vector<Row>& rows, bool& written) {
  return write_bars_plot(
      gnuplot, path, rows, "hotpath",
      [](const Row& r) {
        return fmt::format("{} {} {}T", r.name, format_page_size(r.page_size), r.threads);
      },
      "folio hot paths per strategy (generic pagemap; per-thread ns per get+put or pin+unpin, "
      "median)",
      "ns per op per thread", written);
}

Status write_gup_plot(const std::string& gnuplot, const std::string& path,
                      const std::vector<Row>& rows, bool& written) {
  return write_bars_plot(
      gnuplot, path, rows, "gup",
      [](const Row& r) {
        return fmt::format("{} folios {}T", format_page_size(r.page_size), r.threads);
      },
      "devdax pin_user_pages + unpin_user_pages of 512 pages (per-thread ns per 4 KiB page, "
      "median; target <= 20 ns)",
      "ns per 4 KiB page per thread", written, "pin_unpin");
}

}  // namespace pgmap::bench
