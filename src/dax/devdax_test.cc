// DevDax (drivers/dax/device.c, drivers/dax/bus.c): one test per rule, each naming the kernel
// function it mirrors; bad input (mapping past the device, unaligned offsets and cuts, a dead
// device) gets a typed error or the simulated signal, and changes nothing.
#include "pgmap/dax/devdax.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/address_space.h"
#include "pgmap/mm/gup.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::dax {
namespace {

using mm::AddressSpace;
using mm::FaultRequest;
using mm::FaultResult;
using mm::Level;
using mm::Signal;
using mm::Vma;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;
constexpr std::uint32_t kRW = mm::kProtRead | mm::kProtWrite;

struct Device {
  std::shared_ptr<DevPagemap> pg;
  std::shared_ptr<DevDax> dev;
  Pfn base() const { return pg->range(0).start; }
};

Device make_device(unsigned order, Strategy s, std::uint64_t bytes) {
  const std::uint64_t align = std::max(kPmdSize, order_bytes(order));
  Device d;
  d.pg = pgmap::testutil::must_memremap(pgmap::testutil::make_params(
      s, pgmap::testutil::make_backing(bytes, align), order, PagemapType::generic));
  if (!d.pg) return d;
  auto dev = DevDax::create(d.pg);
  EXPECT_TRUE(dev) << dev.error().to_string();
  if (dev) d.dev = std::move(dev).value();
  return d;
}

// Unbinds with the refuse policy: a leaked reference fails the test instead of hanging in
// ~DevDax (which waits); a device that refused is kept for the rest of the process.
void unbind_or_leak(Device& d) {
  if (!d.dev || d.dev->unbound()) return;
  MemunmapOptions o;
  o.policy = UnmapPolicy::refuse;
  auto r = d.dev->unbind(o);
  EXPECT_TRUE(r) << r.error().to_string();
  if (!r) {
    static std::mutex mu;
    static auto* leaked = new std::vector<Device>();  // never destroyed
    std::lock_guard<std::mutex> lock(mu);
    leaked->push_back(d);
  }
}

std::uint64_t must_mmap(AddressSpace& as, const Device& d, std::uint64_t len,
                        std::uint32_t prot = kRW, std::uint64_t offset = 0) {
  auto r = as.mmap(0, len, prot, mm::kMapShared, d.dev, offset);
  EXPECT_TRUE(r) << r.error().to_string();
  return r ? *r : 0;
}

// A VMA as the address space would build it, for calling fault() directly.
Vma make_vma(const Device& d, std::uint64_t start, std::uint64_t len, std::uint64_t pgoff = 0,
             std::uint32_t flags = mm::kVmRead | mm::kVmWrite | mm::kVmShared | mm::kVmDax) {
  Vma v;
  v.start = start;
  v.end = start + len;
  v.flags = flags;
  v.pgoff = pgoff;
  v.owner = d.dev;
  return v;
}

std::vector<std::uint8_t> pattern(std::uint64_t len, std::uint8_t seed) {
  std::vector<std::uint8_t> v(len);
  for (std::uint64_t i = 0; i < len; ++i)
    v[i] = static_cast<std::uint8_t>(seed + i * 13 + i / 4096);
  return v;
}

// ---- creation (dev_dax_probe)
// ---------------------------------------------------------------------

// dev_dax_probe: the pagemap is MEMORY_DEVICE_GENERIC.
TEST(DevDaxCreate, RejectsNonGenericPagemaps) {
  pgmap::testutil::MisuseCounter misuse;
  EXPECT_EQ(DevDax::create(nullptr).code(), Errc::invalid_argument);
  auto fsdax = pgmap::testutil::must_memremap(pgmap::testutil::make_params(
      Strategy::transition, pgmap::testutil::make_backing(4 * kMiB), 0, PagemapType::fs_dax));
  ASSERT_TRUE(fsdax);
  EXPECT_EQ(DevDax::create(fsdax).code(), Errc::invalid_argument);
  EXPECT_EQ(fsdax->state(), DevPagemap::State::live);  // untouched
}

// run_dax happens on a freshly mapped pagemap only.
TEST(DevDaxCreate, RejectsDeadPagemap) {
  auto pg = pgmap::testutil::must_memremap(pgmap::testutil::make_params(
      Strategy::transition, pgmap::testutil::make_backing(4 * kMiB), 0, PagemapType::generic));
  ASSERT_TRUE(pg);
  ASSERT_TRUE(pg->memunmap());
  EXPECT_EQ(DevDax::create(pg).code(), Errc::dead);
}

// dev_dax_probe sets vmemmap_shift = order_base_2(align >> PAGE_SHIFT); dev_dax_pagesize reports
// the alignment, the largest (and only) fault size.
TEST(DevDaxCreate, GeometryFollowsTheFolioOrder) {
  struct Case {
    unsigned order;
    std::uint64_t bytes;
    std::uint64_t align;
    Level level;
  };
  for (const Case& c :
       {Case{0, 4 * kMiB, kPageSize, Level::pte}, Case{kPmdOrder, 4 * kMiB, kPmdSize, Level::pmd},
        Case{kPudOrder, kGiB, kPudSize, Level::pud}}) {
    Device d = make_device(c.order, Strategy::transition, c.bytes);
    ASSERT_TRUE(d.dev);
    EXPECT_EQ(d.dev->align(), c.align);
    EXPECT_EQ(d.dev->max_level(), c.level);
    EXPECT_EQ(d.dev->size(), c.bytes);
    EXPECT_EQ(d.dev->vma_flags(), std::uint32_t{mm::kVmDax});
    unbind_or_leak(d);
  }
}

// ---- the mapping rules, per alignment
// ---------------------------------------------------------------

class DevDaxTest : public ::testing::TestWithParam<unsigned> {
 protected:
  void SetUp() override {
    d_ = make_device(GetParam(), Strategy::transition, 8 * kMiB);
    ASSERT_TRUE(d_.dev);
  }
  void TearDown() override { unbind_or_leak(d_); }

