#include "pgmap/fs/entry_map.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/fs/entry.h"

namespace pgmap::fs {
namespace {

using pgmap::testutil::eventually;

TEST(EntryTest, NamedAccessorsRoundTrip) {
  const Entry b = Entry::block(0x12345, kPmdOrder);
  EXPECT_EQ(b.pfn(), 0x12345u);
  EXPECT_TRUE(b.pmd());
  EXPECT_TRUE(b.is_block());
  EXPECT_FALSE(b.zero());
  EXPECT_FALSE(b.empty());
  EXPECT_FALSE(b.locked());
  EXPECT_EQ(b.order(), kPmdOrder);
  EXPECT_EQ(b.pages(), 512u);
  const Entry l = b.locked_copy();
  EXPECT_TRUE(l.locked());
  EXPECT_EQ(l.pfn(), b.pfn());
  EXPECT_EQ(l.unlocked_copy(), b);
  EXPECT_EQ(b.raw(), (std::uint64_t{0x12345} << Entry::kShift) | Entry::kPmd);
  EXPECT_TRUE(Entry::zero(0).zero());
  EXPECT_FALSE(Entry::zero(0).is_block());
  EXPECT_EQ(Entry::zero(0).order(), 0u);
  EXPECT_TRUE(Entry::empty(kPmdOrder).empty());
  EXPECT_TRUE(Entry::empty(kPmdOrder).pmd());
}

TEST(EntryMapTest, GrabCreatesLockedPlaceholderAndUnlockStores) {
  EntryMap m;
  auto s = m.grab(7, 0);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->index, 7u);
  EXPECT_TRUE(s->entry.empty());
  EXPECT_TRUE(m.peek(7)->entry.locked());
  m.unlock(7, Entry::block(100, 0));
  auto p = m.peek(7);
  ASSERT_TRUE(p);
  EXPECT_FALSE(p->entry.locked());
  EXPECT_EQ(p->entry.pfn(), 100u);
  EXPECT_EQ(m.nr_pages(), 1u);
}

TEST(EntryMapTest, PmdRequestOverPteEntriesFallsBack) {
  EntryMap m;
  ASSERT_TRUE(m.grab(515, 0));
  m.unlock(515, Entry::block(1, 0));
  auto s = m.grab(512 + 3, kPmdOrder);
  EXPECT_EQ(s.code(), Errc::busy);
  EXPECT_EQ(m.size(), 1u);  // nothing changed
  // Another PMD range is free.
  auto t = m.grab(1024, kPmdOrder);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->index, 1024u);
  m.unlock(1024, Entry::block(2048, kPmdOrder));
  // A PTE request inside a PMD block entry gets that entry (I6: no PTE entry inside it).
  auto u = m.grab(1030, 0);
  ASSERT_TRUE(u);
  EXPECT_EQ(u->index, 1024u);
  EXPECT_TRUE(u->entry.pmd());
  m.unlock(1024);
  EXPECT_EQ(m.size(), 2u);
}

TEST(EntryMapTest, PteRequestDowngradesPmdZeroEntry) {
  EntryMap m;
  ASSERT_TRUE(m.grab(0, kPmdOrder));
  m.unlock(0, Entry::zero(kPmdOrder));
  std::uint64_t downgraded = ~0ull;
  auto s = m.grab(5, 0, [&](std::uint64_t base) { downgraded = base; });
  ASSERT_TRUE(s);
  EXPECT_EQ(downgraded, 0u);
  EXPECT_EQ(s->index, 5u);
  EXPECT_TRUE(s->entry.empty());
  m.erase(5);
  EXPECT_EQ(m.size(), 0u);
}

TEST(EntryMapTest, BadOrderIsRefused) {
  EntryMap m;
  EXPECT_EQ(m.grab(0, 3).code(), Errc::invalid_argument);
  EXPECT_EQ(m.size(), 0u);
}

// T5 / bug 5.5: a scan that meets a locked entry waits for it in place instead of skipping it.
TEST(EntryMapTest, ScanWaitsForLockedEntryInsteadOfSkippingIt) {
  EntryMap m;
  for (std::uint64_t i : {1u, 2u, 3u}) {
    ASSERT_TRUE(m.grab(i, 0));
    m.unlock(i, Entry::block(100 + i, 0));
  }
  ASSERT_TRUE(m.grab(2, 0));  // held locked by "another operation"
  std::atomic<bool> done{false};
  std::vector<std::uint64_t> seen;
  std::thread scanner([&] {
    for (std::uint64_t at = 0;;) {
      auto s = m.lock_next(at, 100);
      if (!s) break;
      seen.push_back(s->index);
      at = s->index + 1;
      m.unlock(s->index);
    }
    done.store(true);
  });
  ASSERT_TRUE(eventually([&] { return m.waiters() > 0; }));
  EXPECT_FALSE(done.load());
  m.unlock(2, Entry::block(999, 0));
  scanner.join();
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[1], 2u);  // the locked entry was inspected, not skipped
  EXPECT_EQ(m.peek(2)->entry.pfn(), 999u);
}

TEST(EntryMapTest, ConcurrentGrabsSerializeOnOneEntry) {
  EntryMap m;
  std::atomic<int> inside{0};
  std::atomic<int> max_inside{0};
  auto worker = [&] {
    for (int i = 0; i < 200; ++i) {
      auto s = m.grab(10, 0);
      ASSERT_TRUE(s);
      int now = inside.fetch_add(1) + 1;
      int prev = max_inside.load();
      while (now > prev && !max_inside.compare_exchange_weak(prev, now)) {
      }
      inside.fetch_sub(1);
      m.unlock(s->index, Entry::block(5, 0));
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  EXPECT_EQ(max_inside.load(), 1);
  EXPECT_FALSE(m.peek(10)->entry.locked());
}

}  // namespace
}  // namespace pgmap::fs
