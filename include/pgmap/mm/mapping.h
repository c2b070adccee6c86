// The contract between simulated address spaces (mm) and the objects that can be mapped into
// them: a device-dax character device, later an fsdax file. The kernel's vm_operations_struct
// plus the file's address_space (i_mmap) in one interface.
//
// A MappingOwner is what a VMA maps (its "file"). The address space calls it:
//   on_mmap()    when a VMA is created over it (the kernel's f_op->mmap / check_vma): may refuse;
//   fault()      when an access finds no page-table entry (vm_ops->fault / huge_fault): returns a
//                folio reference to insert at a level, FALLBACK to retry at a smaller level, or
//                SIGBUS;
//   may_split()  before munmap / mprotect / mremap cut a VMA at `addr` (vm_ops->may_split);
//   on_close()   when a VMA over it goes away (vm_ops->close).
// The owner keeps the set of VMAs that map it (i_mmap) so it can zap every user mapping of a
// range of its pages (unmap_mapping_range), e.g. when the device is unbound.
//
// The fault contract (what an owner must do; the kernel inserts the page inside the dax read
// section that kill_dax waits for, and this is the same guarantee):
//   1. Decide inside the owner's own exclusion against teardown (devdax: DaxDevice::ReadLock,
//      which kill_dax waits for; fsdax: the mapping entry lock, which truncate/unbind take) that
//      the page may be mapped, and take ONE folio reference on it there (PageRef::get, or
//      PageRef::adopt of a reference taken by get_folio) -- before leaving that section.
//   2. Return FaultResult::insert(std::move(ref)). The reference is the only thing that keeps the
//      folio and its pagemap alive once the section ends (I1); the address space never looks the
//      pfn up without it. It reads the folio's metadata only through the reference's pagemap.
//   3. The address space adopts the reference as the new page-table entry's reference (and adds a
//      mapcount); if the entry cannot be installed (another fault won, smaller entries are in the
//      way, the pfn is not aligned to the level or its folio is smaller than the level) the
//      reference is released and the next level, or a retry, follows.
//   4. A teardown that changes what fault() returns must call unmap_mapping_range() after the
//      change (after kill_dax, after truncating the range): a fault that returned before the zap
//      and installs after it sees mapping_seq() move and removes its entry again (dropping the
//      reference), so no entry survives the zap and the teardown's wait for idle folios ends.
//   An owner that returns a reference after its teardown waited for its section is a bug of the
//   owner: the teardown's folio wait (memunmap) then waits for that reference (bounded by its
//   timeout), it never reads torn-down metadata.
// fault() is called with mmap_lock held shared (or exclusive); it may block briefly (it takes the
// owner's read section and locks) but must not take mmap_lock or call back into the address space.
//
// Inserting a page-table entry keeps the owner's folio reference and adds one mapcount on the
// folio (as the kernel's vmf_insert_page_mkwrite / vmf_insert_folio_pmd do since v6.15); zapping
// it drops both.
//
// Lock order (docs/lock-order.md): AddressSpace::mmap_lock (shared for faults, exclusive for VMA
// changes) -> MappingOwner's read section / i_mmap lock -> page-table entries (atomics, no lock).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "pgmap/core/error.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/memory/pfn.h"

