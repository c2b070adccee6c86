#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "mm/testing/fake_owner.h"
#include "pgmap/core/error.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {
namespace {

using testutil::FakeDevice;
using testutil::FakeOwner;
using testutil::make_fake_device;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint32_t kRW = kProtRead | kProtWrite;
constexpr int kRounds = pgmap::testutil::kSanitized ? 40 : 300;

std::uint64_t page(std::uint64_t n) {
  return n << kPageShift;
}

// Releases both threads of a round at once.
class StartLine {
 public:
  void arrive_and_wait() {
    arrived_.fetch_add(1);
    while (arrived_.load() < 2)
      std::this_thread::yield();
  }

 private:
  std::atomic<int> arrived_{0};
};

class AddressSpaceConcurrencyTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (FakeDevice& d : devices_) {
      if (d.pgmap) {
        EXPECT_EQ(d.memunmap_refuse(), Errc::ok) << d.pgmap->holders().to_string();
      }
    }
  }

  FakeDevice& device(std::uint64_t bytes, unsigned base_order = 0, FakeOwner::Options opts = {}) {
    devices_.push_back(make_fake_device(bytes, base_order, std::move(opts)));
    return devices_.back();
  }

  // 2 MiB folios whose owner offers PMD faults only, as a device-dax device of 2 MiB alignment.
  FakeDevice& pmd_only_device(std::uint64_t bytes) {
    FakeOwner::Options o;
    o.max_level = Level::pmd;
    o.min_level = Level::pmd;
    return device(bytes, kPmdOrder, std::move(o));
  }

  static std::uint64_t must_mmap(AddressSpace& as, const FakeDevice& d, std::uint64_t len,
                                 std::uint64_t addr = 0, std::uint32_t flags = 0) {
    auto r = as.mmap(addr, len, kRW, kMapShared | flags, d.owner, 0);
    EXPECT_TRUE(r) << r.error().to_string();
    return r ? *r : 0;
  }

  // Every folio's references are exactly its mappings' (no GUP reference is left over).
  static void expect_refs_match_entries(const AddressSpace& as, const FakeDevice& d,
                                        std::uint64_t a, std::uint64_t pages,
                                        std::uint64_t folio_pages) {
    for (std::uint64_t f = 0; f < pages; f += folio_pages) {
      std::uint32_t mapped = 0;
      for (std::uint64_t i = f; i < f + folio_pages; ++i) {
        auto e = as.lookup(a + page(i));
        if (e && e->addr == a + page(i)) ++mapped;
      }
      EXPECT_EQ(d.refcount(f), mapped) << "folio at page " << f;
      EXPECT_EQ(d.mapcount(f), static_cast<std::int32_t>(mapped)) << "folio at page " << f;
      EXPECT_EQ(d.pincount(f), 0u);
    }
  }

  // Runs `work` on one thread while another zaps every mapping of d's owner until it is done.
  template <typename Work>
  static void race_with_zapper(const FakeDevice& d, Work& work) {
    StartLine start;
    std::atomic<bool> stop{false};
    std::thread worker([&] {
      start.arrive_and_wait();
      work();  // its ASSERTs return from `work`; the zapper stops either way
      stop.store(true);
    });
    std::thread zapper([&] {
      start.arrive_and_wait();
      while (!stop.load()) {
        (void)d.owner->unmap_mapping_range(0, 0);
        std::this_thread::yield();
      }
    });
    worker.join();
    zapper.join();
  }

  pgmap::testutil::MisuseCounter misuse_;
  std::deque<FakeDevice> devices_;
};

// Concurrent faults on the same addresses (two CPUs touching the same page, §3.4 step 4 race
// check): exactly one entry per address is installed, the loser drops its folio reference.
TEST_F(AddressSpaceConcurrencyTest, ConcurrentFaultsInstallOneEntry) {
  constexpr std::uint64_t kPages = 64;
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  for (int round = 0; round < kRounds; ++round) {
    StartLine start;
    auto faulter = [&](bool write) {
      start.arrive_and_wait();
      for (std::uint64_t i = 0; i < kPages; ++i) {
        EXPECT_FALSE(as.handle_fault(a + page(i), write));
      }
    };
    std::thread t1(faulter, false);
    std::thread t2(faulter, round % 2 == 1);
    t1.join();
    t2.join();
    ASSERT_EQ(as.nr_entries(), kPages);
    for (std::uint64_t i = 0; i < kPages; ++i) {
      ASSERT_EQ(d.refcount(i), 1u) << "page " << i << " round " << round;
      ASSERT_EQ(d.mapcount(i), 1);
    }
    ASSERT_EQ(d.owner->unmap_mapping_range(0, 0), kPages);
  }
  EXPECT_EQ(d.refcount(0), 0u);
}

