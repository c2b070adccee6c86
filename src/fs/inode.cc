#include "pgmap/fs/inode.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "memory/device_bytes.h"
#include "mm/translation_users.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/entry_refs.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::fs {
namespace {

constexpr std::uint64_t kAll = std::numeric_limits<std::uint64_t>::max();
constexpr std::uint64_t kPmdPages = order_pages(kPmdOrder);

std::uint64_t pages_of(std::uint64_t bytes) {
  return align_up(bytes, kPageSize) >> kPageShift;
}

// The folio metadata of pfn: its array and head entry.
struct Folio {
  PageArray* a = nullptr;
  std::uint64_t head = 0;
  explicit operator bool() const { return a != nullptr; }
};

Folio folio_of(const DevPagemap& pg, Pfn pfn) {
  if (pg.state() == DevPagemap::State::dead) return {};  // metadata gone: nothing to look at
  PageArray* a = pg.array_for(pfn);
  if (a == nullptr) return {};
  return {a, a->head_of(a->index_of(pfn))};
}

// Busy: references beyond the page-table mappings (GUP, pins, pipes, DMA), whether or not the
// page is still mapped anywhere (bug 5.4).
bool folio_busy(const Folio& f) {
  const std::uint32_t ref = f.a->ref(f.head).load(std::memory_order_seq_cst);
  const std::int32_t map = f.a->mapcount(f.head).load(std::memory_order_seq_cst);
  return ref > static_cast<std::uint32_t>(std::max(map, 0));
}

// A memory failure was recorded on pfn's folio (DaxFs::memory_failure).
bool poisoned(const DevPagemap& pg, Pfn pfn) {
  Folio f = folio_of(pg, pfn);
  return f && (f.a->flags(f.head).load(std::memory_order_acquire) & kPagePoisoned) != 0;
}

// The folio reference taken under the entry lock inside the read section becomes the
// page-table entry's reference (the address space adopts it).
mm::FaultResult hand_to_mm(PageRef ref) {
  return mm::FaultResult::insert(std::move(ref));
}

}  // namespace

// ---- Interrupt ----------------------------------------------------------------------------------

void Interrupt::raise() noexcept {
  raised_.store(true, std::memory_order_seq_cst);
  // The waiter publishes its key before it registers and checks; either we see the key and wake
  // it, or it sees the flag in its check.
  if (const void* key = key_.load(std::memory_order_seq_cst)) wake_up_var(key);
}

// ---- Inode basics -------------------------------------------------------------------------------

Inode::Inode(DaxFs* fs, std::uint64_t ino, std::string name)
    : fs_(fs), ino_(ino), name_(std::move(name)) {}

Inode::~Inode() = default;

std::uint64_t Inode::i_size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return size_;
}
std::uint32_t Inode::nlink() const {
  std::lock_guard<std::mutex> lock(mu_);
  return nlink_;
}
std::uint32_t Inode::opens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return opens_;
}
Inode::State Inode::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_;
}

std::string Inode::name() const {
  return fmt::format("{}:{} (ino {})", fs_->name(), name_, ino_);
}

std::uint64_t Inode::size() const {
  return fs_->dax_device().size();
}

Errc Inode::check_usable() const {
  if (fs_->shut_down()) return Errc::dead;
  std::lock_guard<std::mutex> lock(mu_);
  return state_ == State::evicted ? Errc::dead : Errc::ok;
}

std::optional<std::uint64_t> Inode::block_of(std::uint64_t page) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = blocks_.find(page);
  if (it == blocks_.end()) return std::nullopt;
  return it->second;
}

void Inode::count(mm::Level level, FaultStats::Outcome o) noexcept {
  const std::size_t s = level == mm::Level::pte ? 0 : 1;
  stats_[s][o].fetch_add(1, std::memory_order_relaxed);
}

FaultStats Inode::fault_stats() const {
  FaultStats s;
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t o = 0; o < FaultStats::kOutcomes; ++o) {
      s.by_size[l][o] = stats_[l][o].load(std::memory_order_relaxed);
    }
  }
  s.mkwrite_refaults = mkwrite_refaults_.load(std::memory_order_relaxed);
  return s;
}

// ---- association (§2.1, §3.5)
// ---------------------------------------------------------------------

