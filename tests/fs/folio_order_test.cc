// A large folio's order is reset at its last put when its entry was deleted while it was still
// held (I11, bug 5.8; docs/fsdax.md "Order reset at the last put"). The entry deletion cannot split
// a referenced folio; the free path of the last reference must, under every strategy, and a new
// association of the same blocks must never race that reset.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "fs/testing/fs_fixture.h"
#include "pgmap/debug/fs_invariants.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/pipe.h"

namespace pgmap::fs {
namespace {

using testutil::FsTest;

class FolioOrderTest : public FsTest {
 protected:
  // A file of one 2 MiB-aligned extent, mapped shared and write-faulted as one PMD.
  void SetUp() override {
    FsTest::SetUp();
    file_ = must_create("big");
    FallocOptions o;
    o.pmd_aligned = true;
    ASSERT_TRUE(file_.inode().fallocate(FallocMode::allocate, 0, kPmdSize, o));
    head_ = map_and_fault();
  }
  void TearDown() override {
    if (addr_) (void)as_.munmap(*addr_, kPmdSize);  // the test's assertions already ran
    file_ = File{};
    FsTest::TearDown();
  }

  // Maps the file and write-faults it; returns the folio's head pfn (0 if not a PMD block).
  Pfn map_and_fault() {
    auto addr =
        as_.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, file_.mapping(), 0);
    EXPECT_TRUE(addr);
    if (!addr) return 0;
    addr_ = *addr;
    const char x = 'x';
    EXPECT_FALSE(as_.write(*addr_ + 100, &x, 1));
    auto e = as_.lookup(*addr_);
    EXPECT_TRUE(e && e->level == mm::Level::pmd);
    return e && e->level == mm::Level::pmd ? e->pfn : 0;
  }
  void unmap() {
    ASSERT_TRUE(addr_);
    ASSERT_EQ(as_.munmap(*addr_, kPmdSize), Errc::ok);
    addr_.reset();
  }

  debug::Report check(const std::vector<const PipeBuffer*>& pipes,
                      const std::vector<const DioRequest*>& dios) {
    debug::Universe u;
    u.address_spaces.push_back(&as_);
    u.complete = true;
    debug::FsUniverse fu;
    fu.filesystems.push_back(fs_.get());
    fu.pipes = pipes;
    fu.dios = dios;
    return debug::check_fs_invariants(u, fu);
  }

  // Every page of the former folio is an idle base folio with nothing of the large one left.
  void expect_split_and_idle() {
    PageArray& a = array(head_);
    const std::uint64_t h = entry(head_);
    for (std::uint64_t i = 0; i < 512; ++i) {
      ASSERT_EQ(a.order(h + i), 0u) << "page " << i;
      ASSERT_EQ(a.head_of(h + i), h + i) << "page " << i;
      ASSERT_EQ(a.ref(h + i).load(), 0u) << "page " << i;
      ASSERT_EQ(a.mapping(h + i).load(), nullptr) << "page " << i;
      ASSERT_EQ(a.index_or_share(h + i).load(), 0u) << "page " << i;
      ASSERT_EQ(a.flags(h + i).load() & (kPageSplitOwed | kPageSplitting | kPageShared), 0)
          << "page " << i;
    }
  }