// The same race at PMD level (I6: one entry covers an index). The owner refuses 4 KiB faults, as
// a 2 MiB device-dax device does: a fault that lost the race must find the winner's entry, never
// fall back to a smaller one (see FaultOvertakenByAPmdInstallFindsIt).
TEST_F(AddressSpaceConcurrencyTest, ConcurrentPmdFaultsInstallOneEntry) {
  FakeDevice& d = pmd_only_device(8 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 8 * kMiB);
  for (int round = 0; round < kRounds; ++round) {
    StartLine start;
    auto faulter = [&](std::uint64_t offset) {
      start.arrive_and_wait();
      for (std::uint64_t f = 0; f < 4; ++f) {
        EXPECT_FALSE(as.handle_fault(a + f * 2 * kMiB + offset, true));
      }
    };
    std::thread t1(faulter, page(3));
    std::thread t2(faulter, page(400));
    t1.join();
    t2.join();
    ASSERT_EQ(as.nr_entries(), 4u);
    for (std::uint64_t f = 0; f < 4; ++f) {
      ASSERT_EQ(as.lookup(a + f * 2 * kMiB)->level, Level::pmd);
      ASSERT_EQ(d.refcount(f * 512), 1u);
      ASSERT_EQ(d.mapcount(f * 512), 1);
    }
    ASSERT_EQ(d.owner->unmap_mapping_range(0, 0), 4u);
  }
}

// gup-fast racing a zap (kill_dev_dax's unmap_mapping_range; gup-fast's re-check of the entry,
// bug 5.11): every pin either succeeds on the right pages or is undone; after the unpins no
// reference is left but the mappings'.
TEST_F(AddressSpaceConcurrencyTest, GupFastRacingUnmapMappingRange) {
  constexpr std::uint64_t kPages = 128;
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  auto pins = [&] {
    for (int i = 0; i < 4; ++i) {
      GupStats st;
      auto r = pin_user_pages(as, a, kPages, i % 2 == 0 ? std::uint32_t{kFollWrite} : 0u, &st);
      ASSERT_TRUE(r) << r.error().to_string();
      for (std::uint64_t p = 0; p < kPages; ++p) {
        ASSERT_EQ((*r)[p].pfn, d.pfn(p));
        ASSERT_TRUE(d.pgmap->folio_maybe_dma_pinned(d.pfn(p)));
      }
      ASSERT_EQ(unpin_user_pages(*r), Errc::ok);
    }
  };
  for (int round = 0; round < kRounds; ++round) {
    race_with_zapper(d, pins);
    expect_refs_match_entries(as, d, a, kPages, 1);
    if (HasFatalFailure()) return;
  }
}

// A fault whose lookup found nothing, overtaken by a fault that maps the whole PMD before it tries
// the levels, must find that entry (its fault is spurious now) instead of asking the owner for a
// 4 KiB entry under it. A device-dax device of 2 MiB alignment answers that request with SIGBUS:
// the TSan stress_alloc_event failure "alignment 0x200000 > fault size 0x1000" of a GUP fault.
// Deterministic: the slow fault is stopped in max_level(), which it reads after its lookup, and
// the fast one runs to the end meanwhile on another thread.
TEST_F(AddressSpaceConcurrencyTest, FaultOvertakenByAPmdInstallFindsIt) {
  FakeDevice& d = pmd_only_device(2 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB);
  std::atomic<bool> armed{true};
  d.owner->set_before_levels([&] {
    if (!armed.exchange(false)) return;  // the fast fault, and the slow one's retry
    std::thread fast([&] { EXPECT_FALSE(as.handle_fault(a + page(300), true)); });
    fast.join();
  });
  const SignalInfo slow = as.handle_fault(a + page(5), true);
  EXPECT_FALSE(slow) << slow.why;
  EXPECT_FALSE(armed.load()) << "the slow fault was not overtaken";
  EXPECT_EQ(d.owner->faults(Level::pte), 0u);
  EXPECT_EQ(d.owner->faults(Level::pmd), 1u);
  ASSERT_EQ(as.nr_entries(), 1u);
  EXPECT_EQ(as.lookup(a)->level, Level::pmd);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.mapcount(0), 1);
  EXPECT_EQ(d.owner->unmap_mapping_range(0, 0), 1u);
}