  std::uint64_t align() const { return d_.dev->align(); }
  Level level() const { return d_.dev->max_level(); }
  bool huge() const { return align() > kPageSize; }
  std::uint32_t refcount(std::uint64_t pgoff) const {
    return d_.pg->folio_ref_count(d_.base() + pgoff);
  }

  pgmap::testutil::MisuseCounter misuse_;
  Device d_;
};

// check_vma: "prevent private mappings from being established" (VM_MAYSHARE), -EINVAL.
TEST_P(DevDaxTest, MmapPrivateIsRefused) {
  AddressSpace as;
  auto ro = as.mmap(0, align(), mm::kProtRead, mm::kMapPrivate, d_.dev, 0);
  EXPECT_EQ(ro.code(), Errc::invalid_argument);
  auto rw = as.mmap(0, align(), kRW, mm::kMapPrivate, d_.dev, 0);
  EXPECT_EQ(rw.code(), Errc::invalid_argument);
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(d_.dev->nr_vmas(), 0u);
}

// check_vma: "unaligned vma" — start or end off the device alignment, -EINVAL.
TEST_P(DevDaxTest, MmapUnalignedVmaIsRefused) {
  if (!huge()) GTEST_SKIP() << "every page-aligned VMA is aligned to 4 KiB";
  AddressSpace as;
  const std::uint64_t at = AddressSpace::kMmapBase + align() + kPageSize;  // start misaligned
  EXPECT_EQ(as.mmap(at, align(), kRW, mm::kMapShared | mm::kMapFixed, d_.dev, 0).code(),
            Errc::invalid_argument);
  EXPECT_EQ(as.mmap(0, align() + kPageSize, kRW, mm::kMapShared, d_.dev, 0).code(),
            Errc::invalid_argument);  // end misaligned
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(d_.dev->nr_vmas(), 0u);
}

// Not a kernel check (dax_mmap accepts it and the faults then cannot map a folio of the
// alignment): a file offset off the alignment is refused with a typed error.
TEST_P(DevDaxTest, MmapUnalignedOffsetIsRefused) {
  if (!huge()) GTEST_SKIP() << "every page offset is aligned to 4 KiB";
  AddressSpace as;
  EXPECT_EQ(as.mmap(0, align(), kRW, mm::kMapShared, d_.dev, kPageSize).code(), Errc::unaligned);
  EXPECT_EQ(as.nr_vmas(), 0u);
}

// A mapping past the end of the device (the mmap size check against the owner's size).
TEST_P(DevDaxTest, MmapPastTheDeviceIsRefused) {
  AddressSpace as;
  EXPECT_EQ(as.mmap(0, d_.dev->size() + align(), kRW, mm::kMapShared, d_.dev, 0).code(),
            Errc::out_of_range);
  EXPECT_EQ(as.mmap(0, align(), kRW, mm::kMapShared, d_.dev, d_.dev->size()).code(),
            Errc::out_of_range);
  EXPECT_EQ(as.nr_vmas(), 0u);
  EXPECT_EQ(d_.dev->nr_vmas(), 0u);
}

// check_vma: !dax_alive -> -ENXIO (dax_mmap takes the read lock for it).
TEST_P(DevDaxTest, MmapOfDeadDeviceIsRefused) {
  ASSERT_EQ(d_.dev->dax_device().kill(), Errc::ok);
  AddressSpace as;
  EXPECT_EQ(as.mmap(0, align(), kRW, mm::kMapShared, d_.dev, 0).code(), Errc::dead);
  EXPECT_EQ(as.nr_vmas(), 0u);
}

// __dev_dax_{pte,pmd,pud}_fault + vmf_insert_{page_mkwrite,folio_pmd,folio_pud}: one entry of the
// alignment's size mapping the folio at dax_pgoff_to_phys(pgoff), holding one reference.
TEST_P(DevDaxTest, FaultMapsOneFolioOfTheAlignment) {
  AddressSpace as;
  const std::uint64_t off = 2 * align();
  const std::uint64_t a = must_mmap(as, d_, 2 * align(), kRW, off);
  const std::uint64_t inner = huge() ? 5 * kPageSize : 0;  // a page inside the second folio
  const auto data = pattern(kPageSize, 7);
  ASSERT_FALSE(as.write(a + align() + inner, data.data(), data.size()));
  auto e = as.lookup(a + align() + inner);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->level, level());
  EXPECT_EQ(e->addr, a + align());
  const std::uint64_t folio_pgoff = (off + align()) >> kPageShift;
  EXPECT_EQ(e->pfn, d_.base() + folio_pgoff);
  EXPECT_EQ(e->pgmap, d_.pg.get());
  EXPECT_EQ(refcount(folio_pgoff), 1u);
  EXPECT_EQ(as.nr_entries(), 1u);
  // The bytes landed in the device at that page.
  const Pfn page = d_.base() + folio_pgoff + (inner >> kPageShift);
  EXPECT_EQ(std::memcmp(d_.pg->address_of(page), data.data(), data.size()), 0);
}

