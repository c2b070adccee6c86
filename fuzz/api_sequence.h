// The API-sequence harness behind the libFuzzer target (api_fuzzer.cc) and its replay test.
//
// run_api_sequence() decodes bytes into a sequence of pgmap calls on a small private world (up to
// four 2 MiB anonymous devices, one pagemap per safe strategy with a device-dax on top, an
// address space and its fork, GUP page sets, RAII folio references and pins, allocations, a
// standalone PercpuRef and a DAX filesystem on a 4 MiB FS_DAX device) and checks its oracles:
//
//   (a) consistency, after every op that issued a call: every folio's refcount equals what the
//       handles the harness holds and the page-table entries that map it account for (refcount =
//       refs + pins + mapcount), mapcount equals the entries found, every entry maps a pfn of a
//       pagemap that is not dead, and the PercpuRef's exact count (atomic mode) equals the model's;
//   (b) an error changed nothing: a digest of everything the public queries show (folio refcounts,
//       mapcounts, pincounts, orders, pagemap states, the VMA list, the page-table entries, the
//       PercpuRef, the filesystem's inodes, block maps, entries and share counts) is taken before
//       each call that can return an error and compared after it when it did (the digest an
//       erroring call left serves as the next call's "before" while nothing changed in between);
//   (c) no call blocks past its bound: a watchdog thread aborts with the name of the call if one
//       call runs longer than kWatchdogSeconds (every wait the harness asks for is bounded);
//   (d) the fs invariant checker (debug/fs_invariants.h) over the filesystem: before and after
//       every call that can break an fs invariant by itself (removal under the mounted fs,
//       unmount, memory failure, unlink, the close or end of a mapping that may evict, truncate,
//       fallocate, reflink), at most kFsCheckEvery calls apart otherwise, and at the end of the
//       input. Its state only changes through calls, so what a call breaks stays visible until a
//       destructive call, which is checked before it runs.
//
// Misuse reports are counted (a handler is installed), not fatal. The whole world is torn down at
// the end of each input with bounded waits; a teardown that still finds holders after every handle
// was released is reported as a leak.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pgmap::fuzz {

inline constexpr int kWatchdogSeconds = 20;

struct SequenceResult {
  std::string failure;       // empty: every oracle held
  std::uint64_t calls = 0;   // API calls issued
  std::uint64_t errors = 0;  // calls that returned an error (each checked by oracle (b))
};

// Runs one input. Thread-compatible: one call at a time per process (the watchdog is global).
SequenceResult run_api_sequence(const std::uint8_t* data, std::size_t size);

// Human-readable trace of the calls an input decodes to (for minimized crash reports).
void set_trace(bool on);

}  // namespace pgmap::fuzz
