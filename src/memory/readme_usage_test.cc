// The README's "Usage" example, compiled and run. Keep the body of usage_example() identical to
// the code block in README.md (only the result checks below it are added).
#include <gtest/gtest.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <utility>

#include "pgmap/memory/backing.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_ref.h"

namespace {

struct Outcome {
  pgmap::Errc first_memunmap = pgmap::Errc::ok;
  bool first_named_holder = false;
  pgmap::DevPagemap::State after_first{};
  pgmap::Errc release = pgmap::Errc::ok;
  pgmap::Errc second_memunmap = pgmap::Errc::ok;
  pgmap::DevPagemap::State after_second{};
};

Outcome usage_example() {
  Outcome out;
  // ---- README.md "Usage" begins ----
  auto backing = pgmap::make_anonymous_backing({.size = 1ull << 30});  // 1 GiB device
  pgmap::MemremapParams params;
  params.type = pgmap::PagemapType::fs_dax;
  params.strategy = pgmap::Strategy::transition;  // or per_lookup, sweep, alloc_event
  params.ranges.push_back({std::move(backing).value()});
  std::shared_ptr<pgmap::DevPagemap> pgmap = pgmap::memremap(params).value();

  pgmap::Pfn pfn = pgmap->range(0).start + 42;
  pgmap::PageRef page;                                        // owns one folio reference
  if (pgmap::PagemapRef ref = pgmap::get_dev_pagemap(pfn)) {  // RCU lookup + tryget_live
    if (auto got = pgmap::PageRef::get(*ref, pfn)) page = std::move(got).value();
  }  // the pagemap reference is dropped here; the page reference keeps the pagemap alive

  // Tear down while the folio is held, waiting at most 2 s: on timeout the pagemap is live again,
  // exactly as before, and the error names the holder.
  auto r = pgmap->memunmap({.timeout = std::chrono::seconds(2)});
  if (!r) std::cerr << r.error().to_string() << "\n";  // "... pfn 0x4002a order 0 refcount 1 ..."
  // ---- (checks, not in the README) ----
  out.first_memunmap = r.code();
  out.first_named_holder = !r && r.error().holders() != nullptr &&
                           r.error().holders()->total_busy == 1 &&
                           r.error().holders()->busy[0].pfn == pfn;
  out.after_first = pgmap->state();
  // ---- README continues ----
  if (pgmap::Errc e = page.release(); e != pgmap::Errc::ok) {  // the holder lets go
    std::cerr << pgmap::errc_name(e) << "\n";
  }
  r = pgmap->memunmap();  // nothing held: done at once
  // ---- README.md "Usage" ends ----
  out.release = pgmap::Errc::ok;
  out.second_memunmap = r.code();
  out.after_second = pgmap->state();
  return out;
}

TEST(ReadmeUsage, ExampleCompilesAndBehavesAsDescribed) {
  Outcome o = usage_example();
  EXPECT_EQ(o.first_memunmap, pgmap::Errc::timed_out);
  EXPECT_TRUE(o.first_named_holder);
  EXPECT_EQ(o.after_first, pgmap::DevPagemap::State::live);
  EXPECT_EQ(o.second_memunmap, pgmap::Errc::ok);
  EXPECT_EQ(o.after_second, pgmap::DevPagemap::State::dead);
}

}  // namespace
