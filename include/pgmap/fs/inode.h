// Inode: one file of a DaxFs, and the MappingOwner its mappings fault through (the kernel's
// inode + address_space + the fsdax iomap fault path, fs/dax.c).
//
// ---- Data ---------------------------------------------------------------------------------------
// A file is a size and a block map (file page -> device block). read()/write() copy through
// DaxDevice::direct_access inside the device's read section. Pages without a block are holes: they
// read as zeros and map the shared zero page read-only.
//
// ---- Faults (§3.4) ------------------------------------------------------------------------------
// fault() runs with the invalidate lock shared (so truncate and hole punching exclude it), locks
// the file index's entry (EntryMap::grab), enters the DaxDevice read section and then:
//   * PMD (2 MiB) faults only where the 2 MiB file range is backed by one 2 MiB-aligned device
//     extent (or is a hole, for reads: the 2 MiB zero folio), else FALLBACK (the address space
//     retries with 4 KiB);
//   * a read of a hole installs a zero entry and maps the zero page read-only; a write (or a
//     write to such a zero mapping, through pfn_mkwrite) allocates a block (a 2 MiB-aligned
//     extent for a PMD write fault), zaps the zero mappings and replaces the zero entry;
//   * a block entry is associated with its folio on insertion (below) and the folio reference
//     for the page-table entry is taken under the entry lock inside the read section;
//   * past EOF, on a shut-down filesystem, or on an evicted inode: SIGBUS.
// Every outcome is counted in fault_stats() by size (PTE / PMD) and outcome.
// Writes through a mapping to a reflinked (shared) block are refused with SIGBUS; write()
// breaks the share instead (copy to a new block).
//
// ---- Association per strategy (§2.1, §3.5, DESIGN.md §4)
// ------------------------------------------ Inserting a block entry associates its folio: the
// folio is built to the entry's order (I11), and gets mapping = this inode and index = the file
// index, or, for a block shared by several files, mapping = null and a share count (I12). Deleting
// the entry disassociates it: share count down, and at the last association the folio is split back
// to order 0 with mapping, index and share cleared (bug 5.8). The pagemap references that come with
// an entry depend on the pagemap's strategy:
//   per_lookup, transition  the seed patch (dax_insert_entry / dax_delete_mapping_entry):
//                           insertion takes one pagemap reference per page of the entry
//                           (tryget_live; fails on a dying pagemap), deletion drops them;
//   alloc_event             the entry keeps the DevPagemap::Allocation that direct_access
//                           returned for its pages until it is deleted;
//   sweep, none             nothing: page references alone (sweep: checked at 0 -> 1).
//
// ---- Layout breaking (§3.7, I7) ----------------------------------------------------------------
// truncate down, punch hole, zero range and collapse range take the invalidate lock exclusive
// and call break_layout over the affected pages: unmap every user mapping of the range, scan
// every entry (waiting in place for locked ones, bug 5.5) for a busy folio — refcount above
// mapcount, whether still mapped or not (bug 5.4) — and wait for it to go idle with the
// invalidate lock dropped (so a pinner that faults does not deadlock), then scan again. Only when
// no page is busy are the entries deleted and the blocks freed. The wait is interruptible
// (BreakOptions::interrupt: Errc::interrupted) and bounded if asked (Errc::timed_out with a
// holder report); nowait returns Errc::busy (the EAGAIN of the NOWAIT mode) at the first busy
// page. Nothing is changed by a break that fails. Every folio going idle wakes the waiter
// (I16: DevPagemap wakes FS_DAX waiters at every refcount -> 0).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/fs/entry_map.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::fs {

class DaxFs;

// A pending signal for interruptible waits. raise() wakes a thread waiting with it.
class Interrupt {
 public:
  void raise() noexcept;
  void clear() noexcept { raised_.store(false, std::memory_order_seq_cst); }
  bool raised() const noexcept { return raised_.load(std::memory_order_seq_cst); }
  // For the waiter: the wait-table key it sleeps on (nullptr when not waiting).
  void set_waiting_on(const void* key) noexcept { key_.store(key, std::memory_order_seq_cst); }

 private:
  std::atomic<bool> raised_{false};
  std::atomic<const void*> key_{nullptr};
};

struct BreakOptions {
  bool nowait = false;             // Errc::busy (EAGAIN) at the first busy page, nothing waited
  Interrupt* interrupt = nullptr;  // interruptible wait: Errc::interrupted when raised
  std::optional<std::chrono::nanoseconds> timeout;  // none: no bound
};

enum class FallocMode { allocate, punch_hole, zero_range, collapse_range };

struct FallocOptions {
  bool keep_size = false;    // allocate / zero_range: do not extend the size
  bool pmd_aligned = false;  // allocate: 2 MiB-aligned device extents for 2 MiB-aligned ranges
  BreakOptions brk;          // for the modes that break layouts
};