namespace pgmap {

class DevPagemap;

namespace mm {

class AddressSpace;
struct Vma;

// Page-table levels and the size each maps.
enum class Level : std::uint8_t { pte = 0, pmd = 1, pud = 2 };
constexpr unsigned level_order(Level l) {
  return l == Level::pte ? 0 : (l == Level::pmd ? kPmdOrder : kPudOrder);
}
constexpr std::uint64_t level_bytes(Level l) {
  return order_bytes(level_order(l));
}

// VMA flags (vm_flags). Read/write/shared are what mmap/mprotect ask for.
enum VmFlags : std::uint32_t {
  kVmRead = 1u << 0,
  kVmWrite = 1u << 1,
  kVmShared = 1u << 2,  // MAP_SHARED (VM_SHARED | VM_MAYSHARE)
  kVmDax = 1u << 3,     // maps DAX pages (vma_is_dax)
  kVmFsDax = 1u << 4,   // ... of a DAX filesystem (vma_is_fsdax: FOLL_LONGTERM is refused)
};

// What a real process would receive: the signal, its si_code, si_addr and si_addr_lsb, as
// Linux fills them.
//   SIGSEGV SEGV_MAPERR   no VMA at the address (addr_lsb 0)
//   SIGSEGV SEGV_ACCERR   a VMA is there but its protection forbids the access (addr_lsb 0)
//   SIGBUS  BUS_ADRERR    the owner cannot map the address: a removed or disabled device, a
//                         misaligned devdax VMA, an offset past the device (addr_lsb 0: Linux
//                         sets si_addr_lsb only for memory failures)
//   SIGBUS  BUS_MCEERR_AR memory failure consumed by this access (a poisoned folio): addr_lsb is
//                         log2 of the size of the mapping that failed (12, 21 or 30)
//   SIGBUS  BUS_MCEERR_AO memory failure reported asynchronously, not by an access (the same
//                         addr_lsb); no fault produces it, it exists for owners that report one.
enum class Signal : std::uint8_t { none, sigbus, sigsegv };
enum class SigCode : std::uint8_t {
  none,
  bus_adrerr,
  bus_mceerr_ar,
  bus_mceerr_ao,
  segv_maperr,
  segv_accerr,
};
const char* sig_code_name(SigCode c) noexcept;
struct SignalInfo {
  Signal signal = Signal::none;
  SigCode code = SigCode::none;
  std::uint64_t addr = 0;
  unsigned addr_lsb = 0;  // only for BUS_MCEERR_*; 0 otherwise
  std::string why;        // human-readable cause, for tests and diagnostics
  explicit operator bool() const noexcept { return signal != Signal::none; }
};

struct FaultRequest {
  std::uint64_t addr = 0;    // faulting address, aligned down to the level's size
  std::uint64_t pgoff = 0;   // page offset into the owner (vma.pgoff + (addr - vma.start) / 4 KiB)
  Level level = Level::pte;  // the level the address space tries (largest first when allowed)
  // Whether the owner's page will be written through this mapping. Never set for a MAP_PRIVATE
  // VMA: private mappings map owner pages read-only, and a write copies (see `cow`).
  bool write = false;
  // A write fault of a MAP_PRIVATE VMA (do_cow_fault): the address space asks for the page (level
  // pte, write false) only to copy its bytes into a new anonymous page; the reference is released
  // after the copy and the owner's page is never mapped writable. A hole may return its zero page.
  bool cow = false;
};

// Copy-on-write outcomes of the MAP_PRIVATE VMAs over one owner (per mapping, like the owner's
// own fault statistics). Counted by the address space.
struct CowStats {
  std::uint64_t file_copies = 0;  // write faults that copied an owner page (or its zero page)
  std::uint64_t anon_copies = 0;  // writes to an anonymous page shared after fork: copied
  std::uint64_t anon_reuses = 0;  // writes to an exclusive read-only anonymous page: made writable
  std::uint64_t pmd_splits = 0;   // a 2 MiB read-only mapping split for a 4 KiB copy
  std::uint64_t fork_copies = 0;  // pinned anonymous pages copied eagerly at fork
};

struct FaultResult {
  enum class Kind : std::uint8_t { insert, fallback, sigbus };
  Kind kind = Kind::sigbus;
  // insert: one reference on the folio to map, taken by the owner inside its read section (see
  // the fault contract above). ref.pfn() is the first pfn to map at request.addr: aligned to the
  // level's size, inside one folio of at least that size (a PTE may map one page of a larger
  // folio; a PMD needs a 2 MiB or larger folio); otherwise the address space releases the
  // reference and retries at the next smaller level. ref.refs() must be 1.
  PageRef ref;
  std::string why;  // for sigbus
  // sigbus: BUS_ADRERR (the page cannot be mapped) or BUS_MCEERR_AR (the folio is poisoned).
  SigCode code = SigCode::none;

  static FaultResult insert(PageRef ref) {
    return {Kind::insert, std::move(ref), {}, SigCode::none};
  }
  static FaultResult fallback() { return {Kind::fallback, PageRef{}, {}, SigCode::none}; }
  static FaultResult sigbus(std::string why) {
    return {Kind::sigbus, PageRef{}, std::move(why), SigCode::bus_adrerr};
  }
  // A memory failure on the folio (the access consumed poison): BUS_MCEERR_AR with addr_lsb of the
  // level that was tried.
  static FaultResult memory_failure(std::string why) {
    return {Kind::sigbus, PageRef{}, std::move(why), SigCode::bus_mceerr_ar};
  }
};

class MappingOwner {
 public:
  virtual ~MappingOwner() = default;

  virtual std::string name() const = 0;
  // Size of the owner in bytes (mappings past it fail).
  virtual std::uint64_t size() const = 0;
  // Largest page-table level this owner wants for faults (devdax: its alignment).
  virtual Level max_level() const { return Level::pte; }
  // VmFlags the owner adds to every VMA created over it (kVmDax, kVmFsDax): what the kernel
  // derives from the file (vma_is_dax / vma_is_fsdax). mmap ORs them into the new VMA's flags.
  virtual std::uint32_t vma_flags() const { return 0; }