// __dev_dax_pmd_fault / __dev_dax_pud_fault: "fault_size < dev_dax->align" -> VM_FAULT_SIGBUS
// (e.g. a PTE fault on a 2 MiB device), and the pte handler's "alignment > fault size" check.
TEST_P(DevDaxTest, FaultSmallerThanTheAlignmentIsSigbus) {
  if (!huge()) GTEST_SKIP() << "nothing is smaller than 4 KiB";
  Vma v = make_vma(d_, AddressSpace::kMmapBase, 2 * align());
  FaultResult r = d_.dev->fault(v, FaultRequest{v.start, 0, Level::pte, false});
  EXPECT_EQ(r.kind, FaultResult::Kind::sigbus);
  EXPECT_NE(r.why.find("fault size"), std::string::npos) << r.why;
  EXPECT_EQ(refcount(0), 0u);
}

// "fault_size > dev_dax->align" -> VM_FAULT_FALLBACK: the address space retries smaller.
TEST_P(DevDaxTest, FaultLargerThanTheAlignmentFallsBack) {
  const Level bigger = level() == Level::pte ? Level::pmd : Level::pud;
  const std::uint64_t len = mm::level_bytes(bigger);
  Vma v = make_vma(d_, AddressSpace::kMmapBase, len);
  FaultResult r = d_.dev->fault(v, FaultRequest{v.start, 0, bigger, false});
  EXPECT_EQ(r.kind, FaultResult::Kind::fallback);
}