Errc Inode::associate(std::uint64_t index, Pfn pfn, unsigned order, DevPagemap::Allocation alloc) {
  DevPagemap& pg = fs_->pagemap();
  Folio f = folio_of(pg, pfn);
  if (!f) return Errc::invalid_argument;
  // Pagemap references first: nothing is changed if the pagemap is dying.
  const std::uint64_t pages = order_pages(order);
  const bool refs = entry_holds_pagemap_refs(pg.strategy());
  if (refs) {
    if (Errc r = get_entry_refs(pg, pages); r != Errc::ok) return r;
  }
  std::lock_guard<std::mutex> lock(fs_->folio_mu(pfn));
  if ((f.a->flags(f.head).load(std::memory_order_seq_cst) & kPageSplitOwed) != 0) {
    // Disassociated while still held, its split owed at the last put: associated again at its
    // own order it stays as it is (the debt is cancelled); otherwise it is split first if it is
    // idle by now (a last put may be paying the same debt: settle_split serializes the two).
    const unsigned keep = f.head == f.a->index_of(pfn) ? order : pg.base_order();
    if (f.a->settle_split(f.head, 0, keep) != Errc::ok) {
      if (refs) put_entry_refs(pg, pages);
      return Errc::busy;  // still held: nothing changed
    }
    f = folio_of(pg, pfn);
  }
  if (f.head != f.a->index_of(pfn)) {
    if (refs) put_entry_refs(pg, pages);
    return Errc::invalid_argument;
  }
  const std::uint8_t flags = f.a->flags(f.head).load(std::memory_order_acquire);
  const void* owner = f.a->mapping(f.head).load(std::memory_order_acquire);
  Errc e = Errc::ok;
  if (owner == nullptr && (flags & kPageShared) == 0) {
    // First association: the folio takes the entry's order (built while idle, I11).
    if (f.a->order(f.head) != order) e = f.a->set_folio_order(f.head, order);
    if (e == Errc::ok) {
      f.a->mapping(f.head).store(static_cast<const mm::MappingOwner*>(this),
                                 std::memory_order_release);
      f.a->index_or_share(f.head).store(index, std::memory_order_release);
    }
  } else if (f.a->order(f.head) != order) {
    e = Errc::busy;  // a sharer maps it at another order
  } else {
    // Shared (reflink): no single mapping, count the associations (I12).
    if ((flags & kPageShared) == 0) {
      f.a->flags(f.head).fetch_or(kPageShared, std::memory_order_acq_rel);
      f.a->mapping(f.head).store(nullptr, std::memory_order_release);
      f.a->index_or_share(f.head).store(1, std::memory_order_release);
    }
    f.a->index_or_share(f.head).fetch_add(1, std::memory_order_acq_rel);
  }
  if (e != Errc::ok) {
    if (refs) put_entry_refs(pg, pages);
    return e;
  }
  if (alloc) {
    std::lock_guard<std::mutex> ml(mu_);
    allocations_[index] = std::move(alloc);
  }
  nrpages_.fetch_add(pages, std::memory_order_acq_rel);  // the entry is inserted next
  return Errc::ok;
}

void Inode::disassociate(std::uint64_t index, Entry e) {
  DevPagemap& pg = fs_->pagemap();
  nrpages_.fetch_sub(e.pages(), std::memory_order_acq_rel);  // the entry is deleted next
  if (Folio f = folio_of(pg, e.pfn())) {
    std::lock_guard<std::mutex> lock(fs_->folio_mu(e.pfn()));
    bool reset = true;
    if ((f.a->flags(f.head).load(std::memory_order_acquire) & kPageShared) != 0) {
      const std::uint64_t left = f.a->index_or_share(f.head).fetch_sub(1) - 1;
      reset = left == 0;
      if (reset) f.a->flags(f.head).fetch_and(static_cast<std::uint8_t>(~kPageShared));
    }
    if (reset) {
      f.a->mapping(f.head).store(nullptr, std::memory_order_release);
      f.a->index_or_share(f.head).store(0, std::memory_order_release);
      // Back to order 0 with every page's order reset (bug 5.8). The entry is deleted after its
      // layout was broken, so the folio is idle — unless a holder outlived the break (removal
      // forced past a timed-out pre-remove, a gup-fast reference racing the deletion): then the
      // split is owed and the free path of the folio's last put pays it (docs/fsdax.md, "Order
      // reset at the last put"). Busy is that case, not an error.
      if (f.a->order(f.head) != pg.base_order()) (void)f.a->owe_split(f.head);
    }
  }
  if (entry_holds_pagemap_refs(pg.strategy())) put_entry_refs(pg, e.pages());  // associate's
  DevPagemap::Allocation gone;
  {
    std::lock_guard<std::mutex> ml(mu_);
    auto it = allocations_.find(index);
    if (it != allocations_.end()) {
      gone = std::move(it->second);
      allocations_.erase(it);
    }
  }
}

// ---- memory failure (§3.10, §3.13) and checker snapshots
// ---------------------------------------------------------

void Inode::memory_failure(std::uint64_t first, std::uint64_t last, int mf_flags) {
  std::vector<std::uint64_t> hit;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::evicted) return;
    for (const auto& [page, block] : blocks_) {
      if (block >= first && block < last) hit.push_back(page);
    }
  }
  for (std::uint64_t page : hit) {
    // The users of every mapping of the page lose it: their next access faults and consumes the
    // poison (BUS_MCEERR_AR), as mf_dax_kill_procs makes them.
    const std::uint64_t zapped = unmap_mapping_range(page, 1);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.find(page);
    failures_.push_back(
        MemoryFailure{page, it == blocks_.end() ? 0 : it->second, mf_flags, zapped});
  }
}

DevPagemap::Allocation Inode::testing_swap_allocation(std::uint64_t index,
                                                      DevPagemap::Allocation a) {
  std::lock_guard<std::mutex> lock(mu_);
  DevPagemap::Allocation old;
  if (auto it = allocations_.find(index); it != allocations_.end()) {
    old = std::move(it->second);
    allocations_.erase(it);
  }
  if (a) allocations_.emplace(index, std::move(a));
  return old;
}

