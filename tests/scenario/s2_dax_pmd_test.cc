// Scenario S2 of kernel-semantics.md §7.1: ndctl's dax-pmd.c test_pmd, on a 2 MiB device-dax
// mapping, end to end through the address space, GUP, DevDax and the pagemap, for every safe
// strategy. The O_DIRECT cases are modelled as what the kernel does for them: GUP pins the user
// pages, the "device" reads or writes the pinned folios' bytes, and the pins are dropped.
//
//   case 0  O_DIRECT read into an unfaulted DAX address: the pin takes the slow path and faults
//           the PMD in; data the "device" writes is visible through the mapping.
//   case 1  O_DIRECT write/read of a pre-faulted address: the pin takes the lockless fast path.
//   case 2  fork with a pre-faulted PMD: the child does not inherit the entry, faults it in and
//           reads the parent's data; the folio's mapcount counts both mappings.
//   case 3  convert a read-only mapping to read-write (mprotect): the write fails before, works
//           after.
//   case 4  O_DIRECT write from an unfaulted address: a read-only pin faults the page in and the
//           "device" reads the device's bytes.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/dax/devdax.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"

namespace pgmap::dax {
namespace {

constexpr std::uint64_t kDeviceBytes = 8 * kPmdSize;
constexpr std::uint64_t kMapBytes = 4 * kPmdSize;  // test_pmd maps 4 x 2 MiB
constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;
constexpr std::uint64_t kPmdPages = order_pages(kPmdOrder);

class S2DaxPmdTest : public ::testing::TestWithParam<Strategy> {
 protected:
  void SetUp() override {
    pg_ = testutil::must_memremap(
        testutil::make_params(GetParam(), testutil::make_backing(kDeviceBytes, kPmdSize), kPmdOrder,
                              PagemapType::generic));
    ASSERT_NE(pg_, nullptr);
    auto dev = DevDax::create(pg_);
    ASSERT_TRUE(dev) << dev.error().to_string();
    dev_ = std::move(dev).value();
  }
  void TearDown() override {
    as_.reset();
    if (dev_) {
      auto r = dev_->unbind();
      EXPECT_TRUE(r) << r.error().to_string();
    }
  }

  std::uint64_t map(std::uint32_t prot) {
    auto addr = as_->mmap(0, kMapBytes, prot, mm::kMapShared, dev_, 0);
    EXPECT_TRUE(addr) << addr.error().to_string();
    return addr ? *addr : 0;
  }
  // The bytes of the 4 KiB page at `page` (a pinned pfn), as a DMA engine would see them.
  std::byte* dma(const mm::GupPage& page) { return page.pgmap->address_of(page.pfn); }
  std::uint32_t refcount_at(std::uint64_t addr) {
    auto e = as_->lookup(addr);
    return e ? pg_->folio_ref_count(e->pfn) : 0;
  }