// iomap: where a file offset lives.
struct IomapExtent {
  enum class Type { hole, mapped };
  Type type = Type::hole;
  std::uint64_t offset = 0;         // file byte offset of the extent
  std::uint64_t length = 0;         // bytes
  std::uint64_t device_offset = 0;  // mapped: device byte offset of `offset`
  Pfn pfn = 0;                      // mapped: pfn of `offset`
  bool shared = false;              // some block of the extent is reflinked
};

// FIEMAP: the file's mapped extents (maximal runs of contiguous device blocks).
struct FiemapExtent {
  std::uint64_t logical = 0;   // file byte offset
  std::uint64_t physical = 0;  // device byte offset
  std::uint64_t length = 0;
  bool shared = false;
};

// Fault outcomes (per inode, i.e. per mapping: the fs_dax trace events' view).
struct FaultStats {
  enum Outcome : std::size_t { kBlock, kZero, kFallback, kSigbus, kOutcomes };
  std::array<std::array<std::uint64_t, kOutcomes>, 2> by_size{};  // [0] PTE, [1] PMD
  std::uint64_t mkwrite_refaults = 0;  // writes to zero mappings that faulted again
  std::uint64_t pte(Outcome o) const { return by_size[0][o]; }
  std::uint64_t pmd(Outcome o) const { return by_size[1][o]; }
};

// A memory failure recorded on one of a file's pages (DaxFs::memory_failure): every file sharing
// the failed block gets its own record.
struct MemoryFailure {
  std::uint64_t page = 0;    // file page
  std::uint64_t block = 0;   // device block
  int mf_flags = 0;          // as passed to notify_failure (dax::kMfActionRequired ...)
  std::uint64_t zapped = 0;  // user page-table entries zapped: their users get SIGBUS
                             // BUS_MCEERR_AR at their next access of the page
};

// What a checker reads of an inode (debug::check_fs_invariants), copied under its locks.
struct InodeSnapshot {
  std::uint64_t ino = 0;
  std::uint64_t size = 0;
  std::uint64_t nrpages = 0;
  std::map<std::uint64_t, std::uint64_t> blocks;  // file page -> device block
  std::vector<EntryMap::Slot> entries;
  struct Alloc {
    Pfn first = 0;
    std::uint64_t count = 0;
  };
  std::map<std::uint64_t, Alloc> allocations;  // alloc_event: entry index -> its allocation
};

class Inode final : public mm::MappingOwner, public std::enable_shared_from_this<Inode> {
 public:
  enum class State { live, evicting, evicted };

  ~Inode() override;
  Inode(const Inode&) = delete;
  Inode& operator=(const Inode&) = delete;

  std::uint64_t ino() const noexcept { return ino_; }
  DaxFs& fs() const noexcept { return *fs_; }
  std::uint64_t i_size() const;
  std::uint32_t nlink() const;
  std::uint32_t opens() const;
  State state() const;

  // ---- I/O (Errc::dead: evicted or shut down; Errc::out_of_range: past the device size) ----
  // Writes allocate blocks for holes, extend the size, drop zero mappings of the written pages
  // and break the sharing of reflinked blocks. Returns the bytes written (all or error).
  Result<std::uint64_t> write(std::uint64_t off, const void* buf, std::uint64_t len);
  // Reads up to EOF; returns the bytes read (0 at or past EOF).
  Result<std::uint64_t> read(std::uint64_t off, void* buf, std::uint64_t len);

  // ---- space management (layout breaking) ----
  // Shrinks (breaking layouts past the new size, then freeing those blocks) or grows (holes).
  Status truncate(std::uint64_t new_size, const BreakOptions& opts = {});
  // allocate: blocks for [off, off + len) (zeroed); punch_hole / zero_range: the range reads as
  // zeros afterwards and its blocks are freed (offsets must be 4 KiB aligned); collapse_range:
  // removes [off, off + len) and shifts the rest down (4 KiB aligned, off + len < size).
  // Errc::invalid_argument (len 0, range overflow, collapse reaching EOF, pmd_aligned with another
  // mode than allocate), Errc::unaligned (also pmd_aligned with a range not 2 MiB aligned),
  // Errc::out_of_range, Errc::no_memory (ENOSPC), and break_layout's errors. Nothing changes on
  // error.
  Status fallocate(FallocMode mode, std::uint64_t off, std::uint64_t len,
                   const FallocOptions& opts = {});
  // Breaks the layout of file pages [first, last) (see the file comment) without deleting
  // anything; for tests and for callers that hold nothing of this inode.
  Status break_layout(std::uint64_t first, std::uint64_t last, const BreakOptions& opts = {});