void Inode::testing_force_delete_entries(std::uint64_t first, std::uint64_t last) {
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  (void)unmap_mapping_range(first, last - first);  // the count of zapped entries is not needed
  delete_entries(first, last);
}

std::vector<MemoryFailure> Inode::memory_failures() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failures_;
}

InodeSnapshot Inode::snapshot() const {
  InodeSnapshot s;
  s.ino = ino_;
  s.entries = entries_.snapshot();
  s.nrpages = nrpages();
  std::lock_guard<std::mutex> lock(mu_);
  s.size = size_;
  s.blocks = blocks_;
  for (const auto& [index, a] : allocations_)
    s.allocations.emplace(index, InodeSnapshot::Alloc{a.first(), a.count()});
  return s;
}

// ---- faults (§3.4)
// --------------------------------------------------------------------------------

Errc Inode::on_mmap(mm::Vma& vma) {
  (void)vma;
  if (fs_->shut_down()) return Errc::dead;
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ != State::live) return Errc::dead;
  // mmap needs an open file (the VMA then keeps the inode from eviction through i_mmap).
  if (opens_ == 0) return Errc::invalid_argument;
  return Errc::ok;
}

mm::FaultResult Inode::fault(const mm::Vma& vma, const mm::FaultRequest& req) {
  if (req.level == mm::Level::pud) return mm::FaultResult::fallback();
  FaultStats::Outcome outcome = FaultStats::kSigbus;
  mm::FaultResult r = fault_locked(vma, req, outcome);
  count(req.level, outcome);
  return r;
}