// The same while the winner's install holds the PMD slot locked (between taking the slot and
// publishing the entry): the loser waits for the slot instead of reading it as occupied by smaller
// entries. Needs the yield points: the winner is held at "pt.install_locked" until the loser
// reaches "pt.wait_unlocked" (or has returned, on code that does not wait; 10 s at most).
namespace install_locked {
std::atomic<bool> armed{false};
std::atomic<bool> holding{false};
std::atomic<bool> waited{false};
std::atomic<bool> loser_done{false};
void hook(const char* name) noexcept {
  if (std::strcmp(name, "pt.wait_unlocked") == 0) {
    if (holding.load()) waited.store(true);
    return;
  }
  if (std::strcmp(name, "pt.install_locked") != 0 || !armed.exchange(false)) return;
  holding.store(true);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!waited.load() && !loser_done.load() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
}
}  // namespace install_locked

TEST_F(AddressSpaceConcurrencyTest, FaultMeetingALockedPmdSlotWaitsForIt) {
  if (!kYieldPointsEnabled) GTEST_SKIP() << "needs yield points (debug, asan, tsan presets)";
  FakeDevice& d = pmd_only_device(2 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, 2 * kMiB);
  install_locked::holding.store(false);  // fresh for every run of the test (--gtest_repeat)
  install_locked::waited.store(false);
  install_locked::loser_done.store(false);
  install_locked::armed.store(true);
  const YieldHook old = set_yield_hook(&install_locked::hook);
  std::thread winner([&] { EXPECT_FALSE(as.handle_fault(a + page(300), true)); });
  EXPECT_TRUE(pgmap::testutil::eventually([] { return install_locked::holding.load(); }))
      << "the winner's install never held the slot";
  const SignalInfo loser = as.handle_fault(a + page(5), true);
  install_locked::loser_done.store(true);
  winner.join();
  (void)set_yield_hook(old);
  EXPECT_FALSE(loser) << loser.why;
  EXPECT_TRUE(install_locked::waited.load());
  EXPECT_EQ(d.owner->faults(Level::pte), 0u);
  ASSERT_EQ(as.nr_entries(), 1u);
  EXPECT_EQ(as.lookup(a)->level, Level::pmd);
  EXPECT_EQ(d.refcount(0), 1u);
  EXPECT_EQ(d.owner->unmap_mapping_range(0, 0), 1u);
}

