// Microbenchmarks of the page metadata's lifecycle: what memremap and memunmap of a large device
// cost now that a free page's metadata is all-zero (create writes nothing) and teardown discards
// it in place (one mmap over each array). pgmap-bench's `removal` suite reports the same memremap
// figures end to end (case `memremap`); these are the focused versions (make bench).
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "memory/testing/resident_bytes.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {
namespace {

constexpr std::uint64_t kTiB = std::uint64_t{1} << 40;

using testutil::resident_bytes;

std::string page_label(unsigned order) {
  return order == 0 ? "1 TiB @4K" : "1 TiB @2M";
}

// PageArray::create + retire(discard) + destroy for 1 TiB at base order range(0).
void BM_PageArrayLifecycle(benchmark::State& state) {
  const auto order = static_cast<unsigned>(state.range(0));
  const PfnRange range{Pfn{1} << 28, kTiB >> kPageShift};
  const std::uint64_t rss0 = resident_bytes();
  std::uint64_t peak = 0;
  for (auto _ : state) {
    auto a = PageArray::create(range, order);
    if (!a) return state.SkipWithError("PageArray::create failed");
    const std::uint64_t rss = resident_bytes();
    peak = rss > rss0 && rss - rss0 > peak ? rss - rss0 : peak;
    (*a)->retire(PageArray::RetireMode::discard);
    benchmark::DoNotOptimize(a);
  }
  state.counters["rss_growth_bytes"] = static_cast<double>(peak);
  state.SetLabel(page_label(order));
}
BENCHMARK(BM_PageArrayLifecycle)->Arg(0)->Arg(kPmdOrder)->Unit(benchmark::kMicrosecond);

// memremap + memunmap of an idle 1 TiB device (anonymous backing, free until touched), strategy
// range(1): transition tears down without a scan; sweep reads the whole hot array (1 GiB at 4K).
void BM_MemremapMemunmap(benchmark::State& state) {
  const auto order = static_cast<unsigned>(state.range(0));
  const auto strategy = static_cast<Strategy>(state.range(1));
  BackingOptions bo;
  bo.size = kTiB;
  auto backing = make_anonymous_backing(bo);
  if (!backing) return state.SkipWithError("make_anonymous_backing failed");
  std::shared_ptr<Backing> shared = std::move(backing).value();
  const std::uint64_t rss0 = resident_bytes();
  std::uint64_t peak = 0;
  for (auto _ : state) {
    MemremapParams params;
    params.type = PagemapType::generic;
    params.strategy = strategy;
    params.base_order = order;
    params.ranges.push_back({shared, 0, 0});
    auto pgmap = memremap(std::move(params));
    if (!pgmap) return state.SkipWithError("memremap failed");
    const std::uint64_t rss = resident_bytes();
    peak = rss > rss0 && rss - rss0 > peak ? rss - rss0 : peak;
    auto stats = (*pgmap)->memunmap();
    if (!stats) return state.SkipWithError("memunmap failed");
  }
  state.counters["rss_growth_bytes"] = static_cast<double>(peak);
  state.SetLabel(page_label(order) + " " + std::string(strategy_name(strategy)));
}
BENCHMARK(BM_MemremapMemunmap)
    ->Args({0, static_cast<int>(Strategy::transition)})
    ->Args({kPmdOrder, static_cast<int>(Strategy::transition)})
    ->Args({0, static_cast<int>(Strategy::sweep)})
    ->Args({kPmdOrder, static_cast<int>(Strategy::sweep)})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace pgmap