// check_vma is repeated at fault time: an unaligned or private VMA gets SIGBUS.
TEST_P(DevDaxTest, FaultOnVmaThatFailsCheckVmaIsSigbus) {
  if (huge()) {
    Vma unaligned = make_vma(d_, AddressSpace::kMmapBase + kPageSize, align());
    FaultResult r = d_.dev->fault(
        unaligned, FaultRequest{AddressSpace::kMmapBase + align(), 0, level(), false});
    EXPECT_EQ(r.kind, FaultResult::Kind::sigbus);
  }
  Vma priv = make_vma(d_, AddressSpace::kMmapBase, align(), 0,
                      mm::kVmRead | mm::kVmDax);  // no kVmShared
  FaultResult r = d_.dev->fault(priv, FaultRequest{priv.start, 0, level(), false});
  EXPECT_EQ(r.kind, FaultResult::Kind::sigbus);
  EXPECT_EQ(refcount(0), 0u);
}

// "if we are outside of the VMA" -> VM_FAULT_SIGBUS.
TEST_P(DevDaxTest, FaultOutsideTheVmaIsSigbus) {
  Vma v = make_vma(d_, AddressSpace::kMmapBase, align());
  FaultResult r =
      d_.dev->fault(v, FaultRequest{v.end, 1ull << (level_order(level())), level(), false});
  EXPECT_EQ(r.kind, FaultResult::Kind::sigbus);
}

// dax_pgoff_to_phys returns -1 past the device -> VM_FAULT_SIGBUS.
TEST_P(DevDaxTest, FaultPastTheDeviceIsSigbus) {
  Vma v = make_vma(d_, AddressSpace::kMmapBase, align(), d_.dev->size() >> kPageShift);
  FaultResult r =
      d_.dev->fault(v, FaultRequest{v.start, d_.dev->size() >> kPageShift, level(), false});
  EXPECT_EQ(r.kind, FaultResult::Kind::sigbus);
}

// dax_set_mapping: the folio head records the mapping and the file index, once.
TEST_P(DevDaxTest, FaultRecordsMappingOnTheFolioHead) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * align(), kRW, align());
  std::uint8_t byte = 0;
  ASSERT_FALSE(as.read(a + align(), &byte, 1));
  const std::uint64_t pgoff = (2 * align()) >> kPageShift;
  PageArray* arr = d_.pg->array_for(d_.base() + pgoff);
  const std::uint64_t head = arr->head_of(arr->index_of(d_.base() + pgoff));
  EXPECT_EQ(arr->mapping(head).load(), static_cast<const mm::MappingOwner*>(d_.dev.get()));
  EXPECT_EQ(arr->index_or_share(head).load(), pgoff);
}

// dev_dax_huge_fault under dax_read_lock: a dead device maps nothing (SIGBUS BUS_ADRERR,
// si_addr_lsb 0 as Linux for a non-memory-failure SIGBUS), and no reference is taken.
TEST_P(DevDaxTest, FaultOnDeadDeviceIsSigbusAndMapsNothing) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, align());
  ASSERT_EQ(d_.dev->dax_device().kill(), Errc::ok);
  std::uint8_t byte = 1;
  mm::SignalInfo sig = as.write(a, &byte, 1);
  EXPECT_EQ(sig.signal, Signal::sigbus);
  EXPECT_EQ(sig.addr, a);
  EXPECT_EQ(sig.code, mm::SigCode::bus_adrerr);
  EXPECT_EQ(sig.addr_lsb, 0u);
  EXPECT_EQ(as.nr_entries(), 0u);
  EXPECT_EQ(refcount(0), 0u);
}

