#include "machine.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "core/heavy_barrier.h"
#include "pgmap/core/percpu_ref.h"
#include "report.h"
#include "timing.h"

namespace pgmap::bench {
namespace {

constexpr std::string_view kUnknown = "unknown";

std::string trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\n");
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(" \t\n");
  return std::string(s.substr(first, last - first + 1));
}

// The value after "key:" on the first line of `path` that starts with `key`.
std::string field_of(const char* path, std::string_view key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) != 0) continue;
    const auto colon = line.find(':');
    if (colon != std::string::npos) return trim(std::string_view(line).substr(colon + 1));
  }
  return std::string(kUnknown);
}

std::uint64_t mem_total_bytes() {
  const std::string kb = field_of("/proc/meminfo", "MemTotal");  // "24560012 kB"
  try {
    return std::stoull(kb) * 1024;
  } catch (const std::exception&) {
    return 0;
  }
}

// The bracketed choice of /sys/kernel/mm/transparent_hugepage/enabled, e.g. "madvise".
std::string thp_mode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(in, line)) return std::string(kUnknown);
  const auto open = line.find('[');
  const auto close = line.find(']', open);
  if (open == std::string::npos || close == std::string::npos) return trim(line);
  return line.substr(open + 1, close - open - 1);
}

// The 1-minute load average when the run started: figures taken on a busy machine are noisy.
double load_average() {
  std::ifstream in("/proc/loadavg");
  double load = -1;
  in >> load;
  return in ? load : -1;
}

std::string kernel_release() {
  utsname u{};
  if (uname(&u) != 0) return std::string(kUnknown);
  return u.release;
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return __VERSION__;
#endif
}

// Which PercpuRef implementation is active: PercpuRef::implementation() ("rseq" or "per-thread")
// when the library has it; before it existed the only implementation was per-thread slots.
template <typename Ref = PercpuRef>
std::string percpu_ref_implementation() {
  if constexpr (requires { Ref::implementation(); }) {
    return std::string(Ref::implementation());
  } else {
    return "per-thread";
  }
}

}  // namespace

Json describe_machine() {
  Json m = Json::object();
  m["cpu_model"] = field_of("/proc/cpuinfo", "model name");
  m["nproc"] = sysconf(_SC_NPROCESSORS_ONLN);
  m["usable_cpus"] = usable_cpus().size();
  m["mem_total_bytes"] = mem_total_bytes();
  m["kernel"] = kernel_release();
  m["compiler"] = compiler();
  m["thp"] = thp_mode();
  m["heavy_barrier"] = pgmap::detail::heavy_barrier_name();
  m["percpu_ref"] = percpu_ref_implementation();
  m["page_size"] = sysconf(_SC_PAGESIZE);
  m["loadavg_at_start"] = load_average();
  return m;
}

std::string machine_summary(const Json& m) {
  return fmt::format(
      "machine: {}, {} CPUs ({} usable), {} RAM, Linux {}, {}, THP {}, {}, PercpuRef {}, load "
      "{:.2f} at start",
      m["cpu_model"].get<std::string>(), m["nproc"].get<long>(),
      m["usable_cpus"].get<std::size_t>(), format_bytes(m["mem_total_bytes"].get<std::uint64_t>()),
      m["kernel"].get<std::string>(), m["compiler"].get<std::string>(), m["thp"].get<std::string>(),
      m["heavy_barrier"].get<std::string>(), m["percpu_ref"].get<std::string>(),
      m["loadavg_at_start"].get<double>());
}

}  // namespace pgmap::bench
