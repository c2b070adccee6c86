// Private to src/mm: the lockless four-level page table of an AddressSpace.
//
// Layout. Four levels of 512-entry tables (PGD -> PUD -> PMD -> PTE, 9 address bits each above
// the 12-bit page offset), like x86-64 with 4-level paging: 48-bit virtual addresses. A table is
// allocated lazily when the first entry below it is installed and published with a CAS on the
// entry above.
//
// Freeing tables (free_pgtables). munmap frees the tables that lie wholly inside a range no VMA
// covers any more and whose entries are all empty (free_empty_tables), so a later huge mapping at
// the same address can put a PMD / PUD leaf in the slot. The slot above is cleared first; the table
// itself is retired and deleted only after an RCU grace period (reclaim), because lockless walkers
// (lookup, slots for gup-fast, for_each_present) run inside read sections and may still be reading
// it. Installers and zappers never meet a table being freed: free_empty_tables' caller holds
// mmap_lock exclusive (no fault installs) and no VMA covers the range (no rmap zap walks it).
//
// Entries. One std::atomic<uint64_t> per slot, encoded with the masks below: a table entry is the
// child table's address | kPresent; a leaf maps one folio-backed range of level_bytes(level):
// pfn << kFrameShift | level | kLeaf | kPresent [| kWrite]. A slot holds a leaf at depth 2 (PUD,
// 1 GiB), 1 (PMD, 2 MiB) or 0 (PTE, 4 KiB). Next to each entry the table keeps the leaf's
// DevPagemap*: the pagemap cannot be looked up from the pfn at zap time (it may be dying and
// lookups fail then), and the mapping's folio reference keeps it alive (I1).
//
// kLocked. A slot is briefly kLocked (not present) while one thread installs or zaps a leaf in it:
// the locker alone changes the slot's pagemap pointer, so a leaf and its pagemap always match. A
// thread that finds a slot locked waits (a few stores) and re-reads it.
//
// References. install() moves the caller's folio reference into the entry and adds one mapcount to
// the folio's head; zapping a leaf removes the mapcount and drops the reference (put_folio). Only
// the thread that took a present leaf out of its slot drops them, so concurrent zaps (munmap,
// unmap_mapping_range) of one entry drop exactly one reference.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm {

namespace pte {

inline constexpr std::uint64_t kPresent = std::uint64_t{1} << 0;  // maps something
inline constexpr std::uint64_t kWrite = std::uint64_t{1} << 1;    // leaf: writable
inline constexpr std::uint64_t kLeaf = std::uint64_t{1} << 2;     // leaf (huge above PTE level)
inline constexpr unsigned kLevelShift = 3;                        // leaf: its Level
inline constexpr std::uint64_t kLevelMask = std::uint64_t{3} << kLevelShift;
inline constexpr std::uint64_t kLocked = std::uint64_t{1} << 5;  // being installed or zapped
inline constexpr unsigned kFrameShift = 12;                      // pfn or table address
inline constexpr std::uint64_t kFrameMask = ~((std::uint64_t{1} << kFrameShift) - 1);

constexpr bool present(std::uint64_t e) {
  return (e & kPresent) != 0;
}
constexpr bool leaf(std::uint64_t e) {
  return (e & (kPresent | kLeaf)) == (kPresent | kLeaf);
}
constexpr bool locked(std::uint64_t e) {
  return (e & kLocked) != 0;
}
constexpr bool writable(std::uint64_t e) {
  return (e & kWrite) != 0;
}
constexpr Pfn pfn(std::uint64_t e) {
  return (e & kFrameMask) >> kFrameShift;
}
constexpr Level level(std::uint64_t e) {
  return static_cast<Level>((e & kLevelMask) >> kLevelShift);
}
constexpr std::uint64_t make_leaf(Pfn pfn, Level level, bool writable) {
  return (pfn << kFrameShift) | (std::uint64_t{static_cast<std::uint8_t>(level)} << kLevelShift) |
         kLeaf | kPresent | (writable ? kWrite : 0);
}

}  // namespace pte

class PageTable {
 public:
  static constexpr unsigned kIndexBits = 9;
  static constexpr std::uint64_t kEntries = std::uint64_t{1} << kIndexBits;
  static constexpr unsigned kDepths = 4;  // 3 = PGD ... 0 = PTE table
  static constexpr std::uint64_t kSpan = std::uint64_t{1} << (kPageShift + kIndexBits * kDepths);