// A fault on a folio with a recorded memory failure consumes poison: SIGBUS BUS_MCEERR_AR with
// si_addr_lsb of the mapping size (12, 21 or 30), nothing mapped, no reference taken.
TEST_P(DevDaxTest, FaultOnPoisonedFolioIsMceerrWithAddrLsb) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * align());
  PageArray* arr = d_.pg->array_for(d_.base());
  ASSERT_NE(arr, nullptr);
  const std::uint64_t pages = align() >> kPageShift;
  arr->flags(arr->head_of(arr->index_of(d_.base() + pages))).fetch_or(kPagePoisoned);
  std::uint8_t byte = 1;
  EXPECT_FALSE(as.write(a, &byte, 1));  // the first folio is fine
  mm::SignalInfo sig = as.read(a + align() + 8, &byte, 1);
  EXPECT_EQ(sig.signal, Signal::sigbus);
  EXPECT_EQ(sig.code, mm::SigCode::bus_mceerr_ar);
  EXPECT_EQ(sig.addr, a + align() + 8);
  EXPECT_EQ(sig.addr_lsb, kPageShift + level_order(level()));
  EXPECT_EQ(as.nr_entries(), 1u);
  EXPECT_EQ(refcount(pages), 0u);
  arr->flags(arr->head_of(arr->index_of(d_.base() + pages)))
      .fetch_and(static_cast<std::uint8_t>(~kPagePoisoned));
}

// dev_dax_may_split: munmap, mprotect and mremap may not cut a VMA off the alignment (-EINVAL);
// nothing changes. Aligned cuts are fine.
TEST_P(DevDaxTest, MaySplitRefusesUnalignedCuts) {
  if (!huge()) GTEST_SKIP() << "every page boundary is aligned to 4 KiB";
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * align());
  const auto data = pattern(2 * align(), 3);
  ASSERT_FALSE(as.write(a, data.data(), data.size()));
  const std::uint64_t entries = as.nr_entries();

  EXPECT_EQ(as.munmap(a + kPageSize, kPageSize), Errc::invalid_argument);
  EXPECT_EQ(as.mprotect(a, kPageSize, mm::kProtRead), Errc::invalid_argument);
  EXPECT_EQ(as.mremap(a, 2 * align(), kPageSize, 0).code(), Errc::invalid_argument);
  EXPECT_EQ(as.nr_vmas(), 1u);
  EXPECT_EQ(as.nr_entries(), entries);
  auto v = as.find_vma(a);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->end - v->start, 2 * align());
  std::vector<std::uint8_t> back(data.size());
  ASSERT_FALSE(as.read(a, back.data(), back.size()));
  EXPECT_EQ(back, data);

  EXPECT_EQ(as.munmap(a + align(), align()), Errc::ok);  // an aligned cut
  EXPECT_EQ(as.nr_vmas(), 1u);
  EXPECT_EQ(as.find_vma(a)->end, a + align());
}

// No read()/write() on the device: the bytes are reached through mappings, shared by every
// process mapping them (MAP_SHARED).
TEST_P(DevDaxTest, MappingsShareTheDeviceBytes) {
  AddressSpace p1;
  AddressSpace p2;
  const std::uint64_t a1 = must_mmap(p1, d_, 2 * align());
  const std::uint64_t a2 = must_mmap(p2, d_, 2 * align());
  const auto data = pattern(2 * align(), 42);
  ASSERT_FALSE(p1.write(a1, data.data(), data.size()));
  std::vector<std::uint8_t> back(data.size());
  ASSERT_FALSE(p2.read(a2, back.data(), back.size()));
  EXPECT_EQ(back, data);
  EXPECT_EQ(std::memcmp(d_.pg->address_of(d_.base()), data.data(), data.size()), 0);
  // One reference and one mapcount per mapping of each folio.
  EXPECT_EQ(refcount(0), 2u);
}

