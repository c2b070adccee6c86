// pgmap-stress: race-widening stress of the whole stack (memory, mm, dax) under one liveness
// strategy at a time.
//
// Each run alternates phases. In a phase, `threads` workers do random operations on a set of
// simulated processes (AddressSpace) sharing one device-dax device, and on a raw pagemap held
// through PageRef/Pin: mmap, read/write through the page tables (faulting in), GUP pin/unpin,
// fork, process exit, mprotect, mremap, partial and whole munmap, folio get/put and pins. A
// controller thread meanwhile tears the devices down at a random moment — devdax unbind with the
// wait, refuse or timeout policy, memunmap of the raw pagemap with the same policies — and
// re-creates them over the SAME backing memory (memory reuse), zeroed first. Between phases,
// with every thread stopped, the invariant checker (pgmap::debug) runs over every pagemap,
// address space and held page, and the device bytes are scanned.
//
// Data checks. Worker t only ever writes 64-byte slot t of a page (so workers never race on
// bytes); a slot holds {magic, device generation, page offset, thread, sequence, checksum}. A read
// through a mapping of generation g must find either zeros (never written in g) or a valid
// record of generation g and that page offset, with the sequence the thread last wrote there.
// A record of an older generation is a byte written through a previous owner of the memory that
// appeared in its next owner after the memory was freed and reused.
//
// A yield hook (pgmap/core/yield_point.h), seeded, randomly yields, spins or sleeps at every
// named yield point of the library (compiled in for the debug, asan and tsan presets).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "pgmap/memory/strategy.h"

namespace pgmap::stress {

struct Options {
  double seconds = 10;  // per strategy
  unsigned threads = 3;
  std::uint64_t seed = 0;
  bool quick = false;        // smaller devices, shorter phases
  double phase_seconds = 0;  // 0: automatic
  bool verbose = false;
  bool fs = false;  // --fs: the DAX filesystem workload (run_fs_strategy) instead
};

struct Figures {
  Strategy strategy = Strategy::none;
  std::uint64_t phases = 0;
  std::uint64_t ops = 0;
  double seconds = 0;
  std::map<std::string, std::uint64_t> op_counts;
  std::uint64_t unbinds = 0;    // completed devdax teardowns
  std::uint64_t memunmaps = 0;  // completed raw pagemap teardowns
  std::uint64_t refused = 0;    // teardowns refused (busy) or timed out, as asked
  std::uint64_t recreated = 0;  // devices created over reused memory
  std::uint64_t checker_runs = 0;
  // Violations, by kind (checker checks, data, late accesses, unexpected errors, hangs).
  std::map<std::string, std::uint64_t> violations;
  std::vector<std::string> first_reports;  // the first few, in full
  // Known defects outside the teardown protocol (see stress.cc), reported but not failures.
  std::map<std::string, std::uint64_t> known;
  std::vector<std::string> known_first;

  std::uint64_t total_violations() const {
    std::uint64_t n = 0;
    for (const auto& [k, v] : violations)
      n += v;
    return n;
  }
};

Figures run_strategy(Strategy s, const Options& opts);

// --fs (fs_stress.cc): one DaxFs on an FS_DAX device, `threads` workers each with its own
// address space doing random file operations on shared files — create/open/close, write/read,
// mmap and faults (PTE and PMD), munmap, truncate, punch hole, zero and collapse range,
// fallocate (2 MiB-aligned extents too), reflink, unlink and eviction — while holding pipe
// buffers (page references) and DIO requests (pins, completed synchronously or asynchronously)
// across operations. Every third phase the device is unbound (kill_dax) under the mounted,
// busy filesystem, then everything is torn down (unmount, memunmap) and re-created over the same
// memory. Between phases: the fs invariant checker (debug::check_fs_invariants, holders
// included) and the generic/503 oracle (fs_oracle.h): every word of every page a file, a
// mapping, a pipe or a DIO pin shows is zero, the DIO mark of that file (or of one reflinked into
// it) or, first in the page, a one-word record written through such a file; no held block belongs
// to a file whose lineage does not meet the holder's.
Figures run_fs_strategy(Strategy s, const Options& opts);

// The yield hook: installs it (seeded) and reports how often each named point was reached.
void install_yield_hook(std::uint64_t seed);
std::map<std::string, std::uint64_t> yield_point_hits();

}  // namespace pgmap::stress
