// Resident set size of this process (/proc/self/statm), for tests and benchmarks that check what
// a lazily committed mapping really costs. Private to the memory layer's tests and benchmarks.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>

namespace pgmap::testutil {

// Resident bytes of this process, or 0 if /proc/self/statm cannot be read.
inline std::uint64_t resident_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long long size = 0;
  unsigned long long resident = 0;
  const int got = std::fscanf(f, "%llu %llu", &size, &resident);
  std::fclose(f);
  return got == 2 ? resident * static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE)) : 0;
}

}  // namespace pgmap::testutil
