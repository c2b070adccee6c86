// AddressSpace: one simulated process's memory map (the kernel's mm_struct): VMAs, a four-level
// page table mapping virtual pages to pfns at PTE, PMD (2 MiB) and PUD (1 GiB) level, and the
// operations that change them: mmap, munmap, mprotect, mremap, fork. Accesses through read()/
// write() walk the page table, fault missing entries in through the VMA's owner, and copy real
// bytes of the backing, so data can be checked end to end. A fault that must fail returns the
// signal a real process would get (SIGSEGV outside any VMA or on a protection violation; SIGBUS
// when the owner refuses) — never a crash of the library.
//
// Page table. Entries are atomics in lazily allocated 512-entry tables, so a lookup (and GUP's
// fast path) walks it without taking mmap_lock, like gup-fast. munmap (and the unmap of MAP_FIXED
// and mremap) frees the emptied tables of a range no VMA covers any more, as free_pgtables does,
// so a later 2 MiB or 1 GiB mapping there gets its huge entry; the memory is deleted only after an
// RCU grace period (lockless walkers run in read sections). An entry maps one folio: its pfn, its
// level, and whether it is writable.
//
// References. Installing an entry takes one folio reference and one mapcount on the folio through
// its pagemap; zapping it (munmap, unmap_mapping_range, mprotect to PROT_NONE — a downgrade to
// read-only only write-protects — address space destruction) drops both. rmap: the number of
// entries mapping a folio is its mapcount; the owner's VMA list (MappingOwner::link) finds them.
//
// MAP_PRIVATE (copy-on-write, docs/mm.md). A private VMA maps its owner's pages read-only (PTE or
// PMD as a shared read would). The first write to a 4 KiB page copies it into an anonymous page
// (AnonPool: memory of the process, not of the owner's device) mapped writable in its place; a
// read-only PMD is split first (zapped; the written page is copied, the others refault at 4 KiB);
// a hole's zero page becomes a zeroed anonymous page. Copies are invisible to the owner (its
// read(), other mappings) and later writes to the file are not seen through a copied page, but
// are through pages not yet copied. The owner's fault is asked with write false and cow true and
// its pfn_mkwrite is never called for private VMAs. Anonymous pages are freed when their last
// entry goes (munmap, exit) and their last GUP reference is dropped; unmap_mapping_range (truncate,
// device removal) zaps them too (Linux's truncate: unmap_mapping_range with even_cows).
//
// fork(): the child gets copies of the VMAs; shared mappings are shared, not copied, and their
// entries are not copied either (the child faults them in again, as Linux does for shared file
// mappings). Private mappings copy their page table: owner pages stay shared read-only; anonymous
// pages are shared (one more reference and mapcount) and write-protected on both sides, and the
// next write of either side copies (or reuses once the page is no longer shared). An anonymous
// page with a DMA pin is copied for the child at fork (the parent keeps it writable). mremap moves
// anonymous pages with the VMA. Not done: mprotect(PROT_NONE) of a private range zaps its entries,
// anonymous copies included (a later access reads the owner's bytes again).
//
// Locking: mmap_lock (std::shared_mutex) is held shared by faults and GUP's slow path, exclusive
// by VMA changes. Lock order: mmap_lock -> owner's i_mmap lock. Thread-safe throughout.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <span>

#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {

namespace detail {
struct GupAccess;  // GUP's batched walk reads the page table directly (src/mm/gup.cc)
}  // namespace detail

// mmap prot and flags (the subset the DAX tests need).
enum Prot : std::uint32_t { kProtNone = 0, kProtRead = 1, kProtWrite = 2 };
enum MapFlags : std::uint32_t {
  kMapShared = 1u << 0,
  kMapPrivate = 1u << 1,
  kMapFixed = 1u << 2,  // place exactly at addr, replacing what is there
};
enum MremapFlags : std::uint32_t { kMremapMayMove = 1u << 0, kMremapFixed = 1u << 1 };

// A present page-table entry as seen by a lookup.
struct PtEntry {
  std::uint64_t addr = 0;  // virtual address the entry starts at (aligned to its level)
  Pfn pfn = 0;             // pfn mapped at `addr` (the folio head unless a PTE maps a tail page)
  Level level = Level::pte;
  bool writable = false;
  DevPagemap* pgmap = nullptr;
  bool anon = false;  // an anonymous page (copy-on-write copy, AnonPool), not an owner page
};