mm::FaultResult Inode::fault_locked(const mm::Vma& vma, const mm::FaultRequest& req,
                                    FaultStats::Outcome& outcome) {
  std::shared_lock<std::shared_mutex> inv(invalidate_lock_);
  if (check_usable() != Errc::ok) {
    return mm::FaultResult::sigbus(name() + " is shut down or evicted");
  }
  const unsigned order = mm::level_order(req.level);
  const std::uint64_t pages = order_pages(order);
  const std::uint64_t index = req.pgoff;
  const std::uint64_t eof = pages_of(i_size());
  auto fallback = [&] {
    outcome = FaultStats::kFallback;
    return mm::FaultResult::fallback();
  };
  if (order != 0) {
    if (!is_aligned(index, pages) || index + pages > eof) return fallback();
    if (req.write && !vma.shared()) return fallback();  // private write: 4 KiB copy-on-write
  } else if (index >= eof) {
    return mm::FaultResult::sigbus(fmt::format("{}: page {} past EOF", name(), index));
  }
  auto grabbed = entries_.grab(index, order, [&](std::uint64_t base) {
    // The PMD zero mapping goes first (private copies stay: even_cows false).
    (void)unmap_mapping_range(base, kPmdPages, false);
  });
  if (!grabbed) return fallback();
  const EntryMap::Slot slot = *grabbed;
  Entry final = slot.entry;  // what the entry becomes when we unlock it
  struct Unlock {
    EntryMap& map;
    const EntryMap::Slot& slot;
    Entry& final;
    ~Unlock() {
      if (final.empty()) {
        map.erase(slot.index);  // our placeholder, nothing inserted
      } else {
        map.unlock(slot.index, final);
      }
    }
  } unlock{entries_, slot, final};
  PGMAP_YIELD_POINT("fs.fault_entry_locked");

  dax::DaxDevice& dax = fs_->dax_device();
  dax::DaxDevice::ReadLock rl;
  if (!dax.alive()) return mm::FaultResult::sigbus(name() + ": device is dead");
  DevPagemap& pg = fs_->pagemap();

  if (slot.entry.is_block()) {
    // Already inserted (maybe a PMD entry serving a PTE fault inside it).
    if (order > slot.entry.order()) return fallback();
    const Pfn pfn = slot.entry.pfn() + (index - slot.index);
    auto blk = block_of(index);
    if (req.write && blk && fs_->allocator().share_count(*blk) > 1) {
      return mm::FaultResult::sigbus(name() + ": write to a shared (reflinked) block");
    }
    if (poisoned(pg, pfn)) {
      return mm::FaultResult::memory_failure(
          fmt::format("{}: pfn {:#x} is poisoned (memory failure)", name(), pfn));
    }
    auto ref = PageRef::get(pg, pfn);
    if (!ref) return mm::FaultResult::sigbus(ref.error().to_string());
    outcome = FaultStats::kBlock;
    return hand_to_mm(std::move(ref).value());
  }

  // Zero or empty entry: what backs [index, index + pages)?
  std::optional<std::uint64_t> first_block;
  bool hole = true;
  bool contiguous = true;
  bool shared = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.lower_bound(index);
    if (it != blocks_.end() && it->first < index + pages) hole = false;
    if (!hole) {
      auto f = blocks_.find(index);
      if (f == blocks_.end()) {
        contiguous = false;
      } else {
        first_block = f->second;
        for (std::uint64_t i = 0; i < pages && contiguous; ++i) {
          auto b = blocks_.find(index + i);
          contiguous = b != blocks_.end() && b->second == f->second + i;
        }
      }
    }
  }
  if (!hole) {
    for (std::uint64_t i = 0; first_block && i < pages && !shared; ++i)
      shared = fs_->allocator().share_count(*first_block + i) > 1;
  }
  if (hole && !req.write) {
    // A read of a hole: the shared zero page (4 KiB) or zero folio (2 MiB), read-only.
    auto ref = PageRef::get(fs_->zero_pagemap(), fs_->zero_pfn(order));
    if (!ref) return mm::FaultResult::sigbus(ref.error().to_string());
    final = Entry::zero(order);
    outcome = FaultStats::kZero;
    return hand_to_mm(std::move(ref).value());
  }
  if (!hole && (!contiguous || (order != 0 && (shared || !is_aligned(*first_block, pages))))) {
    return fallback();  // not one 2 MiB-aligned extent (or reflinked): 4 KiB faults
  }
  if (!hole && shared && req.write) {
    return mm::FaultResult::sigbus(name() + ": write to a shared (reflinked) block");
  }
  if (hole) {
    // A write into a hole allocates (an aligned 2 MiB extent for a PMD fault).
    auto b = order == 0 ? fs_->allocator().alloc() : fs_->allocator().alloc_extent(pages, pages);
    if (!b) {
      if (order != 0) return fallback();
      return mm::FaultResult::sigbus(b.error().to_string());
    }
    if (Errc z = zero_blocks(*b, pages); z != Errc::ok) {
      for (std::uint64_t i = 0; i < pages; ++i)
        (void)fs_->allocator().release(*b + i);  // ours, never visible
      return mm::FaultResult::sigbus(name() + ": cannot zero a new block");
    }
    bool raced = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = blocks_.lower_bound(index);
      raced = it != blocks_.end() && it->first < index + pages;
      if (!raced) {
        for (std::uint64_t i = 0; i < pages; ++i)
          blocks_[index + i] = *b + i;
      }
    }
    if (raced) {
      // write() allocated meanwhile: give ours back and let the address space retry.
      for (std::uint64_t i = 0; i < pages; ++i)
        (void)fs_->allocator().release(*b + i);
      return fallback();
    }
    first_block = *b;
  }
  if (slot.entry.zero()) {
    // The zero page is mapped over this range somewhere: zap it before the block goes in.
    (void)unmap_mapping_range(slot.index, slot.entry.pages(), false);  // keep private copies
  }
  auto acc = dax.direct_access(*first_block, pages);
  if (!acc) return mm::FaultResult::sigbus(acc.error().to_string());
  if (acc->nr < pages || !is_aligned(acc->pfn, pages)) {
    if (order != 0) return fallback();  // the device's pfns are not 2 MiB aligned here
    return mm::FaultResult::sigbus(name() + ": block outside the device");
  }
  for (std::uint64_t i = 0; i < pages; ++i) {
    if (poisoned(pg, acc->pfn + i)) {
      if (order != 0) return fallback();  // the 4 KiB fault reports the poisoned page
      return mm::FaultResult::memory_failure(
          fmt::format("{}: pfn {:#x} is poisoned (memory failure)", name(), acc->pfn));
    }
  }
  if (Errc e = associate(slot.index, acc->pfn, order, std::move(acc->allocation)); e != Errc::ok) {
    if (order != 0 && e == Errc::busy) return fallback();
    return mm::FaultResult::sigbus(
        fmt::format("{}: cannot associate pfn {:#x}: {}", name(), acc->pfn, errc_name(e)));
  }
  final = Entry::block(acc->pfn, order);
  PGMAP_YIELD_POINT("fs.fault_before_ref");
  auto ref = PageRef::get(pg, acc->pfn);
  if (!ref) return mm::FaultResult::sigbus(ref.error().to_string());
  outcome = FaultStats::kBlock;
  return hand_to_mm(std::move(ref).value());
}

bool Inode::pfn_mkwrite(const mm::Vma& vma, const mm::FaultRequest& req) {
  (void)vma;
  // A read-only entry may become writable in place only if it maps a private (unshared) block
  // of this file; a zero page must be replaced by a block, a shared block refused.
  bool in_place = false;
  if (auto slot = entries_.peek(req.pgoff); slot && slot->entry.is_block()) {
    auto b = block_of(req.pgoff);
    in_place = b && fs_->allocator().share_count(*b) == 1 && !fs_->shut_down();
  }
  if (!in_place) mkwrite_refaults_.fetch_add(1, std::memory_order_relaxed);
  return in_place;
}

void Inode::on_close(const mm::Vma& vma) {
  (void)vma;
  // Called with the address space's mmap_lock held: an eviction (which may wait for pins) is
  // deferred to the filesystem's worker.
  fs_->maybe_evict(*this, /*defer=*/true);
}

// ---- data
// ------------------------------------------------------------------------------------------