  // A VMA is being created over [vma.pgoff, + len) of the owner and is not yet visible to
  // anyone: the owner may refuse (any Errc) or set vma.owner_data.
  virtual Errc on_mmap(Vma& vma) = 0;
  // See the fault contract at the top of this file: a FaultResult::insert carries a reference the
  // owner took inside its read section.
  virtual FaultResult fault(const Vma& vma, const FaultRequest& req) = 0;
  // munmap/mprotect/mremap want to cut `vma` at `addr`. Errc::invalid_argument refuses.
  virtual Errc may_split(const Vma& vma, std::uint64_t addr) {
    (void)vma;
    (void)addr;
    return Errc::ok;
  }
  virtual void on_close(const Vma& vma) { (void)vma; }
  // A write hits a present read-only entry of a writable VMA (vm_ops->pfn_mkwrite). `req` names
  // the entry (its address, page offset and level). True: the entry may just become writable;
  // false: the address space zaps it and faults again with a write fault (e.g. the entry maps a
  // shared zero page that the owner replaces by a real block on write).
  virtual bool pfn_mkwrite(const Vma& vma, const FaultRequest& req) {
    (void)vma;
    (void)req;
    return true;
  }

  // ---- i_mmap: which VMAs map this owner (maintained by the address spaces) ----
  void link(Vma* vma);
  void unlink(Vma* vma);
  std::size_t nr_vmas() const;
  // Zaps every user page-table entry that maps owner pages [pgoff, pgoff + npages) (npages 0:
  // to the end), in every address space, dropping their folio references and mapcounts. The VMAs
  // stay; later accesses fault again (and get what fault() says then, e.g. SIGBUS when dead).
  // Returns the number of entries zapped.
  //
  // Call it after changing what fault() returns for the range (kill, truncate): a fault that
  // called fault() before and installs its entry after the zap passed sees mapping_seq() change
  // and removes the entry again (the mmu-notifier sequence check), so no stale entry survives.
  // Holds the i_mmap lock while zapping: ops.page_free of the pagemap must not call link/unlink/
  // nr_vmas/unmap_mapping_range of the same owner.
  //
  // even_cows (Linux's argument of the same name): true zaps the anonymous copy-on-write pages
  // that MAP_PRIVATE VMAs put over the range too (truncate, device removal); false keeps them and
  // zaps only entries mapping owner pages (a zero page replaced by a block, layout breaking, hole
  // punching: "don't throw away private data").
  std::uint64_t unmap_mapping_range(std::uint64_t pgoff, std::uint64_t npages,
                                    bool even_cows = true);
  // Incremented by every unmap_mapping_range before it zaps.
  std::uint64_t mapping_seq() const noexcept {
    return invalidate_seq_.load(std::memory_order_seq_cst);
  }
  // fork / mremap of a private VMA: links `vma` and runs `copy` (which installs the VMA's entries
  // copied from elsewhere) with the i_mmap lock held, so an unmap_mapping_range zaps the range
  // either wholly before (nothing left to copy) or wholly after (the copies too). `copy` must not
  // call link/unlink/nr_vmas/unmap_mapping_range of this owner.
  void link_and_copy(Vma* vma, const std::function<void()>& copy);

  // Copy-on-write statistics of the private VMAs over this owner.
  CowStats cow_stats() const noexcept;
  enum class CowEvent : std::uint8_t { file_copy, anon_copy, anon_reuse, pmd_split, fork_copy };
  void count_cow(CowEvent e) noexcept;  // by the address space

 private:
  mutable std::mutex i_mmap_mu_;
  std::set<Vma*> i_mmap_;
  std::atomic<std::uint64_t> invalidate_seq_{0};
  std::array<std::atomic<std::uint64_t>, 5> cow_{};
};

// A virtual memory area: [start, end) of an address space mapping owner pages from pgoff.
struct Vma {
  AddressSpace* as = nullptr;
  std::uint64_t start = 0;
  std::uint64_t end = 0;
  std::uint32_t flags = 0;  // VmFlags
  std::uint64_t pgoff = 0;  // owner page offset of `start`
  std::shared_ptr<MappingOwner> owner;
  // Owner-private per-VMA state (e.g. the alloc_event allocation a devdax VMA holds).
  std::shared_ptr<void> owner_data;

  std::uint64_t len() const { return end - start; }
  std::uint64_t pgoff_of(std::uint64_t addr) const {
    return pgoff + ((addr - start) >> kPageShift);
  }
  bool shared() const { return (flags & kVmShared) != 0; }
  bool writable() const { return (flags & kVmWrite) != 0; }
};

}  // namespace mm
}  // namespace pgmap
