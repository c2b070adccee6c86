// Microbenchmarks of GUP for developers: pin_user_pages_into + unpin_user_pages of a pre-faulted
// mapping, per strategy, for a 1-page call (the fixed cost of a call) and a 512-page call (the
// cost per page of the batched walk). pgmap-bench's `gup` suite runs the same loops end to end
// over a DevDax device, interleaved with its floor; these are the quick, focused versions
// (make bench), e.g. for `perf record` of one strategy's 1-page loop:
//
//   gup_benchmark --benchmark_filter='BM_PinUnpin/0/1$' --benchmark_min_time=2
//
// The owner here maps owner page N to pfn start + N of one generic pagemap and takes the fault's
// folio reference with PageRef::get; under alloc_event one Allocation covers the whole pagemap for
// the benchmark's life (the strategy's contract: every folio reference lies inside one).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/memory/strategy.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {
namespace {

constexpr std::uint64_t kBytes = std::uint64_t{8} << 20;

class BenchOwner : public MappingOwner {
 public:
  explicit BenchOwner(std::shared_ptr<DevPagemap> pgmap) : pgmap_(std::move(pgmap)) {}
  std::string name() const override { return "gup-benchmark"; }
  std::uint64_t size() const override { return pgmap_->total_pages() << kPageShift; }
  std::uint32_t vma_flags() const override { return kVmDax; }
  Errc on_mmap(Vma& vma) override {
    (void)vma;
    return Errc::ok;
  }
  FaultResult fault(const Vma& vma, const FaultRequest& req) override {
    (void)vma;
    if (req.level != Level::pte) return FaultResult::fallback();
    auto ref = PageRef::get(*pgmap_, pgmap_->range(0).start + req.pgoff);
    if (!ref) return FaultResult::sigbus("gup-benchmark: " + ref.error().to_string());
    return FaultResult::insert(std::move(ref).value());
  }

 private:
  std::shared_ptr<DevPagemap> pgmap_;
};

struct Fixture {
  std::shared_ptr<DevPagemap> pgmap;
  DevPagemap::Allocation alloc;  // alloc_event: covers every page
  std::shared_ptr<BenchOwner> owner;
  std::unique_ptr<AddressSpace> as;
  std::uint64_t addr = 0;

  ~Fixture() {
    as.reset();  // zaps the mapping: its folio references go before the pagemap
    alloc.reset();
    if (pgmap) (void)pgmap->memunmap(MemunmapOptions{});  // end of the process's benchmark
  }
};

// A pagemap of `s` over kBytes, mapped shared RW and pre-faulted for writing.
std::unique_ptr<Fixture> make_fixture(Strategy s, std::string* why) {
  BackingOptions bo;
  bo.size = kBytes;
  auto backing = make_anonymous_backing(bo);
  if (!backing) {
    *why = backing.error().to_string();
    return nullptr;
  }
  MemremapParams params;
  params.type = PagemapType::generic;
  params.strategy = s;
  params.ranges.push_back(PagemapRangeSpec{std::shared_ptr<Backing>(std::move(backing).value())});
  auto pgmap = memremap(std::move(params));
  if (!pgmap) {
    *why = pgmap.error().to_string();
    return nullptr;
  }
  auto f = std::make_unique<Fixture>();
  f->pgmap = std::move(pgmap).value();
  if (s == Strategy::alloc_event) {
    auto a = f->pgmap->request(f->pgmap->range(0).start, f->pgmap->total_pages());
    if (!a) {
      *why = a.error().to_string();
      return nullptr;
    }
    f->alloc = std::move(a).value();
  }
  f->owner = std::make_shared<BenchOwner>(f->pgmap);
  f->as = std::make_unique<AddressSpace>();
  auto addr = f->as->mmap(0, kBytes, kProtRead | kProtWrite, kMapShared, f->owner, 0);
  if (!addr) {
    *why = addr.error().to_string();
    return nullptr;
  }
  f->addr = *addr;
  for (std::uint64_t off = 0; off < kBytes; off += kPageSize) {
    if (SignalInfo sig = f->as->handle_fault(f->addr + off, true)) {
      *why = sig.why;
      return nullptr;
    }
  }
  return f;
}

// pin_user_pages_into(kFollWrite) + unpin_user_pages of range(1) pages per iteration.
void BM_PinUnpin(benchmark::State& state) {
  const auto s = static_cast<Strategy>(state.range(0));
  const auto pages = static_cast<std::uint64_t>(state.range(1));
  std::string why;
  auto f = make_fixture(s, &why);
  if (!f) return state.SkipWithError(why.c_str());
  PinnedPages set;  // reused: its storage is allocated by the first call only
  for (auto _ : state) {
    if (pin_user_pages_into(set, *f->as, f->addr, pages, kFollWrite) != Errc::ok) {
      return state.SkipWithError("pin_user_pages_into failed");
    }
    if (unpin_user_pages(set) != Errc::ok) return state.SkipWithError("unpin_user_pages failed");
  }
  state.SetItemsProcessed(state.iterations() * state.range(1));
  state.SetLabel(std::string(strategy_name(s)));
}
BENCHMARK(BM_PinUnpin)->ArgsProduct({benchmark::CreateDenseRange(0, 4, 1), {1, 512}});

// get_user_pages_into + put_pages of one page (FOLL_GET: a plain reference).
void BM_GetPut1Page(benchmark::State& state) {
  const auto s = static_cast<Strategy>(state.range(0));
  std::string why;
  auto f = make_fixture(s, &why);
  if (!f) return state.SkipWithError(why.c_str());
  ReferencedPages set;
  for (auto _ : state) {
    if (get_user_pages_into(set, *f->as, f->addr, 1, 0) != Errc::ok) {
      return state.SkipWithError("get_user_pages_into failed");
    }
    if (put_pages(set) != Errc::ok) return state.SkipWithError("put_pages failed");
  }
  state.SetLabel(std::string(strategy_name(s)));
}
BENCHMARK(BM_GetPut1Page)->DenseRange(0, 4);

}  // namespace
}  // namespace pgmap::mm