Errc Inode::zero_blocks(std::uint64_t block, std::uint64_t n) {
  dax::DaxDevice::ReadLock rl;
  auto acc = fs_->dax_device().direct_access(block, n);
  if (!acc) return acc.code();
  if (acc->nr < n) return Errc::out_of_range;
  pgmap::detail::shared_fill(acc->kaddr, std::byte{0}, n << kPageShift);
  return Errc::ok;
}

Errc Inode::copy_block(std::uint64_t from, std::uint64_t to) {
  dax::DaxDevice::ReadLock rl;
  auto src = fs_->dax_device().direct_access(from, 1);
  if (!src) return src.code();
  auto dst = fs_->dax_device().direct_access(to, 1);
  if (!dst) return dst.code();
  pgmap::detail::shared_copy(dst->kaddr, src->kaddr, kPageSize);
  return Errc::ok;
}

void Inode::drop_zero_entries(std::uint64_t first, std::uint64_t last) {
  if (auto cover = entries_.peek(first)) first = std::min(first, cover->index);
  for (std::uint64_t at = first;;) {
    auto slot = entries_.lock_next(at, last);
    if (!slot) break;
    at = slot->index + slot->entry.pages();
    if (slot->entry.zero()) {
      (void)unmap_mapping_range(slot->index, slot->entry.pages(), false);  // keep private copies
      entries_.erase(slot->index);
    } else {
      entries_.unlock(slot->index);
    }
  }
}

