// The API-sequence harness behind the libFuzzer target (api_fuzzer.cc) and its replay test.
//
// run_api_sequence() decodes bytes into a sequence of pgmap calls on a small private world (up to
// four 2 MiB anonymous devices, one pagemap per safe strategy with a device-dax on top, an
// address space and its fork, GUP page sets, RAII folio references and pins, allocations and a
// standalone PercpuRef) and checks three oracles after every call:
//
//   (a) consistency: every folio's refcount equals what the handles the harness holds and the
//       page-table entries that map it account for (refcount = refs + pins + mapcount), mapcount
//       equals the entries found, every entry maps a pfn of a pagemap that is not dead, and the
//       PercpuRef's exact count (atomic mode) equals the model's;
//   (b) an error changed nothing: a digest of everything the public queries show (folio refcounts,
//       mapcounts, pincounts, orders, pagemap states, the VMA list, the page-table entries, the
//       PercpuRef) is taken before each call and compared after it when the call returned an error;
//   (c) no call blocks past its bound: a watchdog thread aborts with the name of the call if one
//       call runs longer than kWatchdogSeconds (every wait the harness asks for is bounded).
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
