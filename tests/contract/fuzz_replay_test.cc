// Replays every committed fuzzer input (fuzz/corpus/ and fuzz/regressions/) through the harness
// in ordinary builds (release, asan, tsan), so each crash the fuzzer found stays fixed.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "api_sequence.h"

namespace {

std::vector<std::filesystem::path> inputs() {
  std::vector<std::filesystem::path> out;
  for (const char* dir : {"corpus", "regressions"}) {
    const std::filesystem::path d = std::filesystem::path(PGMAP_FUZZ_DIR) / dir;
    if (!std::filesystem::is_directory(d)) continue;
    for (const auto& e : std::filesystem::directory_iterator(d)) {
      if (e.is_regular_file()) out.push_back(e.path());
    }
  }
  return out;
}

TEST(FuzzReplay, EveryCommittedInputKeepsEveryOracle) {
  // PGMAP_FUZZ_TRACE=1 prints every call, as for the fuzzer itself; PGMAP_FUZZ_ONLY=name replays
  // only the inputs whose file name contains `name`.
  const char* t = std::getenv("PGMAP_FUZZ_TRACE");
  pgmap::fuzz::set_trace(t != nullptr && t[0] == '1');
  const char* only = std::getenv("PGMAP_FUZZ_ONLY");
  auto files = inputs();
  if (only != nullptr) {
    std::erase_if(files, [&](const std::filesystem::path& p) {
      return p.filename().string().find(only) == std::string::npos;
    });
  }
  ASSERT_GE(files.size(), only != nullptr ? 1u : 6u)
      << "seed corpus missing under " << PGMAP_FUZZ_DIR;
  std::uint64_t calls = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                          std::istreambuf_iterator<char>());
    const auto r = pgmap::fuzz::run_api_sequence(bytes.data(), bytes.size());
    EXPECT_EQ(r.failure, "") << f;
    calls += r.calls;
  }
  EXPECT_GT(calls, 0u);
}

}  // namespace