Result<std::uint64_t> Inode::write(std::uint64_t off, const void* buf, std::uint64_t len) {
  if (len == 0) return std::uint64_t{0};
  if (buf == nullptr) return Error(Errc::invalid_argument, "write: null buffer");
  const std::uint64_t dev = size();
  if (off > dev || len > dev - off) {
    return Error(Errc::out_of_range, fmt::format("write: [{:#x}, +{:#x}) past the largest file "
                                                 "size {:#x}",
                                                 off, len, dev));
  }
  const std::uint64_t first = off >> kPageShift;
  const std::uint64_t last = pages_of(off + len);
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  // Reflinked blocks in the range are unshared first (copy to a private block), after their
  // layout in this file is broken.
  std::vector<std::uint64_t> holes;
  std::vector<std::uint64_t> shared;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (std::uint64_t p = first; p < last; ++p) {
      auto it = blocks_.find(p);
      if (it == blocks_.end()) {
        holes.push_back(p);
      } else if (fs_->allocator().share_count(it->second) > 1) {
        shared.push_back(p);
      }
    }
  }
  // Allocate everything first: on ENOSPC nothing has changed.
  std::vector<std::uint64_t> fresh;
  for (std::size_t i = 0; i < holes.size() + shared.size(); ++i) {
    auto b = fs_->allocator().alloc();
    if (b && zero_blocks(*b, 1) == Errc::ok) {
      fresh.push_back(*b);
      continue;
    }
    if (b) (void)fs_->allocator().release(*b);
    for (std::uint64_t f : fresh)
      (void)fs_->allocator().release(f);  // ours, never visible
    return Error(b ? Errc::dead : b.code(), name() + ": write cannot allocate");
  }
  if (!shared.empty()) {
    Status s = break_layout_locked(inv, shared.front(), shared.back() + 1, BreakOptions{}, false);
    if (!s) {
      for (std::uint64_t f : fresh)
        (void)fs_->allocator().release(f);
      return s.error();
    }
    delete_entries(shared.front(), shared.back() + 1);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::size_t k = 0;
    for (std::uint64_t p : holes)
      blocks_[p] = fresh[k++];
    for (std::uint64_t p : shared) {
      const std::uint64_t old = blocks_[p];
      (void)copy_block(old, fresh[k]);  // both blocks are ours while the lock is held
      blocks_[p] = fresh[k++];
      (void)fs_->allocator().release(old);  // one sharer less; another file keeps it
    }
  }
  if (!holes.empty()) drop_zero_entries(holes.front(), holes.back() + 1);
  // Copy the data through direct_access.
  const auto* src = static_cast<const std::byte*>(buf);
  std::uint64_t done = 0;
  {
    dax::DaxDevice::ReadLock rl;
    while (done < len) {
      const std::uint64_t pos = off + done;
      const std::uint64_t page = pos >> kPageShift;
      const std::uint64_t in = pos & (kPageSize - 1);
      const std::uint64_t chunk = std::min(len - done, kPageSize - in);
      auto b = block_of(page);
      auto acc = fs_->dax_device().direct_access(*b, 1);
      if (!acc) return acc.error();
      pgmap::detail::shared_copy(acc->kaddr + in, src + done, chunk);
      done += chunk;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  size_ = std::max(size_, off + len);
  return len;
}

Result<std::uint64_t> Inode::read(std::uint64_t off, void* buf, std::uint64_t len) {
  if (len != 0 && buf == nullptr) return Error(Errc::invalid_argument, "read: null buffer");
  std::shared_lock<std::shared_mutex> inv(invalidate_lock_);
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  const std::uint64_t size = i_size();
  if (off >= size) return std::uint64_t{0};
  len = std::min(len, size - off);
  auto* dst = static_cast<std::byte*>(buf);
  dax::DaxDevice::ReadLock rl;
  for (std::uint64_t done = 0; done < len;) {
    const std::uint64_t pos = off + done;
    const std::uint64_t in = pos & (kPageSize - 1);
    const std::uint64_t chunk = std::min(len - done, kPageSize - in);
    if (auto b = block_of(pos >> kPageShift)) {
      auto acc = fs_->dax_device().direct_access(*b, 1);
      if (!acc) return acc.error();
      pgmap::detail::shared_copy(dst + done, acc->kaddr + in, chunk);
    } else {
      std::memset(dst + done, 0, chunk);
    }
    done += chunk;
  }
  return len;
}

// ---- layout breaking (§3.7)
// -------------------------------------------------------------------------

Status Inode::break_layout_locked(std::unique_lock<std::shared_mutex>& inv, std::uint64_t first,
                                  std::uint64_t last, const BreakOptions& opts,
                                  bool uninterruptible) {
  DevPagemap& pg = fs_->pagemap();
  const Deadline deadline = deadline_after(opts.timeout);
  if (auto cover = entries_.peek(first)) first = std::min(first, cover->index);
  bool zapped = false;
  for (;;) {
    // 1. No user mapping of the range survives (dax_layout_busy_page_range's unmap).
    // Private copy-on-write pages are not file pages: they stay (even_cows false).
    zapped |= unmap_mapping_range(first, last == kAll ? 0 : last - first, false) != 0;
    // 2. Scan every entry, waiting in place for locked ones (bug 5.5), for a busy folio — mapped
    // or not (bug 5.4).
    std::optional<Pfn> busy;
    for (std::uint64_t at = first; !busy;) {
      auto slot = entries_.lock_next(at, last);
      if (!slot) break;
      at = slot->index + slot->entry.pages();
      if (slot->entry.is_block()) {
        Folio f = folio_of(pg, slot->entry.pfn());
        if (f && folio_busy(f)) busy = slot->entry.pfn();
      }
      entries_.unlock(slot->index);
    }
    if (!busy) {
      // The kernel's zap returns after the TLB flush: no CPU still loads or stores through a
      // zapped entry, so the caller may free the blocks. Here a process's access that looked
      // the entry up before the zap may still be copying (mm/translation_users.h); wait for it,
      // or its store could land in a block already handed to another file (pgmap-stress --fs,
      // seed 23519509765207).
      if (zapped) mm::flush_translations();
      return {};
    }
    if (opts.nowait) {
      return Error(Errc::busy,
                   fmt::format("{}: pfn {:#x} is busy (EAGAIN: not waiting)", name(), *busy));
    }
    // 3. Wait for it to go idle without the invalidate lock (a pinner may need to fault), then
    // scan again from the start: new pins may have been taken meanwhile.
    Folio f = folio_of(pg, *busy);
    std::atomic<std::uint32_t>& ref = f.a->ref(f.head);
    Interrupt* intr = uninterruptible ? nullptr : opts.interrupt;
    WaitOptions w;
    w.deadline = deadline;
    const auto t0 = Clock::now();
    if (uninterruptible) {
      // Eviction: wait as long as it takes, but say who is waited for.
      w.progress_every = fs_->options().evict_report_every;
      w.progress = [&] {
        HolderReport rep;
        rep.object = fmt::format("{} eviction, waiting {:.1f} s", name(),
                                 std::chrono::duration<double>(Clock::now() - t0).count());
        for (const EntryMap::Slot& s : entries_.snapshot()) {
          if (!s.entry.is_block()) continue;
          Folio g = folio_of(pg, s.entry.pfn());
          if (!g || !folio_busy(g)) continue;
          ++rep.total_busy;
          const std::uint32_t r = g.a->ref(g.head).load();
          rep.busy.push_back(BusyPage{
              s.entry.pfn(), g.a->order(g.head), r, g.a->mapcount(g.head).load(),
              g.a->uses_pin_bias(g.head) ? r / PageArray::kPinBias : g.a->pincount(g.head).load(),
              this});
        }
        if (fs_->options().on_evict_report) {
          fs_->options().on_evict_report(*this, rep);
        } else {
          std::fprintf(stderr, "pgmap fs: %s\n", rep.to_string().c_str());
        }
      };
    } else {
      // "Idle for us" is the refcount down to the mapcount, and a put wakes only when the
      // refcount reaches 0. Two things make the refcount stop above 0: another file's mappings
      // of a shared folio, and a fault that maps the folio again while this wait has the
      // invalidate lock dropped (then the holder's put brings it down to that mapping's
      // reference). Re-check periodically as well; the next round unmaps it again.
      w.progress_every = std::chrono::milliseconds(10);
      w.progress = [] {};
    }
    if (intr != nullptr) intr->set_waiting_on(&ref);
    inv.unlock();
    PGMAP_YIELD_POINT("fs.break_layout_wait");
    Errc waited = wait_var_event(
        &ref,
        [&] {
          if (intr != nullptr && intr->raised()) return true;
          return !folio_busy(f);
        },
        w);
    inv.lock();
    if (intr != nullptr) intr->set_waiting_on(nullptr);
    if (intr != nullptr && intr->raised()) {
      return Error(Errc::interrupted, name() + ": break_layout interrupted");
    }
    if (waited == Errc::timed_out) {
      HolderReport rep = pg.holders();
      std::string msg =
          fmt::format("{}: timed out waiting for pfn {:#x}: {}", name(), *busy, rep.to_string());
      return Error(Errc::timed_out, std::move(msg),
                   std::make_shared<const HolderReport>(std::move(rep)));
    }
  }
}

Status Inode::break_layout(std::uint64_t first, std::uint64_t last, const BreakOptions& opts) {
  if (first >= last) return Error(Errc::invalid_argument, "break_layout: empty range");
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  return break_layout_locked(inv, first, last, opts, false);
}

void Inode::delete_entries(std::uint64_t first, std::uint64_t last) {
  if (auto cover = entries_.peek(first)) first = std::min(first, cover->index);
  for (std::uint64_t at = first;;) {
    auto slot = entries_.lock_next(at, last);
    if (!slot) break;
    at = slot->index + slot->entry.pages();
    if (slot->entry.is_block()) disassociate(slot->index, slot->entry);
    entries_.erase(slot->index);
  }
}

void Inode::free_pages_locked(std::uint64_t first, std::uint64_t last) {
  for (auto it = blocks_.lower_bound(first); it != blocks_.end() && it->first < last;) {
    (void)fs_->allocator().release(it->second);  // an underflow is reported as misuse
    it = blocks_.erase(it);
  }
}

Status Inode::truncate(std::uint64_t new_size, const BreakOptions& opts) {
  if (new_size > size()) {
    return Error(Errc::out_of_range,
                 fmt::format("truncate: {:#x} past the largest file size", new_size));
  }
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  const std::uint64_t old = i_size();
  if (new_size >= old) {
    std::lock_guard<std::mutex> lock(mu_);
    size_ = new_size;
    return {};
  }
  const std::uint64_t first = pages_of(new_size);
  if (Status s = break_layout_locked(inv, first, kAll, opts, false); !s) return s;
  delete_entries(first, kAll);
  // truncate_pagecache: private copy-on-write pages past the new EOF go too (even_cows).
  (void)unmap_mapping_range(first, 0, true);
  // The tail of the last partial page reads as zeros if the file grows again.
  if (!is_aligned(new_size, kPageSize)) {
    if (auto b = block_of(new_size >> kPageShift)) {
      dax::DaxDevice::ReadLock rl;
      if (auto acc = fs_->dax_device().direct_access(*b, 1)) {
        const std::uint64_t in = new_size & (kPageSize - 1);
        pgmap::detail::shared_fill(acc->kaddr + in, std::byte{0}, kPageSize - in);
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  free_pages_locked(first, kAll);
  size_ = new_size;
  return {};
}

Status Inode::fallocate(FallocMode mode, std::uint64_t off, std::uint64_t len,
                        const FallocOptions& opts) {
  if (len == 0 || off > kAll - len) return Error(Errc::invalid_argument, "fallocate: bad range");
  if (off + len > size()) {
    return Error(Errc::out_of_range, "fallocate: range past the largest file size");
  }
  if (mode != FallocMode::allocate &&
      (!is_aligned(off, kPageSize) || !is_aligned(len, kPageSize))) {
    return Error(Errc::unaligned, "fallocate: offset and length must be 4 KiB aligned");
  }
  if (opts.pmd_aligned && mode != FallocMode::allocate) {
    return Error(Errc::invalid_argument, "fallocate: pmd_aligned applies to allocations only");
  }
  if (opts.pmd_aligned && (!is_aligned(off, kPmdSize) || !is_aligned(len, kPmdSize))) {
    return Error(Errc::unaligned,
                 "fallocate: a 2 MiB-aligned allocation needs a 2 MiB-aligned range");
  }
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  const std::uint64_t first = off >> kPageShift;
  const std::uint64_t last = pages_of(off + len);
  const std::uint64_t old_size = i_size();

  if (mode == FallocMode::allocate) {
    // Plan, allocate, then publish: on ENOSPC nothing has changed.
    std::vector<std::uint64_t> fresh;  // every block taken, for the undo
    std::map<std::uint64_t, std::uint64_t> plan;
    std::map<std::uint64_t, std::uint64_t> have;
    {
      std::lock_guard<std::mutex> lock(mu_);
      have = blocks_;
    }
    auto release_all = [&] {
      for (std::uint64_t b : fresh)
        (void)fs_->allocator().release(b);  // ours, never visible
    };
    for (std::uint64_t p = first; p < last;) {
      const bool chunk = opts.pmd_aligned && is_aligned(p, kPmdPages) && p + kPmdPages <= last;
      bool chunk_hole = chunk;
      for (std::uint64_t i = 0; chunk_hole && i < kPmdPages; ++i)
        chunk_hole = have.find(p + i) == have.end();
      if (chunk_hole) {
        auto b = fs_->allocator().alloc_extent(kPmdPages, kPmdPages);
        if (!b) {
          release_all();
          return b.error();
        }
        for (std::uint64_t i = 0; i < kPmdPages; ++i) {
          fresh.push_back(*b + i);
          plan[p + i] = *b + i;
        }
        p += kPmdPages;
        continue;
      }
      if (have.find(p) == have.end()) {
        auto b = fs_->allocator().alloc();
        if (!b) {
          release_all();
          return b.error();
        }
        fresh.push_back(*b);
        plan[p] = *b;
      }
      ++p;
    }
    for (auto [page, b] : plan) {
      if (Errc z = zero_blocks(b, 1); z != Errc::ok) {
        release_all();
        return Error(z, name() + ": fallocate cannot zero its blocks");
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto [page, b] : plan)
        blocks_[page] = b;
      if (!opts.keep_size) size_ = std::max(size_, off + len);
    }
    if (!plan.empty()) drop_zero_entries(plan.begin()->first, plan.rbegin()->first + 1);
    return {};
  }

  if (mode == FallocMode::collapse_range) {
    if (off + len >= old_size) {
      return Error(Errc::invalid_argument, "collapse_range: the range must end before EOF");
    }
    // Everything from off moves: break and drop it all.
    if (Status s = break_layout_locked(inv, first, kAll, opts.brk, false); !s) return s;
    delete_entries(first, kAll);
    std::lock_guard<std::mutex> lock(mu_);
    free_pages_locked(first, last);
    std::map<std::uint64_t, std::uint64_t> moved;
    for (auto it = blocks_.lower_bound(last); it != blocks_.end();) {
      moved.emplace(it->first - (last - first), it->second);
      it = blocks_.erase(it);
    }
    blocks_.insert(moved.begin(), moved.end());
    size_ -= len;
    return {};
  }

  // punch_hole, zero_range: the range becomes a hole (reads as zeros).
  const std::uint64_t stop = std::min(last, pages_of(old_size));
  if (first < stop) {
    if (Status s = break_layout_locked(inv, first, stop, opts.brk, false); !s) return s;
    delete_entries(first, stop);
    std::lock_guard<std::mutex> lock(mu_);
    free_pages_locked(first, stop);
  }
  if (mode == FallocMode::zero_range && !opts.keep_size) {
    std::lock_guard<std::mutex> lock(mu_);
    size_ = std::max(size_, off + len);
  }
  return {};
}

// ---- queries
// -----------------------------------------------------------------------------------------

Result<IomapExtent> Inode::iomap(std::uint64_t off) const {
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  std::lock_guard<std::mutex> lock(mu_);
  if (off >= size_)
    return Error(Errc::out_of_range, fmt::format("iomap: {:#x} at or past EOF", off));
  const std::uint64_t page = off >> kPageShift;
  const std::uint64_t eof = pages_of(size_);
  IomapExtent x;
  x.offset = page << kPageShift;
  auto it = blocks_.find(page);
  if (it == blocks_.end()) {
    auto next = blocks_.lower_bound(page);
    const std::uint64_t end = next == blocks_.end() ? eof : std::min(eof, next->first);
    x.type = IomapExtent::Type::hole;
    x.length = (end - page) << kPageShift;
    return x;
  }
  std::uint64_t n = 0;
  for (auto b = it; b != blocks_.end() && b->first == page + n && b->second == it->second + n;
       ++b, ++n) {
    if (fs_->allocator().share_count(b->second) > 1) x.shared = true;
  }
  x.type = IomapExtent::Type::mapped;
  x.length = n << kPageShift;
  x.device_offset = it->second << kPageShift;
  const PfnRange r = fs_->pagemap().range(0);
  x.pfn = r.start + it->second;
  return x;
}

Result<std::vector<FiemapExtent>> Inode::fiemap() const {
  if (Errc e = check_usable(); e != Errc::ok) return Error(e, name() + " is shut down or evicted");
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<FiemapExtent> out;
  for (const auto& [page, block] : blocks_) {
    const bool shared = fs_->allocator().share_count(block) > 1;
    if (!out.empty()) {
      FiemapExtent& l = out.back();
      if (l.logical + l.length == page << kPageShift &&
          l.physical + l.length == block << kPageShift && l.shared == shared) {
        l.length += kPageSize;
        continue;
      }
    }
    out.push_back(FiemapExtent{page << kPageShift, block << kPageShift, kPageSize, shared});
  }
  return out;
}

// ---- eviction (I8, bug 5.3)
// ---------------------------------------------------------------------------

void Inode::evict() {
  std::unique_lock<std::shared_mutex> inv(invalidate_lock_);
  // Uninterruptible: every page of the file must be idle before its blocks are freed.
  Status s = break_layout_locked(inv, 0, kAll, BreakOptions{}, /*uninterruptible=*/true);
  if (!s)
    std::fprintf(stderr, "pgmap fs: %s eviction: %s\n", name().c_str(), s.to_string().c_str());
  delete_entries(0, kAll);
  std::lock_guard<std::mutex> lock(mu_);
  free_pages_locked(0, kAll);
  allocations_.clear();
  state_ = State::evicted;
}

}  // namespace pgmap::fs