// kill_dev_dax: kill_dax + unmap_mapping_range(0, 0); then the pagemap goes (devm release):
// every old mapping SIGBUSes, no new mapping can be made.
TEST_P(DevDaxTest, UnbindRevokesEveryMapping) {
  AddressSpace p1;
  AddressSpace p2;
  const std::uint64_t a1 = must_mmap(p1, d_, 2 * align());
  const std::uint64_t a2 = must_mmap(p2, d_, align(), kRW, align());
  std::uint8_t byte = 9;
  ASSERT_FALSE(p1.write(a1, &byte, 1));
  ASSERT_FALSE(p2.write(a2, &byte, 1));
  ASSERT_GT(p1.nr_entries() + p2.nr_entries(), 0u);

  auto r = d_.dev->unbind();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_TRUE(d_.dev->unbound());
  EXPECT_TRUE(d_.dev->dax_device().killed());
  EXPECT_EQ(d_.pg->state(), DevPagemap::State::dead);
  EXPECT_EQ(p1.nr_entries(), 0u);
  EXPECT_EQ(p2.nr_entries(), 0u);
  EXPECT_EQ(p1.read(a1, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(p1.write(a1 + align(), &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(p2.read(a2, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(p1.nr_entries(), 0u);
  EXPECT_EQ(p1.mmap(0, align(), kRW, mm::kMapShared, d_.dev, 0).code(), Errc::dead);
  EXPECT_EQ(d_.dev->unbind().code(), Errc::already_dead);
  // The VMAs themselves stay until munmap.
  EXPECT_EQ(p1.nr_vmas(), 1u);
  EXPECT_EQ(p1.munmap(a1, 2 * align()), Errc::ok);
}

// The device-dax driver's remove runs when the device goes: ~DevDax unbinds.
TEST_P(DevDaxTest, DestroyingTheDeviceUnbindsIt) {
  {
    AddressSpace as;
    const std::uint64_t a = must_mmap(as, d_, align());
    std::uint8_t byte = 1;
    ASSERT_FALSE(as.write(a, &byte, 1));
  }
  std::shared_ptr<DevPagemap> pg = d_.pg;
  d_.dev.reset();
  EXPECT_EQ(pg->state(), DevPagemap::State::dead);
}

// The pagemap memunmapped directly, behind the device's back: unbind has nothing to tear down and
// returns Errc::already_dead having changed nothing (device alive, mappings kept, not unbound).
TEST_P(DevDaxTest, UnbindAfterDirectMemunmapIsAlreadyDeadAndChangesNothing) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, align());
  ASSERT_TRUE(d_.pg->memunmap());
  ASSERT_EQ(d_.pg->state(), DevPagemap::State::dead);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(d_.dev->unbind().code(), Errc::already_dead);
    EXPECT_TRUE(d_.dev->dax_device().alive());
    EXPECT_FALSE(d_.dev->unbound());
    EXPECT_EQ(as.nr_vmas(), 1u);
  }
  // The device is still alive, so a new mapping is still accepted (its faults SIGBUS: the
  // pagemap is gone).
  auto b = as.mmap(0, align(), kRW, mm::kMapShared, d_.dev, 0);
  EXPECT_TRUE(b) << b.error().to_string();
  std::uint8_t byte = 1;
  EXPECT_EQ(as.write(a, &byte, 1).signal, Signal::sigbus);
  EXPECT_EQ(as.munmap(a, align()), Errc::ok);
  if (b) {
    EXPECT_EQ(as.munmap(*b, align()), Errc::ok);
  }
  d_.dev.reset();  // ~DevDax: its unbind is already_dead again, and changes nothing
}

INSTANTIATE_TEST_SUITE_P(Align, DevDaxTest, ::testing::Values(0u, kPmdOrder),
                         [](const ::testing::TestParamInfo<unsigned>& i) {
                           return i.param == 0 ? std::string("4K") : std::string("2M");
                         });

// ---- alloc_event: the VMA's allocation
// --------------------------------------------------------------

class DevDaxAllocEventTest : public ::testing::Test {
 protected:
  void SetUp() override {
    d_ = make_device(kPmdOrder, Strategy::alloc_event, 8 * kMiB);
    ASSERT_TRUE(d_.dev);
  }
  void TearDown() override { unbind_or_leak(d_); }
  std::int64_t pagemap_refs() const { return d_.pg->holders().pagemap_refs; }
  void touch(AddressSpace& as, std::uint64_t addr) {
    std::uint8_t b = 1;
    ASSERT_FALSE(as.write(addr, &b, 1));
  }

  pgmap::testutil::MisuseCounter misuse_;
  Device d_;
};

// The first fault's direct_access is the VMA's allocation; later faults reuse it; munmap of the
// last piece releases it.
TEST_F(DevDaxAllocEventTest, VmaKeepsTheAllocationOfItsFirstFault) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 3 * kPmdSize);
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(pagemap_refs(), 0);
  touch(as, a);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  EXPECT_EQ(pagemap_refs(), 1);
  touch(as, a + kPmdSize);
  touch(as, a + 2 * kPmdSize);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  EXPECT_EQ(pagemap_refs(), 1);

  const std::uint64_t b = must_mmap(as, d_, kPmdSize, kRW, 3 * kPmdSize);
  touch(as, b);
  EXPECT_EQ(d_.dev->vma_allocations(), 2u);
  EXPECT_EQ(pagemap_refs(), 2);

  ASSERT_EQ(as.munmap(a, 3 * kPmdSize), Errc::ok);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  EXPECT_EQ(pagemap_refs(), 1);
  ASSERT_EQ(as.munmap(b, kPmdSize), Errc::ok);
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(pagemap_refs(), 0);
  EXPECT_EQ(d_.dev->lingering_allocations(), 0u);
}

// The release check is conservative: a folio the closing VMA mapped that is still referenced —
// here by another VMA's mapping, which its own allocation covers — keeps the allocation until a
// later close (or unbind) finds the folio idle.
TEST_F(DevDaxAllocEventTest, AllocationOverAFolioStillMappedElsewhereLingers) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * kPmdSize);
  const std::uint64_t b = must_mmap(as, d_, kPmdSize, kRW, kPmdSize);
  touch(as, a + kPmdSize);
  touch(as, b);  // the same folio
  ASSERT_EQ(as.munmap(a, 2 * kPmdSize), Errc::ok);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  EXPECT_EQ(d_.dev->lingering_allocations(), 1u);
  ASSERT_EQ(as.munmap(b, kPmdSize), Errc::ok);
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(d_.dev->lingering_allocations(), 0u);
  EXPECT_EQ(pagemap_refs(), 0);
}