  // A present leaf as seen by a lookup.
  struct Leaf {
    std::uint64_t addr = 0;  // start of the range the leaf maps (aligned to its level)
    Pfn pfn = 0;             // pfn mapped at addr
    Level level = Level::pte;
    bool writable = false;
    DevPagemap* pgmap = nullptr;
    std::uint64_t raw = 0;  // the entry as read (for the compare-and-exchange operations)
  };

  enum class Install {
    installed,  // the entry is in; the caller's folio reference now belongs to it
    mapped,     // something already maps addr (maybe a larger leaf); caller keeps its reference
    blocked,    // a lower-level table occupies the slot: no leaf of this level can go there
  };

  PageTable();
  // Zaps whatever is still mapped, then frees every table.
  ~PageTable();
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  // Lockless. The leaf and its pagemap are read consistently (inside an RCU read section).
  std::optional<Leaf> lookup(std::uint64_t addr) const noexcept;

  // GUP's batched walk: the slots of one table page, from the one covering addr to the end of the
  // table. depth 0: the PTE table holding addr's slot (count up to 512; the caller loads and
  // re-checks each entry itself, and reads a slot's pagemap between two equal loads of its entry,
  // inside an RCU read section); depth 1 or 2: the huge leaf covering addr (count 1). nullopt if
  // no table or leaf covers addr. The pointers stay valid until the caller's read section ends
  // (a table unlinked meanwhile is freed only after a grace period).
  struct Slots {
    const std::atomic<std::uint64_t>* entry = nullptr;
    const std::atomic<DevPagemap*>* pgmap = nullptr;
    std::uint64_t count = 0;
    unsigned depth = 0;
    std::uint64_t addr = 0;  // virtual address mapped by entry[0] (aligned to its level)
  };
  // Inline: GUP calls it once per table page, and a 1-page call is mostly fixed costs.
  std::optional<Slots> slots(std::uint64_t addr) const noexcept;
  // What a leaf of `level` at addr would meet now: nothing (empty), a leaf of this level or a
  // larger one (mapped), or a lower-level table (blocked). A slot locked by an install or a zap in
  // progress is waited for, never read as occupied: a fault that took a lock for a lower table
  // would ask its owner for a smaller entry than the one being put in place.
  enum class Probe { empty, mapped, blocked };
  Probe probe(std::uint64_t addr, Level level) const noexcept;
  // Installs a leaf for [addr, addr + level_bytes(level)) mapping pfn of pgmap. The caller holds
  // one folio reference on pfn's folio, which moves into the entry on Install::installed.
  Install install(std::uint64_t addr, Level level, Pfn pfn, DevPagemap* pgmap, bool writable);
  // Sets the write bit of the leaf covering addr. False if nothing is mapped there.
  bool make_writable(std::uint64_t addr) noexcept;
  // Sets the write bit of the leaf covering addr if it still reads `expected` (a Leaf::raw).
  bool make_writable_if(std::uint64_t addr, std::uint64_t expected) noexcept;
  // Clears the write bit of the leaf covering addr if it still reads `expected`.
  bool write_protect_if(std::uint64_t addr, std::uint64_t expected) noexcept;
  // Copy-on-write: replaces the PTE-level leaf at addr, if it still reads `expected`, by a leaf
  // mapping pfn of pgmap. The caller's folio reference on pfn moves into the entry (and a mapcount
  // is added); the old leaf's mapcount and reference are dropped. False (nothing changed, the
  // caller keeps its reference) if the slot changed meanwhile.
  bool replace(std::uint64_t addr, std::uint64_t expected, Pfn pfn, DevPagemap* pgmap,
               bool writable) noexcept;
  // The present leaves overlapping [start, end), in address order (a snapshot).
  std::vector<Leaf> leaves(std::uint64_t start, std::uint64_t end) const;
  // Unlinks every table lying wholly inside [start, end) whose entries are all empty (after its
  // own empty sub-tables went) and retires it for reclaim(). The root stays. Precondition: no
  // concurrent install in the range and no concurrent zap walking it (see the file comment).
  // Returns the number of tables retired.
  std::uint64_t free_empty_tables(std::uint64_t start, std::uint64_t end) noexcept;
  // Once kReclaimBatch tables are retired (or always with `force`), waits for one grace period
  // and then keeps up to kTableCache of them for reuse by later installs (they are all empty) and
  // deletes the rest: a munmap / fault cycle neither waits for a grace period nor clears a fresh
  // 8 KiB table each time. Must not be called with a lock that RCU readers take; inside a read
  // section it leaves them for a later call (or the destructor).
  static constexpr std::size_t kReclaimBatch = 32;
  static constexpr std::size_t kTableCache = 64;
  void reclaim(bool force = false) noexcept;
  std::size_t nr_retired() const noexcept;  // tests
  // Tables below the root currently linked into the tree (diagnostics and tests).
  std::uint64_t nr_tables() const noexcept { return nr_tables_.load(std::memory_order_relaxed); }
  // Clears the write bit of every leaf overlapping [start, end).
  void write_protect(std::uint64_t start, std::uint64_t end) noexcept;
  // Zaps every leaf overlapping [start, end) (a huge leaf partly inside is zapped whole); with
  // keep_anon, leaves mapping anonymous pages (AnonPool) stay. Returns the number of leaves zapped
  // by this call.
  std::uint64_t zap(std::uint64_t start, std::uint64_t end, bool keep_anon = false) noexcept;