// The same race widened at the yield points of the batched walk and of the zap (debug, asan and
// tsan presets): a sleep between reading the entries and taking their references
// ("gup.after_walk"), between the references and the re-check ("gup.before_recheck"), between a
// zap clearing an entry and dropping its reference ("zap.before_put"), and between an owner's
// fault and the install ("fault.after_owner").
namespace widened {
std::atomic<unsigned> tick{0};
void hook(const char* name) noexcept {
  (void)name;
  const unsigned t = tick.fetch_add(1, std::memory_order_relaxed);
  if (t % 7 == 0) std::this_thread::yield();
  if (t % 61 == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
}
}  // namespace widened

TEST_F(AddressSpaceConcurrencyTest, GupFastRacingZapsAtYieldPoints) {
  if (!kYieldPointsEnabled) GTEST_SKIP() << "needs yield points (debug, asan, tsan presets)";
  constexpr std::uint64_t kPages = 64;
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  const YieldHook old = set_yield_hook(&widened::hook);
  auto pins = [&] {
    for (int i = 0; i < 4; ++i) {
      auto r = pin_user_pages(as, a, kPages, kFollWrite);
      ASSERT_TRUE(r) << r.error().to_string();
      for (std::uint64_t p = 0; p < kPages; ++p)
        ASSERT_EQ((*r)[p].pfn, d.pfn(p));
      ASSERT_EQ(unpin_user_pages(*r), Errc::ok);
    }
  };
  for (int round = 0; round < kRounds / 4; ++round) {
    race_with_zapper(d, pins);
    expect_refs_match_entries(as, d, a, kPages, 1);
    if (HasFatalFailure()) break;
  }
  (void)set_yield_hook(old);
}

// The same with FOLL_GET and FOLL_PIN on PTE-mapped 2 MiB folios (batched runs across entries,
// undone whole when one entry changed).
TEST_F(AddressSpaceConcurrencyTest, GupFastOfLargeFoliosRacingUnmapMappingRange) {
  constexpr std::uint64_t kPages = 1024;
  FakeDevice& d = device(4 * kMiB, kPmdOrder);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  auto gets = [&] {
    for (int i = 0; i < 4; ++i) {
      if (i % 2 == 0) {
        auto r = get_user_pages(as, a + page(500), 100, 0);
        ASSERT_TRUE(r) << r.error().to_string();
        ASSERT_EQ(r->size(), 100u);
        ASSERT_EQ((*r)[99].pfn, d.pfn(599));
        ASSERT_EQ(put_pages(*r), Errc::ok);
      } else {
        auto r = pin_user_pages(as, a + page(500), 100, 0);
        ASSERT_TRUE(r) << r.error().to_string();
        ASSERT_EQ(r->size(), 100u);
        ASSERT_EQ((*r)[99].pfn, d.pfn(599));
        ASSERT_EQ(unpin_user_pages(*r), Errc::ok);
      }
    }
  };
  for (int round = 0; round < kRounds; ++round) {
    race_with_zapper(d, gets);
    expect_refs_match_entries(as, d, a, kPages, 512);
    if (HasFatalFailure()) return;
  }
}

// GUP racing munmap + a fresh MAP_FIXED mmap of the same range: a pin may fail (no VMA at that
// moment) but never leaks; once everything is unpinned and the address space is gone, every
// folio is idle and the refusing memunmap (TearDown) succeeds.
TEST_F(AddressSpaceConcurrencyTest, GupRacingMunmap) {
  constexpr std::uint64_t kPages = 64;
  FakeDevice& d = device(4 * kMiB);
  {
    AddressSpace as;
    const std::uint64_t a = must_mmap(as, d, page(kPages));
    for (int round = 0; round < kRounds; ++round) {
      StartLine start;
      std::atomic<bool> stop{false};
      std::thread pinner([&] {
        start.arrive_and_wait();
        for (int i = 0; i < 8; ++i) {
          auto r = pin_user_pages(as, a, kPages, 0);
          if (!r) {
            EXPECT_EQ(r.code(), Errc::out_of_range) << r.error().to_string();
            continue;
          }
          EXPECT_EQ(unpin_user_pages(*r), Errc::ok);
        }
        stop.store(true);
      });
      std::thread remapper([&] {
        start.arrive_and_wait();
        while (!stop.load()) {
          EXPECT_EQ(as.munmap(a, page(kPages)), Errc::ok);
          must_mmap(as, d, page(kPages), a, kMapFixed);
        }
      });
      pinner.join();
      remapper.join();
      expect_refs_match_entries(as, d, a, kPages, 1);
      if (HasFatalFailure()) return;
    }
  }
  for (std::uint64_t i = 0; i < kPages; ++i)
    EXPECT_EQ(d.refcount(i), 0u);
}

// Device kill racing faults (kill_dev_dax: kill_dax, then unmap_mapping_range, §3.11): a fault
// that got its pfn before the kill and installs after the zap must not leave a stale entry —
// once the kill and zap are done and the faulter stopped, nothing is mapped (S4 "must SIGBUS").
TEST_F(AddressSpaceConcurrencyTest, KillAndZapRacingFaultsLeavesNoEntry) {
  constexpr std::uint64_t kPages = 32;
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  for (int round = 0; round < kRounds; ++round) {
    d.owner->revive();
    StartLine start;
    std::atomic<bool> killed{false};
    std::thread faulter([&] {
      start.arrive_and_wait();
      // Keep faulting until one full pass that started after the kill completed.
      bool saw_kill = false;
      for (std::uint64_t pass = 0; !saw_kill; ++pass) {
        saw_kill = killed.load();
        for (std::uint64_t i = 0; i < kPages; ++i) {
          SignalInfo s = as.handle_fault(a + page((i + pass) % kPages), false);
          if (s) {
            EXPECT_EQ(s.signal, Signal::sigbus);
          }
        }
      }
    });
    std::thread killer([&] {
      start.arrive_and_wait();
      std::this_thread::yield();
      d.owner->kill();
      (void)d.owner->unmap_mapping_range(0, 0);
      killed.store(true);
    });
    faulter.join();
    killer.join();
    ASSERT_EQ(as.nr_entries(), 0u) << "round " << round;
    for (std::uint64_t i = 0; i < kPages; ++i)
      ASSERT_EQ(d.refcount(i), 0u);
  }
}

// Reads racing zaps: the copy runs in an RCU read section through the entry it just looked up;
// data read back is always what was written.
TEST_F(AddressSpaceConcurrencyTest, ReadsRacingZapsSeeConsistentData) {
  constexpr std::uint64_t kPages = 32;
  FakeDevice& d = device(4 * kMiB);
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d, page(kPages));
  std::vector<std::uint8_t> data(page(kPages));
  for (std::uint64_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<std::uint8_t>(i * 13 + 1);
  ASSERT_FALSE(as.write(a, data.data(), data.size()));
  auto reads = [&] {
    std::vector<std::uint8_t> back(data.size());
    for (int i = 0; i < 4; ++i) {
      ASSERT_FALSE(as.read(a, back.data(), back.size()));
      ASSERT_EQ(std::memcmp(back.data(), data.data(), data.size()), 0);
    }
  };
  for (int round = 0; round < kRounds / 4; ++round) {
    race_with_zapper(d, reads);
    expect_refs_match_entries(as, d, a, kPages, 1);
    if (HasFatalFailure()) return;
  }
}

// Two processes racing on one shared page: one stores through its mapping while the other loads
// through its own, with nothing ordering them (as two `pgmap-stress --fs` workers did, one writing
// a record while the other read the page). On hardware that is legal and every aligned word lands
// whole; in the model every byte moves by a relaxed atomic access (memory/device_bytes.h), so
// ThreadSanitizer sees no race (it reported one while the copies were memcpy) and no 8-byte word
// reads torn.
TEST_F(AddressSpaceConcurrencyTest, ProcessesRacingOnASharedPageSeeWholeWords) {
  FakeDevice& d = device(4 * kMiB);
  AddressSpace writer_as;
  AddressSpace reader_as;
  const std::uint64_t wa = must_mmap(writer_as, d, page(1));
  const std::uint64_t ra = must_mmap(reader_as, d, page(1));
  ASSERT_FALSE(writer_as.handle_fault(wa, true));
  ASSERT_FALSE(reader_as.handle_fault(ra, false));  // both mapped: no fault path orders them
  constexpr int kWrites = pgmap::testutil::kSanitized ? 200 : 2000;
  StartLine start;
  std::thread writer([&] {
    start.arrive_and_wait();
    std::vector<std::uint64_t> words(kPageSize / sizeof(std::uint64_t));
    for (int i = 1; i <= kWrites; ++i) {
      for (std::size_t w = 0; w < words.size(); ++w)
        words[w] = 0x0101010101010101ull * ((static_cast<std::uint64_t>(i) + w) & 0xff);
      ASSERT_FALSE(writer_as.write(wa, words.data(), kPageSize));
    }
  });
  start.arrive_and_wait();
  std::vector<std::uint64_t> back(kPageSize / sizeof(std::uint64_t));
  int torn = 0;
  for (int i = 0; i < kWrites; ++i) {
    ASSERT_FALSE(reader_as.read(ra, back.data(), kPageSize));
    for (std::uint64_t v : back)
      torn += v != 0x0101010101010101ull * (v & 0xff);
  }
  writer.join();
  EXPECT_EQ(torn, 0);
  ASSERT_FALSE(reader_as.read(ra, back.data(), kPageSize));  // ordered by the join: the last write
  EXPECT_EQ(back[0], 0x0101010101010101ull * static_cast<std::uint64_t>(kWrites & 0xff));
  ASSERT_EQ(writer_as.munmap(wa, page(1)), Errc::ok);
  ASSERT_EQ(reader_as.munmap(ra, page(1)), Errc::ok);
}
}  // namespace
}  // namespace pgmap::mm