// Pieces (split, mremap) and fork copies of a VMA share its allocation; it goes with the last.
TEST_F(DevDaxAllocEventTest, PiecesAndForkCopiesShareTheAllocation) {
  auto parent = std::make_unique<AddressSpace>();
  const std::uint64_t a = must_mmap(*parent, d_, 4 * kPmdSize);
  touch(*parent, a);
  ASSERT_EQ(parent->munmap(a + kPmdSize, kPmdSize), Errc::ok);  // two pieces now
  EXPECT_EQ(parent->nr_vmas(), 2u);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  touch(*parent, a + 2 * kPmdSize);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);

  std::unique_ptr<AddressSpace> child = parent->fork();
  touch(*child, a + 3 * kPmdSize);
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);
  parent.reset();
  EXPECT_EQ(d_.dev->vma_allocations(), 1u);  // the child's copies still map it
  EXPECT_EQ(pagemap_refs(), 1);
  child.reset();
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(pagemap_refs(), 0);
}

// A pin taken through the VMA outlives the munmap: the allocation that vouched for it lingers
// with the device until the pinned folio is idle, then the next VMA close gives it back.
TEST_F(DevDaxAllocEventTest, PinOutlivingTheMappingKeepsTheAllocation) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * kPmdSize);
  auto pins = mm::pin_user_pages(as, a + kPmdSize, 1, mm::kFollLongterm | mm::kFollWrite);
  ASSERT_TRUE(pins) << pins.error().to_string();
  ASSERT_EQ(as.munmap(a, 2 * kPmdSize), Errc::ok);
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(d_.dev->lingering_allocations(), 1u);
  EXPECT_EQ(pagemap_refs(), 1);
  ASSERT_EQ(mm::unpin_user_pages(*pins), Errc::ok);
  EXPECT_EQ(d_.dev->lingering_allocations(), 1u);  // nobody looked yet
  const std::uint64_t b = must_mmap(as, d_, kPmdSize);
  ASSERT_EQ(as.munmap(b, kPmdSize), Errc::ok);  // a VMA close reaps it
  EXPECT_EQ(d_.dev->lingering_allocations(), 0u);
  EXPECT_EQ(pagemap_refs(), 0);
}