  std::uint64_t nr_entries() const noexcept { return nr_entries_.load(std::memory_order_relaxed); }
  // Diagnostics: calls fn for every present leaf, in address order (lockless, like lookup()).
  void for_each_present(const std::function<void(const Leaf&)>& fn) const;

 private:
  // 4 KiB aligned, so a table's address fits the frame bits of an entry.
  struct alignas(4096) Table {
    std::atomic<std::uint64_t> entry[kEntries];
    std::atomic<DevPagemap*> pgmap[kEntries];
  };
  template <typename Fn>
  void for_each_leaf(Table* t, unsigned depth, std::uint64_t base, std::uint64_t start,
                     std::uint64_t end, Fn& fn) noexcept;
  bool zap_slot(Table* t, std::uint64_t i, bool keep_anon = false) noexcept;
  static void free_table(Table* t, unsigned depth) noexcept;
  bool prune(Table* t, unsigned depth, std::uint64_t base, std::uint64_t start, std::uint64_t end,
             std::uint64_t& retired) noexcept;
  // The slot of the PTE-level leaf covering addr, or nullptr if no PTE table covers it.
  std::atomic<std::uint64_t>* pte_slot(std::uint64_t addr, Table** table,
                                       std::uint64_t* index) const noexcept;

  Table* root_;
  std::atomic<std::uint64_t> nr_entries_{0};
  std::atomic<std::uint64_t> nr_tables_{0};
  Table* alloc_table();                 // from cache_, else a new zeroed table
  void unpublished(Table* t) noexcept;  // a table never published goes back to cache_
  mutable std::mutex retired_mu_;
  std::vector<Table*> retired_;  // unlinked, waiting for a grace period (retired_mu_)
  std::vector<Table*> cache_;    // past a grace period, all entries empty (retired_mu_)
};

inline std::optional<PageTable::Slots> PageTable::slots(std::uint64_t addr) const noexcept {
  if (addr >= kSpan) return std::nullopt;
  const Table* t = root_;
  unsigned shift = kPageShift + kIndexBits * (kDepths - 1);
  for (unsigned depth = kDepths - 1; depth > 0; --depth, shift -= kIndexBits) {
    const std::uint64_t i = (addr >> shift) & (kEntries - 1);
    const std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
    if (!pte::present(e)) return std::nullopt;
    if (pte::leaf(e)) {
      return Slots{&t->entry[i], &t->pgmap[i], 1, depth, addr & ~((std::uint64_t{1} << shift) - 1)};
    }
    t = reinterpret_cast<const Table*>(e & pte::kFrameMask);
  }
  const std::uint64_t i = (addr >> kPageShift) & (kEntries - 1);
  return Slots{&t->entry[i], &t->pgmap[i], kEntries - i, 0, addr & ~(kPageSize - 1)};
}

}  // namespace pgmap::mm
