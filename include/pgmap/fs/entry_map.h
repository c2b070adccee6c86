// EntryMap: a file's ordered index -> Entry map (the fsdax use of mapping->i_pages), with entry
// locking through the entry's lock bit and a hashed wait table.
//
// Protocol (I5, I6). The map's mutex (the xa_lock) guards every read and store of an entry; it is
// held only for a few instructions. A multi-step operation locks an entry by storing it with
// Entry::kLocked set, drops the mutex, does its work (which may block), and unlocks by storing the
// new value without the bit, then wakes the entry's wait-table bucket. A thread that finds an
// entry locked sleeps in the bucket keyed by (map, 2 MiB-aligned index) and, after every wake-up,
// looks the index up again: it never skips a locked entry it must inspect (bug 5.5) and never
// acts on a stale value.
//
// Shape. At most one entry covers an index. A PMD entry sits at a 512-aligned index and covers
// 512 indices; no PTE entry may exist inside it and vice versa (I6). grab() enforces it: a PMD
// request over existing PTE entries fails (the caller falls back to PTE), a PTE request on a PMD
// zero or empty entry downgrades it (the caller's callback unmaps the zero page first), and a PTE
// request on a PMD block entry returns that entry (a PTE then maps one page of the 2 MiB folio).
//
// Waits never hang silently: a wait for an entry lock reports on stderr every kReportEvery.
//
// Lock order: entry lock (bit) -> EntryMap mutex -> wait-table bucket. No other lock is taken
// while the mutex is held; the mutex is never held while sleeping or waking.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/fs/entry.h"

namespace pgmap::fs {

class EntryMap {
 public:
  static constexpr std::chrono::seconds kReportEvery{5};

  // An entry and the first index it covers.
  struct Slot {
    std::uint64_t index = 0;
    Entry entry;
  };

  EntryMap() = default;
  EntryMap(const EntryMap&) = delete;
  EntryMap& operator=(const EntryMap&) = delete;

  // The entry covering `index`, unlocked or not (a snapshot, for checks and diagnostics).
  std::optional<Slot> peek(std::uint64_t index) const;

  // grab_mapping_entry: returns the entry covering `index` for a fault of `order` (0 or
  // kPmdOrder), locked by the caller; if there is none, a new locked EMPTY placeholder of that
  // order at index aligned down to it. Waits for a locked entry. Errors: Errc::busy for a PMD
  // request over PTE entries (fall back), Errc::invalid_argument for another order. On a PTE
  // request that finds a PMD zero or empty entry, `downgrade(first_index)` runs with that entry
  // locked (the caller unmaps the zero page there) before it is replaced by a PTE placeholder.
  Result<Slot> grab(std::uint64_t index, unsigned order,
                    const std::function<void(std::uint64_t)>& downgrade = {});

  // The first entry whose first index lies in [from, to), locked by the caller, waiting in place
  // for a locked one (and then looking again at the same place). nullopt when there is none.
  std::optional<Slot> lock_next(std::uint64_t from, std::uint64_t to);

  // Stores `value` (unlocked) for the locked entry at `index` and wakes its waiters.
  void unlock(std::uint64_t index, Entry value);
  // Unlocks the locked entry at `index` unchanged.
  void unlock(std::uint64_t index);
  // Removes the locked entry at `index` and wakes its waiters.
  void erase(std::uint64_t index);

  std::size_t size() const;
  // Pages covered by block and zero entries (the kernel's mapping->nrpages counts all entries).
  std::uint64_t nr_pages() const;
  // Every entry with first index in [from, to) (snapshot).
  std::vector<Slot> snapshot(std::uint64_t from = 0, std::uint64_t to = ~std::uint64_t{0}) const;
  // Number of threads currently asleep waiting for an entry lock of this map (tests).
  std::uint32_t waiters() const noexcept { return waiting_.load(std::memory_order_acquire); }

 private:
  using Map = std::map<std::uint64_t, std::uint64_t>;
  Map::const_iterator covering(std::uint64_t index) const;  // mu_ held
  const void* key(std::uint64_t index) const noexcept;
  // Sleeps until the entry at `index` is unlocked, removed or replaced.
  void wait_unlocked(std::uint64_t index);
  void wake(std::uint64_t index) noexcept;

  mutable std::mutex mu_;
  Map entries_;  // first index -> Entry raw value
  std::atomic<std::uint32_t> waiting_{0};
};

}  // namespace pgmap::fs
