// libFuzzer entry point: one input is one API-call sequence (api_sequence.h). A violated oracle
// prints the reason and aborts, so libFuzzer saves the input as a crash. PGMAP_FUZZ_TRACE=1
// prints every call (for replaying a crash: pgmap_api_fuzzer crash-...).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "api_sequence.h"

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  const char* t = std::getenv("PGMAP_FUZZ_TRACE");
  pgmap::fuzz::set_trace(t != nullptr && t[0] == '1');
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const pgmap::fuzz::SequenceResult r = pgmap::fuzz::run_api_sequence(data, size);
  if (!r.failure.empty()) {
    std::fprintf(stderr, "pgmap-fuzz oracle failed: %s\n", r.failure.c_str());
    std::abort();
  }
  return 0;
}
