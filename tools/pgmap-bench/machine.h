// The machine a run was measured on, for results.json: the figures of DESIGN.md §5 are ratios
// within one run, and this says what that run was. No hostname, no user names.
#pragma once

#include <string>

#include "bench.h"

namespace pgmap::bench {

// {"cpu_model", "nproc", "usable_cpus", "mem_total_bytes", "kernel", "compiler", "thp",
//  "heavy_barrier", "page_size", "loadavg_at_start"}. Fields that cannot be read are "unknown" (or
//  0).
Json describe_machine();

// One line for the top of the table, e.g. "AMD EPYC, 2 CPUs, 23.4 GiB, Linux 6.1, ...".
std::string machine_summary(const Json& machine);

}  // namespace pgmap::bench