// unbind's zap releases the VMAs' allocations (the VMAs themselves stay, their faults SIGBUS).
TEST_F(DevDaxAllocEventTest, UnbindReleasesTheVmaAllocations) {
  AddressSpace as;
  const std::uint64_t a = must_mmap(as, d_, 2 * kPmdSize);
  touch(as, a);
  ASSERT_EQ(d_.dev->vma_allocations(), 1u);
  auto r = d_.dev->unbind();
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(d_.dev->vma_allocations(), 0u);
  EXPECT_EQ(d_.pg->state(), DevPagemap::State::dead);
  std::uint8_t b = 0;
  EXPECT_EQ(as.read(a, &b, 1).signal, Signal::sigbus);
  EXPECT_EQ(as.nr_vmas(), 1u);
}

// Regression (pgmap-stress known.pte_table_blocks_pmd): a 4 KiB devdax mapping, unmapped, left its
// emptied PTE table behind, so a 2 MiB-aligned devdax mapped at the same address could not install
// a PMD, and its 4 KiB fallback is refused (__dev_dax_pte_fault: alignment > fault size): SIGBUS
// on a live device. munmap frees emptied tables now.
TEST(DevDaxTables, PmdDeviceMapsWhereA4KMappingWasUnmapped) {
  pgmap::testutil::MisuseCounter misuse;
  Device small = make_device(0, Strategy::transition, 4 * kMiB);
  Device huge = make_device(kPmdOrder, Strategy::transition, 4 * kMiB);
  ASSERT_TRUE(small.dev && huge.dev);
  {
    AddressSpace as;
    const std::uint64_t at = AddressSpace::kMmapBase + 2 * kMiB;
    ASSERT_TRUE(as.mmap(at, 16 * kPageSize, kRW, mm::kMapShared | mm::kMapFixed, small.dev, 0));
    std::uint8_t b = 1;
    ASSERT_FALSE(as.write(at + 3 * kPageSize, &b, 1));
    ASSERT_EQ(as.munmap(at, 16 * kPageSize), Errc::ok);
    ASSERT_TRUE(as.mmap(at, kPmdSize, kRW, mm::kMapShared | mm::kMapFixed, huge.dev, 0));
    mm::SignalInfo sig = as.read(at + 3 * kPageSize, &b, 1);
    EXPECT_FALSE(sig) << sig.why;
    auto e = as.lookup(at);
    ASSERT_TRUE(e);
    EXPECT_EQ(e->level, Level::pmd);
  }
  unbind_or_leak(small);
  unbind_or_leak(huge);
}

}  // namespace
}  // namespace pgmap::dax