  std::shared_ptr<DevPagemap> pg_;
  std::shared_ptr<DevDax> dev_;
  std::unique_ptr<mm::AddressSpace> as_ = std::make_unique<mm::AddressSpace>();
};

TEST_P(S2DaxPmdTest, Case0DirectReadIntoUnfaultedAddressFaultsThePmdIn) {
  std::uint64_t addr = map(kRW);
  ASSERT_FALSE(as_->lookup(addr));
  mm::GupStats stats;
  auto pages = mm::pin_user_pages(*as_, addr, kPmdPages, mm::kFollWrite, &stats);
  ASSERT_TRUE(pages) << pages.error().to_string();
  EXPECT_GT(stats.slow, 0u);           // nothing was mapped: the slow path faulted it in
  EXPECT_EQ(stats.folio_atomics, 1u);  // 512 pages of one 2 MiB folio: one atomic
  auto e = as_->lookup(addr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, mm::Level::pmd);
  EXPECT_TRUE(pg_->folio_maybe_dma_pinned(e->pfn));
  // The "device" completes the read: it writes into every pinned page.
  for (std::uint64_t i = 0; i < pages->size(); ++i) {
    std::memset(dma((*pages)[i]), static_cast<int>(0x40 + i % 64), kPageSize);
  }
  EXPECT_EQ(mm::unpin_user_pages(*pages), Errc::ok);
  EXPECT_FALSE(pg_->folio_maybe_dma_pinned(e->pfn));
  std::vector<std::uint8_t> buf(kPageSize);
  for (std::uint64_t i : {std::uint64_t{0}, std::uint64_t{7}, kPmdPages - 1}) {
    ASSERT_FALSE(as_->read(addr + i * kPageSize, buf.data(), kPageSize));
    EXPECT_EQ(buf[0], 0x40 + i % 64) << "page " << i;
    EXPECT_EQ(buf[kPageSize - 1], 0x40 + i % 64) << "page " << i;
  }
}

TEST_P(S2DaxPmdTest, Case1DirectIoOnPrefaultedAddressTakesTheFastPath) {
  std::uint64_t addr = map(kRW) + kPmdSize;
  std::vector<std::uint8_t> data(2 * kPageSize, 0x5a);
  ASSERT_FALSE(as_->write(addr, data.data(), data.size()));  // pre-fault
  const std::uint32_t mapped_refs = refcount_at(addr);
  mm::GupStats stats;
  auto pages = mm::pin_user_pages(*as_, addr, 2, mm::kFollWrite, &stats);
  ASSERT_TRUE(pages) << pages.error().to_string();
  EXPECT_EQ(stats.fast, 2u);
  EXPECT_EQ(stats.slow, 0u);
  EXPECT_EQ(static_cast<std::uint8_t>(*dma((*pages)[1])), 0x5a);  // O_DIRECT write sees the data
  std::memset(dma((*pages)[0]), 0xa5, kPageSize);                 // O_DIRECT read fills it
  EXPECT_EQ(mm::unpin_user_pages(*pages), Errc::ok);
  EXPECT_EQ(refcount_at(addr), mapped_refs);  // back to the mapping's own reference
  std::uint8_t b = 0;
  ASSERT_FALSE(as_->read(addr + 100, &b, 1));
  EXPECT_EQ(b, 0xa5);
}

TEST_P(S2DaxPmdTest, Case2ForkWithPrefaultedPmdChildFaultsAndReadsTheData) {
  std::uint64_t addr = map(kRW);
  const char msg[] = "written by the parent";
  ASSERT_FALSE(as_->write(addr + 2 * kPmdSize + 64, msg, sizeof(msg)));
  auto parent_entry = as_->lookup(addr + 2 * kPmdSize);
  ASSERT_TRUE(parent_entry);
  ASSERT_EQ(parent_entry->level, mm::Level::pmd);
  PageArray* a = pg_->array_for(parent_entry->pfn);
  const std::uint64_t head = a->head_of(a->index_of(parent_entry->pfn));
  EXPECT_EQ(a->mapcount(head).load(), 1);

  std::unique_ptr<mm::AddressSpace> child = as_->fork();
  EXPECT_EQ(child->nr_entries(), 0u);  // shared mappings are not copied: the child faults
  char buf[sizeof(msg)] = {};
  ASSERT_FALSE(child->read(addr + 2 * kPmdSize + 64, buf, sizeof(buf)));
  EXPECT_STREQ(buf, msg);
  auto child_entry = child->lookup(addr + 2 * kPmdSize);
  ASSERT_TRUE(child_entry);
  EXPECT_EQ(child_entry->pfn, parent_entry->pfn);
  EXPECT_EQ(child_entry->level, mm::Level::pmd);
  EXPECT_EQ(a->mapcount(head).load(), 2);
  child.reset();  // the child exits
  EXPECT_EQ(a->mapcount(head).load(), 1);
}

TEST_P(S2DaxPmdTest, Case3ReadOnlyMappingBecomesWritableAfterMprotect) {
  std::uint64_t addr = map(mm::kProtRead);
  std::uint8_t b = 0;
  ASSERT_FALSE(as_->read(addr, &b, 1));  // a read-only entry is now present
  const std::uint8_t v = 0x77;
  mm::SignalInfo s = as_->write(addr, &v, 1);
  EXPECT_EQ(s.signal, mm::Signal::sigsegv);
  EXPECT_EQ(s.addr, addr);
  ASSERT_EQ(as_->mprotect(addr, kMapBytes, kRW), Errc::ok);
  EXPECT_FALSE(as_->write(addr, &v, 1));
  ASSERT_FALSE(as_->read(addr, &b, 1));
  EXPECT_EQ(b, v);
  auto e = as_->lookup(addr);
  ASSERT_TRUE(e);
  EXPECT_TRUE(e->writable);
}

TEST_P(S2DaxPmdTest, Case4DirectWriteFromUnfaultedAddressReadsTheDeviceBytes) {
  std::uint64_t addr = map(kRW) + 3 * kPmdSize;
  // Seed the device directly (what an earlier writer left there).
  Pfn first = pg_->range(0).start + 3 * kPmdPages;
  std::memset(pg_->address_of(first), 0x3c, kPageSize);
  mm::GupStats stats;
  auto pages = mm::pin_user_pages(*as_, addr, 1, 0, &stats);  // no FOLL_WRITE: a read fault
  ASSERT_TRUE(pages) << pages.error().to_string();
  EXPECT_GT(stats.slow, 0u);
  EXPECT_EQ((*pages)[0].pfn, first);
  EXPECT_EQ(static_cast<std::uint8_t>(*dma((*pages)[0])), 0x3c);
  auto e = as_->lookup(addr);
  ASSERT_TRUE(e);
  EXPECT_FALSE(e->writable);  // faulted for read only
  EXPECT_EQ(mm::unpin_user_pages(*pages), Errc::ok);
}

INSTANTIATE_TEST_SUITE_P(Strategies, S2DaxPmdTest, ::testing::ValuesIn(kSafeStrategies),
                         [](const auto& p) { return std::string(strategy_name(p.param)); });

}  // namespace
}  // namespace pgmap::dax