  // ---- queries ----
  // The extent containing byte `off` (Errc::out_of_range at or past EOF, Errc::dead).
  Result<IomapExtent> iomap(std::uint64_t off) const;
  Result<std::vector<FiemapExtent>> fiemap() const;
  // Device block of file page `page` (nullopt: hole).
  std::optional<std::uint64_t> block_of(std::uint64_t page) const;
  FaultStats fault_stats() const;
  const EntryMap& entries() const noexcept { return entries_; }
  // mapping->nrpages: the pages covered by the block entries of the entry map (a PMD entry counts
  // 512; zero and empty entries count nothing). Maintained at entry insert and delete.
  std::uint64_t nrpages() const noexcept { return nrpages_.load(std::memory_order_acquire); }
  // The memory failures recorded on this file's pages (oldest first).
  std::vector<MemoryFailure> memory_failures() const;
  // A copy of the block map, entries, nrpages and allocations, for checkers (call at quiescent
  // points: it takes the locks one after the other).
  InodeSnapshot snapshot() const;
  // Test hook for the invariant checker's tests: corrupts nrpages by `delta`.
  void testing_adjust_nrpages(std::int64_t delta) noexcept {
    nrpages_.fetch_add(static_cast<std::uint64_t>(delta), std::memory_order_acq_rel);
  }
  // Test hook for the invariant checker's tests: exchanges the alloc_event allocation held for
  // the entry at `index` (an empty one removes it) and returns the previous one.
  DevPagemap::Allocation testing_swap_allocation(std::uint64_t index, DevPagemap::Allocation a);
  // Test hook: what removal forced past a timed-out pre-remove does to file pages [first, last):
  // zaps their mappings and deletes their entries without waiting for the holders (the blocks
  // stay the file's). A folio still held is then disassociated while referenced.
  void testing_force_delete_entries(std::uint64_t first, std::uint64_t last);

  // ---- MappingOwner ----
  std::string name() const override;
  std::uint64_t size() const override;  // the largest file size (the device size)
  mm::Level max_level() const override { return mm::Level::pmd; }
  std::uint32_t vma_flags() const override { return mm::kVmDax | mm::kVmFsDax; }
  Errc on_mmap(mm::Vma& vma) override;
  mm::FaultResult fault(const mm::Vma& vma, const mm::FaultRequest& req) override;
  bool pfn_mkwrite(const mm::Vma& vma, const mm::FaultRequest& req) override;
  void on_close(const mm::Vma& vma) override;

 private:
  friend class DaxFs;
  friend class File;
  Inode(DaxFs* fs, std::uint64_t ino, std::string name);

  struct Break;               // the state of one break_layout
  Errc check_usable() const;  // Errc::dead if evicted or shut down
  mm::FaultResult fault_locked(const mm::Vma& vma, const mm::FaultRequest& req,
                               FaultStats::Outcome& outcome);
  // Breaks [first, last) with `inv` held exclusive (dropped and retaken while waiting).
  Status break_layout_locked(std::unique_lock<std::shared_mutex>& inv, std::uint64_t first,
                             std::uint64_t last, const BreakOptions& opts, bool uninterruptible);
  // Deletes every entry in [first, last) (after a successful break).
  void delete_entries(std::uint64_t first, std::uint64_t last);
  Errc associate(std::uint64_t index, Pfn pfn, unsigned order, DevPagemap::Allocation alloc);
  void disassociate(std::uint64_t index, Entry e);
  // Removes zero entries in [first, last) and zaps their mappings (data now lives there).
  void drop_zero_entries(std::uint64_t first, std::uint64_t last);
  // Zeroes device blocks [block, block + n) through direct_access.
  Errc zero_blocks(std::uint64_t block, std::uint64_t n);
  Errc copy_block(std::uint64_t from, std::uint64_t to);
  void free_pages_locked(std::uint64_t first, std::uint64_t last);  // mu_ held
  // Final eviction: uninterruptible break of the whole file, delete entries, free blocks.
  void evict();
  void count(mm::Level level, FaultStats::Outcome o) noexcept;
  // DaxFs::memory_failure for this file: records the failure of device blocks [first, last) on
  // every page of the file mapping one and zaps those pages' mappings.
  void memory_failure(std::uint64_t first, std::uint64_t last, int mf_flags);

  DaxFs* const fs_;
  const std::uint64_t ino_;
  const std::string name_;
  // Shared: faults, read/write; exclusive: truncate, fallocate, reflink, eviction.
  mutable std::shared_mutex invalidate_lock_;
  mutable std::mutex mu_;  // everything below
  std::uint64_t size_ = 0;
  std::map<std::uint64_t, std::uint64_t> blocks_;  // file page -> device block
  std::uint32_t nlink_ = 1;
  std::uint32_t opens_ = 0;
  State state_ = State::live;
  bool eviction_queued_ = false;
  std::map<std::uint64_t, DevPagemap::Allocation> allocations_;  // alloc_event: per entry
  EntryMap entries_;
  std::array<std::array<std::atomic<std::uint64_t>, FaultStats::kOutcomes>, 2> stats_{};
  std::atomic<std::uint64_t> mkwrite_refaults_{0};
  std::atomic<std::uint64_t> nrpages_{0};
  std::vector<MemoryFailure> failures_;  // under mu_
};

}  // namespace pgmap::fs
