// Microbenchmarks of the memory layer for developers: the folio hot paths per strategy, the pfn
// lookup, and the removal scan. pgmap-bench runs the same experiments end to end and writes the
// project's results; these are the quick, focused versions (make bench).
#include <benchmark/benchmark.h>

#include <memory>

#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"

namespace pgmap {
namespace {

std::shared_ptr<DevPagemap> make_pagemap(Strategy s, std::uint64_t bytes, unsigned base_order) {
  BackingOptions bo;
  bo.size = bytes;
  auto backing = make_anonymous_backing(bo);
  if (!backing) return nullptr;
  MemremapParams params;
  params.type = PagemapType::generic;
  params.strategy = s;
  params.base_order = base_order;
  params.ranges.push_back({std::move(backing).value(), 0, 0});
  auto pgmap = memremap(params);
  return pgmap ? std::move(pgmap).value() : nullptr;
}

// One 0 -> 1 -> 0 cycle of an idle 4 KiB folio per iteration.
void BM_PageCycle(benchmark::State& state) {
  auto s = static_cast<Strategy>(state.range(0));
  auto pgmap = make_pagemap(s, 8 << 20, 0);
  if (!pgmap) return state.SkipWithError("memremap failed");
  DevPagemap::Allocation alloc;
  if (s == Strategy::alloc_event)
    alloc = std::move(pgmap->request(pgmap->range(0).start, 1)).value();
  Pfn pfn = pgmap->range(0).start;
  for (auto _ : state) {
    benchmark::DoNotOptimize(pgmap->get_folio(pfn));
    benchmark::DoNotOptimize(pgmap->put_folio(pfn));
  }
  state.SetLabel(std::string(strategy_name(s)));
}
BENCHMARK(BM_PageCycle)->DenseRange(0, 4);

// FOLL_PIN + unpin of one folio: 4 KiB (bias) or 2 MiB (exact pincount; one atomic per folio).
void BM_PinCycle(benchmark::State& state) {
  auto s = static_cast<Strategy>(state.range(0));
  unsigned order = static_cast<unsigned>(state.range(1));
  auto pgmap = make_pagemap(s, 8 << 20, order);
  if (!pgmap) return state.SkipWithError("memremap failed");
  DevPagemap::Allocation alloc;
  if (s == Strategy::alloc_event)
    alloc = std::move(pgmap->request(pgmap->range(0).start, 1)).value();
  Pfn pfn = pgmap->range(0).start;
  for (auto _ : state) {
    benchmark::DoNotOptimize(pgmap->pin_folio(pfn));
    benchmark::DoNotOptimize(pgmap->unpin_folio(pfn));
  }
  state.SetLabel(std::string(strategy_name(s)) + (order == 0 ? " 4K" : " 2M"));
}
BENCHMARK(BM_PinCycle)->ArgsProduct({{0, 1, 2, 3, 4}, {0, 9}});

// get_dev_pagemap: RCU lookup + tryget_live + put, without and with the cached pagemap.
void BM_GetDevPagemap(benchmark::State& state) {
  auto pgmap = make_pagemap(Strategy::transition, 8 << 20, 0);
  if (!pgmap) return state.SkipWithError("memremap failed");
  Pfn pfn = pgmap->range(0).start + 5;
  bool cached = state.range(0) != 0;
  PagemapRef keep;
  for (auto _ : state) {
    if (cached) {
      keep = get_dev_pagemap(pfn, std::move(keep));
      benchmark::DoNotOptimize(keep.get());
    } else {
      PagemapRef r = get_dev_pagemap(pfn);
      benchmark::DoNotOptimize(r.get());
    }
  }
}
BENCHMARK(BM_GetDevPagemap)->Arg(0)->Arg(1);

// The sweep's scan of the hot refcount array, in entries per second (no busy entries).
void BM_FindBusy(benchmark::State& state) {
  auto entries = static_cast<std::uint64_t>(state.range(0));
  auto array = PageArray::create({0, entries}, 0);
  if (!array) return state.SkipWithError("PageArray::create failed");
  for (auto _ : state)
    benchmark::DoNotOptimize((*array)->find_busy(0, entries));
  state.SetItemsProcessed(state.iterations() * state.range(0));
  state.SetBytesProcessed(state.iterations() * state.range(0) * 4);
}
BENCHMARK(BM_FindBusy)->Arg(1 << 16)->Arg(1 << 24);

}  // namespace
}  // namespace pgmap