  mm::AddressSpace as_;
  File file_;
  std::optional<std::uint64_t> addr_;
  Pfn head_ = 0;
};

// The defect: the entry of a 2 MiB folio held by a DIO pin and a pipe buffer is deleted (removal
// forced past a timed-out pre-remove); the split fails (busy), and nothing reset the order when
// the holders let go: an unassociated order-9 folio that the checker reported (fs_entry_folio).
TEST_P(FolioOrderTest, HeldFolioIsSplitAtItsLastPut) {
  ASSERT_NE(head_, 0u);
  auto dio = DioRequest::submit(as_, *addr_ + 5 * kPageSize, 1);
  ASSERT_TRUE(dio) << dio.error().to_string();
  auto pipe = PipeBuffer::vmsplice(as_, *addr_ + 9 * kPageSize, 2);
  ASSERT_TRUE(pipe) << pipe.error().to_string();
  unmap();  // only the holders keep the folio referenced now
  file_.inode().testing_force_delete_entries(0, 512);
  EXPECT_FALSE(file_.inode().entries().peek(0));
  PageArray& a = array(head_);
  // Still held: still one folio, its split owed; a legal state for the checker.
  EXPECT_EQ(a.order(entry(head_)), kPmdOrder);
  EXPECT_NE(a.flags(entry(head_)).load() & kPageSplitOwed, 0);
  debug::Report held = check({&*pipe}, {dio->get()});
  EXPECT_TRUE(held.ok()) << held.to_string();

  // The pipe lets go first: the DIO still holds the folio.
  auto bytes = pipe->consume();
  ASSERT_TRUE(bytes) << bytes.error().to_string();
  EXPECT_EQ(a.order(entry(head_)), kPmdOrder);
  // The DIO completes: its unpin is the last put, which splits the folio.
  ASSERT_EQ((*dio)->complete(std::byte{0x5a}), Errc::ok);
  expect_split_and_idle();
  debug::Report idle = check({}, {});
  EXPECT_TRUE(idle.ok()) << idle.to_string();
  // The blocks are still the file's: a new PMD fault builds the folio again.
  EXPECT_EQ(map_and_fault(), head_);
  EXPECT_EQ(a.order(entry(head_)), kPmdOrder);
}

// Associated again at its own order while still held, the folio keeps its order and owes nothing;
// truncation later splits it as usual.
TEST_P(FolioOrderTest, ReassociationWhileHeldCancelsTheSplit) {
  ASSERT_NE(head_, 0u);
  auto dio = DioRequest::submit(as_, *addr_, 1);
  ASSERT_TRUE(dio) << dio.error().to_string();
  unmap();
  file_.inode().testing_force_delete_entries(0, 512);
  EXPECT_EQ(map_and_fault(), head_);
  PageArray& a = array(head_);
  EXPECT_EQ(a.order(entry(head_)), kPmdOrder);
  EXPECT_EQ(a.flags(entry(head_)).load() & kPageSplitOwed, 0);
  ASSERT_EQ((*dio)->complete(std::byte{1}), Errc::ok);
  EXPECT_EQ(a.order(entry(head_)), kPmdOrder) << "an associated folio was split at its last put";
  debug::Report r = check({}, {});
  EXPECT_TRUE(r.ok()) << r.to_string();
  unmap();
  ASSERT_TRUE(file_.inode().truncate(0));
  expect_split_and_idle();
}

// The last put races a new association of the same blocks (TSan): whichever wins, the folio's
// order is its entry's, nothing stays owed, and the checker is clean.
TEST_P(FolioOrderTest, LastPutRacesReassociation) {
  ASSERT_NE(head_, 0u);
  PageArray& a = array(head_);
  for (int round = 0; round < 60; ++round) {
    ASSERT_TRUE(addr_) << "round " << round;
    auto dio = DioRequest::submit(as_, *addr_ + 3 * kPageSize, 1);
    ASSERT_TRUE(dio) << dio.error().to_string();
    unmap();
    file_.inode().testing_force_delete_entries(0, 512);
    std::thread completer([&] { EXPECT_EQ((*dio)->complete(std::byte{2}), Errc::ok); });
    auto addr =
        as_.mmap(0, kPmdSize, mm::kProtRead | mm::kProtWrite, mm::kMapShared, file_.mapping(), 0);
    ASSERT_TRUE(addr);
    addr_ = *addr;
    const char x = 'y';
    EXPECT_FALSE(as_.write(*addr_ + 3 * kPageSize, &x, 1)) << "round " << round;
    completer.join();
    // A PMD entry if the fault found the folio whole or rebuilt it, else (the last put was still
    // running its free path) 4 KiB entries after the fallback.
    auto slot = file_.inode().entries().peek(3);
    ASSERT_TRUE(slot) << "round " << round;
    const std::uint64_t e = a.index_of(slot->entry.pfn());
    EXPECT_EQ(a.head_of(e), e) << "round " << round;
    EXPECT_EQ(a.order(e), slot->entry.order()) << "round " << round;
    EXPECT_EQ(a.flags(entry(head_)).load() & (kPageSplitOwed | kPageSplitting), 0)
        << "round " << round;
    debug::Report r = check({}, {});
    ASSERT_TRUE(r.ok()) << "round " << round << ": " << r.to_string();
    if (!slot->entry.pmd()) {
      // Back to one PMD for the next round.
      unmap();
      ASSERT_TRUE(file_.inode().break_layout(0, 512, BreakOptions{}));
      file_.inode().testing_force_delete_entries(0, 512);
      ASSERT_EQ(map_and_fault(), head_) << "round " << round;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, FolioOrderTest, ::testing::ValuesIn(kAllStrategies),
                         testutil::strategy_name_of);

}  // namespace
}  // namespace pgmap::fs
