#include "pgmap/fs/entry_refs.h"

#include <gtest/gtest.h>

#include <chrono>

#include "memory/testing/pagemap_fixture.h"

namespace pgmap::fs {
namespace {

using pgmap::testutil::make_backing;
using pgmap::testutil::make_params;
using pgmap::testutil::must_memremap;

TEST(EntryRefsTest, OnlyTheSeedPatchStrategiesHoldPagemapRefs) {
  EXPECT_TRUE(entry_holds_pagemap_refs(Strategy::per_lookup));
  EXPECT_TRUE(entry_holds_pagemap_refs(Strategy::transition));
  EXPECT_FALSE(entry_holds_pagemap_refs(Strategy::none));
  EXPECT_FALSE(entry_holds_pagemap_refs(Strategy::sweep));
  EXPECT_FALSE(entry_holds_pagemap_refs(Strategy::alloc_event));
}

MemunmapOptions bounded(UnmapPolicy policy) {
  MemunmapOptions o;
  o.policy = policy;
  o.timeout = std::chrono::seconds(30);
  return o;
}

TEST(EntryRefsTest, HeldReferencesKeepThePagemapUntilPut) {
  auto pg = must_memremap(make_params(Strategy::transition, make_backing(4 << 20)));
  ASSERT_TRUE(pg);
  ASSERT_EQ(get_entry_refs(*pg, 512), Errc::ok);
  EXPECT_EQ(pg->memunmap(bounded(UnmapPolicy::refuse)).code(), Errc::busy);
  put_entry_refs(*pg, 511);
  EXPECT_EQ(pg->memunmap(bounded(UnmapPolicy::refuse)).code(), Errc::busy);
  put_entry_refs(*pg, 1);
  auto r = pg->memunmap(bounded(UnmapPolicy::refuse));
  EXPECT_TRUE(r) << r.error().to_string();
}

TEST(EntryRefsTest, FailsOnAKilledPagemapAndTakesNothing) {
  auto pg = must_memremap(make_params(Strategy::per_lookup, make_backing(4 << 20)));
  ASSERT_TRUE(pg);
  ASSERT_EQ(pg->kill(), Errc::ok);
  EXPECT_EQ(get_entry_refs(*pg, 16), Errc::dead);
  // Nothing is held: the teardown completes without waiting.
  auto r = pg->memunmap(bounded(UnmapPolicy::refuse));
  EXPECT_TRUE(r) << r.error().to_string();
}

TEST(EntryRefsTest, ZeroPagesIsANoOp) {
  auto pg = must_memremap(make_params(Strategy::transition, make_backing(4 << 20)));
  ASSERT_TRUE(pg);
  EXPECT_EQ(get_entry_refs(*pg, 0), Errc::ok);
  put_entry_refs(*pg, 0);
  auto r = pg->memunmap(bounded(UnmapPolicy::refuse));
  EXPECT_TRUE(r) << r.error().to_string();
}

}  // namespace
}  // namespace pgmap::fs
