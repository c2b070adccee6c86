#include "mm/page_table.h"

#include <algorithm>
#include <thread>

#include "pgmap/core/rcu.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/mm/anon_pool.h"

namespace pgmap::mm {
namespace {

constexpr unsigned shift_of(unsigned depth) {
  return kPageShift + PageTable::kIndexBits * depth;
}
constexpr std::uint64_t span_of(unsigned depth) {
  return std::uint64_t{1} << shift_of(depth);
}
constexpr std::uint64_t index_of(std::uint64_t addr, unsigned depth) {
  return (addr >> shift_of(depth)) & (PageTable::kEntries - 1);
}
constexpr unsigned depth_of(Level l) {
  return static_cast<unsigned>(l);
}

// The folio's mapcount lives in its head entry.
std::atomic<std::int32_t>& mapcount_of(DevPagemap& pg, Pfn pfn) noexcept {
  PageArray* a = pg.array_for(pfn);
  return a->mapcount(a->head_of(a->index_of(pfn)));
}

// The slot's value once it is no longer locked by an install, zap or copy-on-write replace in
// progress (a few stores): a walker that must act on what the slot will hold waits here.
std::uint64_t load_unlocked(const std::atomic<std::uint64_t>& slot) noexcept {
  std::uint64_t e = slot.load(std::memory_order_acquire);
  while (pte::locked(e)) {
    PGMAP_YIELD_POINT("pt.wait_unlocked");
    std::this_thread::yield();
    e = slot.load(std::memory_order_acquire);
  }
  return e;
}

}  // namespace

namespace {

std::uint64_t table_entry(const void* t) noexcept {
  return reinterpret_cast<std::uintptr_t>(t) | pte::kPresent;
}

}  // namespace

PageTable::PageTable() : root_(new Table{}) {}

PageTable::~PageTable() {
  (void)zap(0, kSpan);
  free_table(root_, kDepths - 1);
  // Destruction has no concurrent walker (as for free_table above): no grace period needed.
  for (Table* t : retired_)
    delete t;
  for (Table* t : cache_)
    delete t;
}

PageTable::Table* PageTable::alloc_table() {
  {
    std::lock_guard<std::mutex> lock(retired_mu_);
    if (!cache_.empty()) {
      Table* t = cache_.back();
      cache_.pop_back();
      return t;  // every entry is 0 (it was retired empty); pgmap slots are set before use
    }
  }
  return new Table{};
}

void PageTable::unpublished(Table* t) noexcept {
  std::lock_guard<std::mutex> lock(retired_mu_);
  if (cache_.size() < kTableCache) {
    cache_.push_back(t);
  } else {
    delete t;
  }
}

std::size_t PageTable::nr_retired() const noexcept {
  std::lock_guard<std::mutex> lock(retired_mu_);
  return retired_.size();
}

void PageTable::free_table(Table* t, unsigned depth) noexcept {
  if (depth > 0) {
    for (std::uint64_t i = 0; i < kEntries; ++i) {
      std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
      if (pte::present(e) && !pte::leaf(e)) {
        free_table(reinterpret_cast<Table*>(e & pte::kFrameMask), depth - 1);
      }
    }
  }
  delete t;
}

std::optional<PageTable::Leaf> PageTable::lookup(std::uint64_t addr) const noexcept {
  if (addr >= kSpan) return std::nullopt;
  // Inside a read section, a slot that reads the same leaf value before and after its pagemap
  // pointer maps that pagemap: a different pagemap of the same pfn can only be created after the
  // old one was unpublished, which waits for this section.
  rcu::ReadGuard guard;
  for (;;) {
    const Table* t = root_;
    for (unsigned depth = kDepths - 1;; --depth) {
      const std::uint64_t i = index_of(addr, depth);
      const std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
      if (!pte::present(e)) return std::nullopt;
      if (pte::leaf(e)) {
        DevPagemap* pg = t->pgmap[i].load(std::memory_order_acquire);
        if (t->entry[i].load(std::memory_order_acquire) != e) break;  // changed: walk again
        return Leaf{
            align_down(addr, span_of(depth)), pte::pfn(e), pte::level(e), pte::writable(e), pg, e};
      }
      if (depth == 0) return std::nullopt;  // not reached: PTE slots hold only leaves
      t = reinterpret_cast<const Table*>(e & pte::kFrameMask);
    }
  }
}

PageTable::Probe PageTable::probe(std::uint64_t addr, Level level) const noexcept {
  const Table* t = root_;
  for (unsigned depth = kDepths - 1;; --depth) {
    const std::uint64_t e = load_unlocked(t->entry[index_of(addr, depth)]);
    if (e == 0) return Probe::empty;  // nothing at this level or below yet
    if (pte::leaf(e)) return Probe::mapped;
    if (depth == depth_of(level)) return Probe::blocked;  // a lower table is in the way
    t = reinterpret_cast<const Table*>(e & pte::kFrameMask);
  }
}

PageTable::Install PageTable::install(std::uint64_t addr, Level level, Pfn pfn, DevPagemap* pgmap,
                                      bool writable) {
  const unsigned leaf_depth = depth_of(level);
  Table* t = root_;
  for (unsigned depth = kDepths - 1; depth > leaf_depth; --depth) {
    std::atomic<std::uint64_t>& slot = t->entry[index_of(addr, depth)];
    std::uint64_t e = slot.load(std::memory_order_acquire);
    for (;;) {
      if (e == 0) {
        Table* fresh = alloc_table();
        if (slot.compare_exchange_strong(e, table_entry(fresh), std::memory_order_acq_rel,
                                         std::memory_order_acquire)) {
          e = table_entry(fresh);
          nr_tables_.fetch_add(1, std::memory_order_relaxed);
          break;
        }
        unpublished(fresh);  // lost the race; never published
        continue;
      }
      if (pte::locked(e)) {
        e = load_unlocked(slot);
        continue;
      }
      if (pte::leaf(e)) return Install::mapped;  // a larger leaf covers addr
      break;
    }
    t = reinterpret_cast<Table*>(e & pte::kFrameMask);
  }
  const std::uint64_t i = index_of(addr, leaf_depth);
  std::atomic<std::uint64_t>& slot = t->entry[i];
  std::uint64_t e = slot.load(std::memory_order_acquire);
  for (;;) {
    if (e == 0) {
      if (!slot.compare_exchange_weak(e, pte::kLocked, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
        continue;
      }
      PGMAP_YIELD_POINT("pt.install_locked");
      t->pgmap[i].store(pgmap, std::memory_order_relaxed);
      // rmap before the entry is visible, so a zap never sees the mapcount go below zero.
      mapcount_of(*pgmap, pfn).fetch_add(1, std::memory_order_acq_rel);
      nr_entries_.fetch_add(1, std::memory_order_relaxed);
      slot.store(pte::make_leaf(pfn, level, writable), std::memory_order_seq_cst);
      return Install::installed;
    }
    if (pte::locked(e)) {
      e = load_unlocked(slot);
      continue;
    }
    return pte::leaf(e) ? Install::mapped : Install::blocked;
  }
}

bool PageTable::make_writable(std::uint64_t addr) noexcept {
  if (addr >= kSpan) return false;
  Table* t = root_;
  for (unsigned depth = kDepths - 1;; --depth) {
    std::atomic<std::uint64_t>& slot = t->entry[index_of(addr, depth)];
    std::uint64_t e = slot.load(std::memory_order_acquire);
    if (!pte::present(e)) return false;
    if (pte::leaf(e)) {
      while (pte::leaf(e) && !pte::writable(e)) {
        if (slot.compare_exchange_weak(e, e | pte::kWrite, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
          return true;
        }
      }
      return pte::leaf(e);
    }
    if (depth == 0) return false;
    t = reinterpret_cast<Table*>(e & pte::kFrameMask);
  }
}

std::atomic<std::uint64_t>* PageTable::pte_slot(std::uint64_t addr, Table** table,
                                                std::uint64_t* index) const noexcept {
  if (addr >= kSpan) return nullptr;
  Table* t = root_;
  for (unsigned depth = kDepths - 1; depth > 0; --depth) {
    const std::uint64_t e = t->entry[index_of(addr, depth)].load(std::memory_order_acquire);
    if (!pte::present(e) || pte::leaf(e)) return nullptr;
    t = reinterpret_cast<Table*>(e & pte::kFrameMask);
  }
  *table = t;
  *index = index_of(addr, 0);
  return &t->entry[*index];
}

bool PageTable::make_writable_if(std::uint64_t addr, std::uint64_t expected) noexcept {
  Table* t = nullptr;
  std::uint64_t i = 0;
  std::atomic<std::uint64_t>* slot = pte_slot(addr, &t, &i);
  if (slot == nullptr || !pte::leaf(expected)) return false;
  std::uint64_t e = expected;
  return slot->compare_exchange_strong(e, expected | pte::kWrite, std::memory_order_acq_rel,
                                       std::memory_order_acquire);
}

bool PageTable::write_protect_if(std::uint64_t addr, std::uint64_t expected) noexcept {
  Table* t = nullptr;
  std::uint64_t i = 0;
  std::atomic<std::uint64_t>* slot = pte_slot(addr, &t, &i);
  if (slot == nullptr || !pte::leaf(expected)) return false;
  std::uint64_t e = expected;
  return slot->compare_exchange_strong(e, expected & ~pte::kWrite, std::memory_order_seq_cst,
                                       std::memory_order_acquire);
}

bool PageTable::replace(std::uint64_t addr, std::uint64_t expected, Pfn pfn, DevPagemap* pgmap,
                        bool writable) noexcept {
  Table* t = nullptr;
  std::uint64_t i = 0;
  std::atomic<std::uint64_t>* slot = pte_slot(addr, &t, &i);
  if (slot == nullptr || !pte::leaf(expected) || pte::level(expected) != Level::pte) return false;
  std::uint64_t e = expected;
  if (!slot->compare_exchange_strong(e, pte::kLocked, std::memory_order_acq_rel,
                                     std::memory_order_acquire)) {
    return false;  // changed meanwhile (zapped, replaced, write bit changed)
  }
  DevPagemap* old_pg = t->pgmap[i].load(std::memory_order_relaxed);
  t->pgmap[i].store(pgmap, std::memory_order_relaxed);
  mapcount_of(*pgmap, pfn).fetch_add(1, std::memory_order_acq_rel);
  slot->store(pte::make_leaf(pfn, Level::pte, writable), std::memory_order_seq_cst);
  // The old leaf is out of the table: drop what it held, as a zap would.
  const Pfn old_pfn = pte::pfn(expected);
  mapcount_of(*old_pg, old_pfn).fetch_sub(1, std::memory_order_acq_rel);
  PGMAP_YIELD_POINT("cow.replace_before_put");
  (void)old_pg->put_folio(old_pfn);  // the entry's reference kept the folio until here
  return true;
}

std::vector<PageTable::Leaf> PageTable::leaves(std::uint64_t start, std::uint64_t end) const {
  std::vector<Leaf> out;
  rcu::ReadGuard guard;  // as lookup(): leaf and pagemap read consistently
  auto walk = [&](auto& self, const Table* t, unsigned depth, std::uint64_t base) -> void {
    const std::uint64_t span = span_of(depth);
    const std::uint64_t lo = std::max(start, base);
    const std::uint64_t hi = std::min(end, base + span * kEntries);
    if (lo >= hi) return;
    for (std::uint64_t i = (lo - base) >> shift_of(depth); i <= (hi - 1 - base) >> shift_of(depth);
         ++i) {
      const std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
      if (!pte::present(e)) continue;
      const std::uint64_t addr = base + i * span;
      if (pte::leaf(e)) {
        out.push_back(Leaf{addr, pte::pfn(e), pte::level(e), pte::writable(e),
                           t->pgmap[i].load(std::memory_order_acquire), e});
      } else if (depth > 0) {
        self(self, reinterpret_cast<const Table*>(e & pte::kFrameMask), depth - 1, addr);
      }
    }
  };
  walk(walk, root_, kDepths - 1, 0);
  return out;
}

bool PageTable::prune(Table* t, unsigned depth, std::uint64_t base, std::uint64_t start,
                      std::uint64_t end, std::uint64_t& retired) noexcept {
  const std::uint64_t span = span_of(depth);
  for (std::uint64_t i = 0; i < kEntries; ++i) {
    const std::uint64_t child_base = base + i * span;
    if (child_base >= end || child_base + span <= start || depth == 0) continue;
    const std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
    if (!pte::present(e) || pte::leaf(e)) continue;
    auto* child = reinterpret_cast<Table*>(e & pte::kFrameMask);
    const bool empty = prune(child, depth - 1, child_base, start, end, retired);
    if (empty && child_base >= start && child_base + span <= end) {
      std::uint64_t expect = e;
      if (t->entry[i].compare_exchange_strong(expect, 0, std::memory_order_acq_rel,
                                              std::memory_order_acquire)) {
        nr_tables_.fetch_sub(1, std::memory_order_relaxed);
        std::lock_guard<std::mutex> lock(retired_mu_);
        retired_.push_back(child);
        ++retired;
      }
    }
  }
  for (std::uint64_t i = 0; i < kEntries; ++i) {
    if (t->entry[i].load(std::memory_order_acquire) != 0) return false;
  }
  return true;
}

std::uint64_t PageTable::free_empty_tables(std::uint64_t start, std::uint64_t end) noexcept {
  std::uint64_t retired = 0;
  if (start < end) (void)prune(root_, kDepths - 1, 0, start, std::min(end, kSpan), retired);
  return retired;
}

void PageTable::reclaim(bool force) noexcept {
  std::vector<Table*> gone;
  {
    std::lock_guard<std::mutex> lock(retired_mu_);
    if (retired_.empty() || (!force && retired_.size() < kReclaimBatch)) return;
    gone.swap(retired_);
  }
  PGMAP_YIELD_POINT("pt.reclaim_before_grace");
  if (rcu::in_read_section() || rcu::synchronize() != Errc::ok) {
    // Inside a read section: the grace period cannot complete here. Keep them for later.
    std::lock_guard<std::mutex> lock(retired_mu_);
    retired_.insert(retired_.end(), gone.begin(), gone.end());
    return;
  }
  // No walker can still be reading them: reuse (they are empty) or free.
  std::lock_guard<std::mutex> lock(retired_mu_);
  for (Table* t : gone) {
    if (cache_.size() < kTableCache) {
      cache_.push_back(t);
    } else {
      delete t;
    }
  }
}

template <typename Fn>
void PageTable::for_each_leaf(Table* t, unsigned depth, std::uint64_t base, std::uint64_t start,
                              std::uint64_t end, Fn& fn) noexcept {
  const std::uint64_t span = span_of(depth);
  const std::uint64_t lo = std::max(start, base);
  const std::uint64_t hi = std::min(end, base + span * kEntries);
  if (lo >= hi) return;
  const std::uint64_t first = (lo - base) >> shift_of(depth);
  const std::uint64_t last = (hi - 1 - base) >> shift_of(depth);
  for (std::uint64_t i = first; i <= last; ++i) {
    // A zap must not pass over a leaf that is being put in place.
    const std::uint64_t e = load_unlocked(t->entry[i]);
    if (!pte::present(e)) continue;
    if (pte::leaf(e)) {
      fn(t, i);
    } else if (depth > 0) {
      for_each_leaf(reinterpret_cast<Table*>(e & pte::kFrameMask), depth - 1, base + i * span,
                    start, end, fn);
    }
  }
}

bool PageTable::zap_slot(Table* t, std::uint64_t i, bool keep_anon) noexcept {
  std::atomic<std::uint64_t>& slot = t->entry[i];
  std::uint64_t e = slot.load(std::memory_order_acquire);
  do {
    if (!pte::leaf(e)) return false;  // zapped (or being zapped) by someone else
  } while (!slot.compare_exchange_weak(e, pte::kLocked, std::memory_order_acq_rel,
                                       std::memory_order_acquire));
  DevPagemap* pg = t->pgmap[i].load(std::memory_order_relaxed);
  if (keep_anon && AnonPool::is_anon(pg)) {
    slot.store(e, std::memory_order_seq_cst);  // unchanged: private data stays
    return false;
  }
  slot.store(0, std::memory_order_seq_cst);
  nr_entries_.fetch_sub(1, std::memory_order_relaxed);
  // The entry's reference keeps the folio, and so the pagemap, alive until the put.
  const Pfn pfn = pte::pfn(e);
  mapcount_of(*pg, pfn).fetch_sub(1, std::memory_order_acq_rel);
  // The entry is gone but its reference not yet dropped: a lockless GUP that read the entry
  // before the zap re-checks it after taking its own reference.
  PGMAP_YIELD_POINT("zap.before_put");
  (void)pg->put_folio(pfn);
  return true;
}

std::uint64_t PageTable::zap(std::uint64_t start, std::uint64_t end, bool keep_anon) noexcept {
  std::uint64_t zapped = 0;
  auto fn = [&](Table* t, std::uint64_t i) {
    if (zap_slot(t, i, keep_anon)) ++zapped;
  };
  for_each_leaf(root_, kDepths - 1, 0, start, std::min(end, kSpan), fn);
  return zapped;
}

void PageTable::write_protect(std::uint64_t start, std::uint64_t end) noexcept {
  auto fn = [](Table* t, std::uint64_t i) {
    std::atomic<std::uint64_t>& slot = t->entry[i];
    std::uint64_t e = slot.load(std::memory_order_acquire);
    while (pte::leaf(e) && pte::writable(e)) {
      if (slot.compare_exchange_weak(e, e & ~pte::kWrite, std::memory_order_acq_rel,
                                     std::memory_order_acquire)) {
        return;
      }
    }
  };
  for_each_leaf(root_, kDepths - 1, 0, start, std::min(end, kSpan), fn);
}

void PageTable::for_each_present(const std::function<void(const Leaf&)>& fn) const {
  rcu::ReadGuard guard;  // as lookup(): the leaf and its pagemap pointer read consistently
  auto walk = [&](auto& self, const Table* t, unsigned depth, std::uint64_t base) -> void {
    for (std::uint64_t i = 0; i < kEntries; ++i) {
      const std::uint64_t e = t->entry[i].load(std::memory_order_acquire);
      if (!pte::present(e)) continue;  // empty, or locked by an install/zap in progress
      const std::uint64_t addr = base + (i << shift_of(depth));
      if (pte::leaf(e)) {
        fn(Leaf{addr, pte::pfn(e), pte::level(e), pte::writable(e),
                t->pgmap[i].load(std::memory_order_acquire), e});
      } else if (depth > 0) {
        self(self, reinterpret_cast<const Table*>(e & pte::kFrameMask), depth - 1, addr);
      }
    }
  };
  walk(walk, root_, kDepths - 1, 0);
}

}  // namespace pgmap::mm