class AddressSpace {
 public:
  // Virtual addresses handed out by mmap without kMapFixed start here and are 1 GiB aligned.
  static constexpr std::uint64_t kMmapBase = std::uint64_t{1} << 40;
  static constexpr std::uint64_t kTaskSize = std::uint64_t{1} << 47;

  AddressSpace();
  // Zaps every entry (dropping references) and closes every VMA.
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  // Errc::invalid_argument (len 0 or not page aligned, addr unaligned with kMapFixed, neither or
  // both of shared/private), Errc::out_of_range (past the owner's size or kTaskSize), or the
  // owner's refusal (devdax: MAP_PRIVATE, misaligned). Writable MAP_PRIVATE is copy-on-write.
  // Returns the start address.
  Result<std::uint64_t> mmap(std::uint64_t addr, std::uint64_t len, std::uint32_t prot,
                             std::uint32_t flags, std::shared_ptr<MappingOwner> owner,
                             std::uint64_t offset);
  // Unmaps [addr, addr + len), splitting VMAs at the edges (owner's may_split may refuse:
  // Errc::invalid_argument, nothing changed). Unmapping a hole is not an error.
  Errc munmap(std::uint64_t addr, std::uint64_t len);
  // Changes protection; RO -> RW lets later writes succeed (on a shared mapping existing
  // read-only entries are upgraded on the next write fault; on a private one the next write
  // copies). Splits as munmap does.
  Errc mprotect(std::uint64_t addr, std::uint64_t len, std::uint32_t prot);
  // Moves/resizes [old_addr, old_addr + old_len) (must lie in one VMA). With kMremapFixed the
  // destination [new_addr, new_addr + new_len) is unmapped first. The moved piece keeps its
  // owner and page offset; its entries are zapped (they fault in again at the new place).
  Result<std::uint64_t> mremap(std::uint64_t old_addr, std::uint64_t old_len, std::uint64_t new_len,
                               std::uint32_t flags, std::uint64_t new_addr = 0);
  std::unique_ptr<AddressSpace> fork();

  // ---- access through the simulation ----
  // Copies bytes, faulting pages in as needed. On a signal, the bytes before the failing page
  // were copied and the SignalInfo says where and why.
  SignalInfo read(std::uint64_t addr, void* buf, std::uint64_t len);
  SignalInfo write(std::uint64_t addr, const void* buf, std::uint64_t len);
  // Resolves one fault at addr (as the CPU would on a missing or read-only entry).
  SignalInfo handle_fault(std::uint64_t addr, bool write);

  // ---- page table ----
  // Lockless lookup of the entry covering addr.
  std::optional<PtEntry> lookup(std::uint64_t addr) const noexcept;
  // The VMA covering addr (copy), or nullopt. Takes mmap_lock shared.
  std::optional<Vma> find_vma(std::uint64_t addr) const;
  // For a caller that already holds mmap_lock() (shared or exclusive), as GUP's slow path does
  // across its VMA checks, the fault and taking the page (std::shared_mutex cannot be re-entered).
  // The pointer is valid while the lock is held.
  const Vma* find_vma_locked(std::uint64_t addr) const;
  SignalInfo handle_fault_locked(std::uint64_t addr, bool write);
  std::size_t nr_vmas() const;
  std::uint64_t nr_entries() const noexcept;  // present entries, all levels
  // Page tables below the root currently in use (diagnostics and tests: munmap frees emptied ones).
  std::uint64_t nr_page_tables() const noexcept;

  // Zaps entries of `vma` in [start, end) (used by MappingOwner::unmap_mapping_range); with
  // even_cows false, anonymous (copy-on-write) pages stay. Returns the number of entries zapped.
  std::uint64_t zap_range(const Vma& vma, std::uint64_t start, std::uint64_t end,
                          bool even_cows = true);

  std::shared_mutex& mmap_lock() const noexcept { return mmap_lock_; }
  // Diagnostics (the invariant checker, pgmap::debug): calls fn for every present page-table
  // entry, in address order, with the VMA covering its address (nullptr if none: a stale entry).
  // Takes mmap_lock shared; fn must not call back into this address space. Read-only.
  void for_each_entry(const std::function<void(const PtEntry&, const Vma*)>& fn) const;

 private:
  friend struct detail::GupAccess;
  struct Impl;  // VMAs and the page table (src/mm/address_space.cc)
  std::unique_ptr<Impl> impl_;
  mutable std::shared_mutex mmap_lock_;
};

}  // namespace pgmap::mm
