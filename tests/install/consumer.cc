// Uses the installed headers and libraries the way an outside project would: a pagemap over an
// anonymous backing, a folio reference, a lookup, and a teardown that waits for nothing.
#include <pgmap/core/percpu_ref.h>
#include <pgmap/memory/backing.h>
#include <pgmap/memory/dev_pagemap.h>

#include <cstdio>

int main() {
  pgmap::BackingOptions bo;
  bo.size = 8 << 20;
  auto backing = pgmap::make_anonymous_backing(bo);
  if (!backing) return std::fprintf(stderr, "%s\n", backing.error().to_string().c_str()), 1;
  pgmap::MemremapParams params;
  params.strategy = pgmap::Strategy::transition;
  params.ranges.push_back({std::move(backing).value(), 0, 0});
  auto pgmap = pgmap::memremap(params);
  if (!pgmap) return std::fprintf(stderr, "%s\n", pgmap.error().to_string().c_str()), 1;
  pgmap::Pfn pfn = (*pgmap)->range(0).start + 7;
  if ((*pgmap)->get_folio(pfn) != pgmap::Errc::ok) return 1;
  if (!pgmap::get_dev_pagemap(pfn)) return 1;
  if ((*pgmap)->put_folio(pfn) != pgmap::Errc::ok) return 1;
  auto stats = (*pgmap)->memunmap();
  if (!stats) return std::fprintf(stderr, "%s\n", stats.error().to_string().c_str()), 1;
  std::printf("consumer: %s, memunmap %.6f s\n", (*pgmap)->describe().c_str(),
              stats->total_seconds);
  return 0;
}
