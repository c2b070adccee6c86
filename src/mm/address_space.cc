#include "pgmap/mm/address_space.h"

#include <fmt/format.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "memory/device_bytes.h"
#include "mm/gup_access.h"
#include "mm/page_table.h"
#include "mm/translation_users.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/mm/anon_pool.h"

namespace pgmap::mm {
namespace {

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

// si_addr_lsb of a memory-failure SIGBUS at `level` (log2 of the mapping size).
constexpr unsigned mce_addr_lsb(Level l) {
  return kPageShift + level_order(l);
}

SignalInfo sigsegv(std::uint64_t addr, SigCode code, std::string why) {
  return SignalInfo{Signal::sigsegv, code, addr, 0, std::move(why)};
}

// BUS_ADRERR (addr_lsb 0, as Linux) or BUS_MCEERR_* (addr_lsb of the level).
SignalInfo sigbus(std::uint64_t addr, Level level, SigCode code, std::string why) {
  const bool mce = code == SigCode::bus_mceerr_ar || code == SigCode::bus_mceerr_ao;
  return SignalInfo{Signal::sigbus, mce ? code : SigCode::bus_adrerr, addr,
                    mce ? mce_addr_lsb(level) : 0u, std::move(why)};
}

SignalInfo sigbus(std::uint64_t addr, Level level, std::string why) {
  return sigbus(addr, level, SigCode::bus_adrerr, std::move(why));
}

std::uint32_t prot_flags(std::uint32_t prot) {
  std::uint32_t f = 0;
  if ((prot & (kProtRead | kProtWrite)) != 0) f |= kVmRead;  // write implies read (x86)
  if ((prot & kProtWrite) != 0) f |= kVmWrite;
  return f;
}

// [start, start + len) without overflow and inside the user address range.
bool range_ok(std::uint64_t start, std::uint64_t len) {
  return start <= AddressSpace::kTaskSize && len <= AddressSpace::kTaskSize - start;
}

// len rounded up to whole pages, or nullopt when no range of that length fits the user address
// range (checked before rounding: align_up of a length near 2^64 wraps to a small value).
std::optional<std::uint64_t> page_len(std::uint64_t len) {
  if (len > AddressSpace::kTaskSize) return std::nullopt;
  return align_up(len, kPageSize);
}

}  // namespace

struct AddressSpace::Impl {
  explicit Impl(AddressSpace* s) : self(s) {}

  AddressSpace* const self;
  PageTable pt;
  std::map<std::uint64_t, std::unique_ptr<Vma>> vmas;  // by start; guarded by mmap_lock

  // ---- VMAs (mmap_lock held) ----

  Vma* find(std::uint64_t addr) const {
    auto it = vmas.upper_bound(addr);
    if (it == vmas.begin()) return nullptr;
    --it;
    return addr < it->second->end ? it->second.get() : nullptr;
  }

  std::vector<Vma*> overlapping(std::uint64_t start, std::uint64_t end) const {
    std::vector<Vma*> out;
    auto it = vmas.upper_bound(start);
    if (it != vmas.begin()) --it;
    for (; it != vmas.end() && it->second->start < end; ++it) {
      if (it->second->end > start) out.push_back(it->second.get());
    }
    return out;
  }

  bool range_free(std::uint64_t start, std::uint64_t end) const {
    return overlapping(start, end).empty();
  }

  // A free range of len bytes: the hint if it fits, else the first 1 GiB aligned gap from
  // kMmapBase.
  std::optional<std::uint64_t> find_free(std::uint64_t len, std::uint64_t hint) const {
    if (hint != 0 && is_aligned(hint, kPageSize) && range_ok(hint, len) &&
        range_free(hint, hint + len)) {
      return hint;
    }
    std::uint64_t cand = kMmapBase;
    for (const auto& [start, vma] : vmas) {
      if (vma->end <= cand) continue;
      if (start >= cand && start - cand >= len) break;
      cand = align_up(vma->end, kGiB);
    }
    if (!range_ok(cand, len)) return std::nullopt;
    return cand;
  }

  // Asks the owner of the VMA strictly containing addr whether it may be cut there.
  Errc check_cut(std::uint64_t addr) const {
    Vma* v = find(addr);
    if (v == nullptr || v->start == addr) return Errc::ok;
    return v->owner->may_split(*v, addr) == Errc::ok ? Errc::ok : Errc::invalid_argument;
  }

  // A huge leaf that a VMA cut at addr would split is zapped (it faults back in smaller), as the
  // kernel splits (for DAX: zaps) a huge PMD when a VMA boundary falls inside it.
  void split_huge(std::uint64_t addr) {
    auto leaf = pt.lookup(addr);
    if (leaf && leaf->addr != addr) (void)pt.zap(addr, addr + 1);
  }

  static std::unique_ptr<Vma> piece(const Vma& v, std::uint64_t start, std::uint64_t end) {
    auto p = std::make_unique<Vma>(v);
    p->start = start;
    p->end = end;
    p->pgoff = v.pgoff_of(start);
    return p;
  }

  void insert(std::unique_ptr<Vma> v) {
    v->owner->link(v.get());
    const std::uint64_t start = v->start;
    vmas.emplace(start, std::move(v));
  }

  // Replaces `old` by `pieces`: the pieces are linked before the old VMA is unlinked, so
  // unmap_mapping_range always finds the entries of the range through one of them.
  std::unique_ptr<Vma> replace(Vma* old, std::vector<std::unique_ptr<Vma>> pieces) {
    auto it = vmas.find(old->start);
    std::unique_ptr<Vma> gone = std::move(it->second);
    vmas.erase(it);
    for (auto& p : pieces)
      insert(std::move(p));
    gone->owner->unlink(gone.get());
    return gone;
  }

  // munmap with the cuts already approved.
  void unmap(std::uint64_t start, std::uint64_t end) {
    std::vector<Vma*> affected = overlapping(start, end);
    if (affected.empty()) return;
    split_huge(start);
    split_huge(end);
    (void)pt.zap(start, end);
    for (Vma* v : affected) {
      std::vector<std::unique_ptr<Vma>> keep;
      if (v->start < start) keep.push_back(piece(*v, v->start, start));
      if (v->end > end) keep.push_back(piece(*v, end, v->end));
      const bool whole = keep.empty();
      std::unique_ptr<Vma> removed =
          whole ? nullptr : piece(*v, std::max(v->start, start), std::min(v->end, end));
      std::unique_ptr<Vma> gone = replace(v, std::move(keep));
      gone->owner->on_close(whole ? *gone : *removed);
    }
    free_tables_around(start, end);
  }

  // free_pgtables: the tables wholly inside the gap around [start, end) that no VMA covers any
  // more, and empty, are unlinked (and deleted after a grace period by reclaim(), which the caller
  // runs once mmap_lock is dropped). The VMAs of the range are unlinked from their owners already,
  // so no rmap zap walks these tables; mmap_lock exclusive keeps faults out.
  void free_tables_around(std::uint64_t start, std::uint64_t end) {
    std::uint64_t lo = 0;
    std::uint64_t hi = PageTable::kSpan;
    auto next = vmas.lower_bound(start);
    if (next != vmas.end()) hi = std::min(hi, next->second->start);
    if (next != vmas.begin()) lo = std::prev(next)->second->end;
    if (lo > start || hi < end) return;  // still covered (not expected after unmap)
    (void)pt.free_empty_tables(lo, hi);
  }

  // ---- faults (mmap_lock held shared or exclusive) ----

  SignalInfo fault(std::uint64_t addr, bool write) {
    Vma* v = find(addr);
    if (v == nullptr)
      return sigsegv(addr, SigCode::segv_maperr, fmt::format("no VMA at {:#x}", addr));
    if (write && !v->writable()) {
      return sigsegv(addr, SigCode::segv_accerr,
                     fmt::format("write to read-only VMA [{:#x}, {:#x})", v->start, v->end));
    }
    if ((v->flags & (kVmRead | kVmWrite)) == 0) {
      return sigsegv(addr, SigCode::segv_accerr,
                     fmt::format("access to PROT_NONE VMA [{:#x}, {:#x})", v->start, v->end));
    }
    if (write && !v->shared()) return cow_fault(*v, addr);
    MappingOwner& owner = *v->owner;
    for (;;) {
      if (auto leaf = pt.lookup(addr)) {
        if (!write || leaf->writable) return {};  // spurious: someone else faulted it in
        if (!owner.pfn_mkwrite(
                *v, FaultRequest{leaf->addr, v->pgoff_of(leaf->addr), leaf->level, true})) {
          (void)pt.zap(leaf->addr, leaf->addr + level_bytes(leaf->level));  // refault for write
          continue;
        }
        if (pt.make_writable(addr)) return {};  // RO -> RW upgrade (after mprotect)
        continue;                               // zapped meanwhile: fault it in
      }
      const std::uint64_t seq = owner.mapping_seq();
      bool retry = false;
      const Level top = std::min(owner.max_level(), Level::pud);
      for (int li = static_cast<int>(top); li >= 0 && !retry; --li) {
        const auto level = static_cast<Level>(li);
        const std::uint64_t bytes = level_bytes(level);
        const std::uint64_t at = align_down(addr, bytes);
        if (level != Level::pte) {
          if (at < v->start || at + bytes > v->end) continue;  // the VMA does not cover it
          const PageTable::Probe slot = pt.probe(at, level);
          if (slot == PageTable::Probe::blocked) continue;  // smaller entries are there
          if (slot == PageTable::Probe::mapped) {
            // A concurrent fault put an entry there after the lookup above: look again (it is
            // spurious now), never ask the owner for a smaller entry under the one just mapped.
            retry = true;
            break;
          }
        }
        FaultRequest req{at, v->pgoff_of(at), level, write};
        FaultResult res = owner.fault(*v, req);
        // The owner's read section has ended: only the reference it handed back keeps the folio
        // and its pagemap alive from here on.
        PGMAP_YIELD_POINT("fault.after_owner");
        if (res.kind == FaultResult::Kind::fallback) continue;
        if (res.kind == FaultResult::Kind::sigbus) {
          return sigbus(addr, level, res.code, std::move(res.why));
        }
        PageRef ref = std::move(res.ref);
        if (!ref || ref.refs() != 1) {
          return sigbus(addr, level,
                        fmt::format("{} returned an insert without exactly one folio reference",
                                    owner.name()));
        }
        DevPagemap* pg = ref.pagemap();
        const Pfn pfn = ref.pfn();
        PageArray* a = pg->array_for(pfn);
        if (a == nullptr) {
          return sigbus(
              addr, level,
              fmt::format("{} returned pfn {:#x} outside its pagemap", owner.name(), pfn));
        }
        // The entry must lie inside one folio at least as large as the level.
        if (!is_aligned(pfn, order_pages(level_order(level))) ||
            a->order(a->index_of(pfn)) < level_order(level)) {
          continue;  // `ref` is released: try the next smaller level
        }
        switch (pt.install(at, level, pfn, pg, write)) {
          case PageTable::Install::installed:
            (void)ref.disown();       // the entry owns the reference now; zap drops it
            sanitizer::full_fence();  // the entry store before the sequence load
            if (owner.mapping_seq() != seq) {
              // unmap_mapping_range ran since fault(): this entry may be stale.
              (void)pt.zap(at, at + bytes);
            } else {
              return {};
            }
            retry = true;
            break;
          case PageTable::Install::mapped:
            retry = true;  // a concurrent fault won; `ref` is released
            break;
          case PageTable::Install::blocked:
            break;  // smaller entries appeared: try a smaller level; `ref` is released
        }
      }
      if (!retry) {
        return sigbus(addr, Level::pte,
                      fmt::format("{} cannot map {:#x} at any level", owner.name(), addr));
      }
    }
  }

  // ---- copy-on-write (MAP_PRIVATE; mmap_lock held shared or exclusive) ----
  //
  // A private VMA maps its owner's pages read-only (a read fault is an ordinary fault with write
  // false, PMD where the owner offers one). A write fault on a private VMA:
  //   * a writable entry: spurious, done;
  //   * a read-only huge entry: split — zapped (for a file VMA the kernel's PMD split just zaps
  //     it) — and the 4 KiB page faulted again below; the other pages refault at 4 KiB later;
  //   * a read-only anonymous page held by this entry alone (refcount 1: no other mapping after
  //     fork, no GUP reference): made writable in place (reuse);
  //   * a read-only owner page, or an anonymous page still shared (after fork) or referenced: its
  //     bytes are copied into a fresh anonymous page which replaces the entry, writable (the old
  //     entry's reference and mapcount are dropped: the other side keeps the old page);
  //   * no entry: the owner is asked for the page (level pte, write false, cow true) — a hole gives
  //     its zero page — the bytes are copied into a fresh anonymous page and the owner's reference
  //     released; the anonymous page is installed writable (do_cow_fault). The mapping_seq check
  //     removes it again if an unmap_mapping_range (truncate) ran meanwhile.
  SignalInfo cow_fault(const Vma& v, std::uint64_t addr) {
    MappingOwner& owner = *v.owner;
    AnonPool& pool = AnonPool::global();
    const std::uint64_t page = align_down(addr, kPageSize);
    for (;;) {
      if (auto leaf = pt.lookup(page)) {
        if (leaf->writable) return {};
        if (leaf->level != Level::pte) {
          if (pt.zap(leaf->addr, leaf->addr + level_bytes(leaf->level)) != 0) {
            owner.count_cow(MappingOwner::CowEvent::pmd_split);
          }
          continue;
        }
        const bool anon = AnonPool::is_anon(leaf->pgmap);
        if (anon && leaf->pgmap->folio_ref_count(leaf->pfn) == 1) {
          // Ours alone. A GUP that takes a reference from here on sees the same page written.
          if (pt.make_writable_if(page, leaf->raw)) {
            owner.count_cow(MappingOwner::CowEvent::anon_reuse);
            return {};
          }
          continue;
        }
        Result<PageRef> fresh = Error(Errc::busy, "entry changed");
        {
          // Only the entry's reference holds the source: the read section keeps its bytes valid
          // if a concurrent zap drops it (as access() does); the copy is discarded then.
          rcu::ReadGuard guard;
          TranslationUse use;
          auto now = pt.lookup(page);
          if (now && now->raw == leaf->raw) {
            fresh = pool.alloc(leaf->pgmap->address_of(leaf->pfn));
          }
        }
        if (!fresh && fresh.code() == Errc::busy) continue;
        if (!fresh) return sigbus(addr, Level::pte, fresh.error().to_string());
        PageRef ref = std::move(fresh).value();
        PGMAP_YIELD_POINT("cow.before_replace");
        if (pt.replace(page, leaf->raw, ref.pfn(), ref.pagemap(), true)) {
          (void)ref.disown();  // the entry owns it now
          owner.count_cow(anon ? MappingOwner::CowEvent::anon_copy
                               : MappingOwner::CowEvent::file_copy);
          return {};
        }
        continue;  // the entry changed: `ref` is released (the page goes back to the pool)
      }
      const std::uint64_t seq = owner.mapping_seq();
      FaultRequest req{page, v.pgoff_of(page), Level::pte, false, true};
      FaultResult res = owner.fault(v, req);
      PGMAP_YIELD_POINT("cow.after_owner");
      if (res.kind == FaultResult::Kind::fallback) {
        return sigbus(addr, Level::pte,
                      fmt::format("{} cannot map {:#x} at any level", owner.name(), addr));
      }
      if (res.kind == FaultResult::Kind::sigbus) {
        return sigbus(addr, Level::pte, res.code, std::move(res.why));
      }
      Result<PageRef> fresh = Error(Errc::invalid_argument, "bad source");
      {
        PageRef src = std::move(res.ref);
        if (!src || src.refs() != 1 || src.pagemap()->array_for(src.pfn()) == nullptr) {
          return sigbus(addr, Level::pte,
                        fmt::format("{} returned an insert without exactly one folio reference",
                                    owner.name()));
        }
        fresh = pool.alloc(src.pagemap()->address_of(src.pfn()));
      }  // the owner's page reference is released: only its bytes were needed
      if (!fresh) return sigbus(addr, Level::pte, fresh.error().to_string());
      PageRef ref = std::move(fresh).value();
      if (pt.install(page, Level::pte, ref.pfn(), ref.pagemap(), true) !=
          PageTable::Install::installed) {
        continue;  // a concurrent fault won; `ref` is released
      }
      (void)ref.disown();
      sanitizer::full_fence();  // the entry store before the sequence load
      if (owner.mapping_seq() != seq) {
        (void)pt.zap(page, page + kPageSize);  // maybe copied from a page truncated meanwhile
        continue;
      }
      owner.count_cow(MappingOwner::CowEvent::file_copy);
      return {};
    }
  }

  // fork of a private VMA `v` into `to` (the child's table), with the owner's i_mmap lock held
  // and mmap_lock exclusive: every entry is stable. Owner pages are shared read-only; anonymous
  // pages are shared with one more reference and mapcount and write-protected on both sides, so
  // the next write of either side copies (or reuses, once the other side let go). A page with a
  // DMA pin is copied for the child at once and stays writable in the parent (the pin may write
  // it; Linux's copy_present_page).
  void copy_private(const Vma& v, PageTable& to) {
    for (const PageTable::Leaf& l : pt.leaves(v.start, v.end)) {
      DevPagemap* pg = l.pgmap;
      if (!AnonPool::is_anon(pg)) {
        if (pg->get_folio(l.pfn) != Errc::ok) continue;  // dying: the child faults it again
        if (to.install(l.addr, l.level, l.pfn, pg, false) != PageTable::Install::installed) {
          (void)pg->put_folio(l.pfn);  // ours: the install did not take it
        }
        continue;
      }
      const bool protect = l.writable && pt.write_protect_if(l.addr, l.raw);
      sanitizer::full_fence();  // the write-protect before the pin check (gup-fast re-checks)
      if (pg->folio_maybe_dma_pinned(l.pfn)) {
        auto fresh = AnonPool::global().alloc(pg->address_of(l.pfn));
        if (fresh) {
          if (protect) (void)pt.make_writable_if(l.addr, l.raw & ~pte::kWrite);
          PageRef r = std::move(fresh).value();
          if (to.install(l.addr, Level::pte, r.pfn(), r.pagemap(), true) ==
              PageTable::Install::installed) {
            (void)r.disown();
            v.owner->count_cow(MappingOwner::CowEvent::fork_copy);
          }
          continue;
        }
        // Out of anonymous memory: share it write-protected instead (the data stays right).
      }
      if (pg->get_folio(l.pfn) != Errc::ok) continue;
      if (to.install(l.addr, Level::pte, l.pfn, pg, false) != PageTable::Install::installed) {
        (void)pg->put_folio(l.pfn);
      }
    }
  }

  // ---- access ----

  // Copies len bytes at addr into `to` (read) or from `from` (write: `to` is null).
  SignalInfo access(std::uint64_t addr, std::byte* to, const std::byte* from, std::uint64_t len) {
    const bool write = to == nullptr;
    std::uint64_t done = 0;
    while (done < len) {
      const std::uint64_t at = addr + done;
      bool copied = false;
      {
        // The mapping's folio reference is the only one held: the read section keeps the
        // bytes valid if a concurrent zap drops it (memunmap waits for a grace period before it
        // revokes them), as a TLB shootdown would.
        rcu::ReadGuard guard;
        TranslationUse use;  // a zap's TLB flush waits for the copy (translation_users.h)
        auto leaf = pt.lookup(at);
        if (leaf && (!write || leaf->writable)) {
          const std::uint64_t chunk =
              std::min(len - done, leaf->addr + level_bytes(leaf->level) - at);
          std::byte* bytes = leaf->pgmap->address_of(leaf->pfn) + (at - leaf->addr);
          // Between the look-up and the copy: what a zap racing the access must wait for.
          PGMAP_YIELD_POINT("access.before_copy");
          if (write) {
            pgmap::detail::shared_copy(bytes, from + done, chunk);
          } else {
            pgmap::detail::shared_copy(to + done, bytes, chunk);
          }
          done += chunk;
          copied = true;
        }
      }
      if (copied) continue;
      if (SignalInfo sig = self->handle_fault(at, write)) return sig;
    }
    return {};
  }
};

// ---- AddressSpace ---------------------------------------------------------------------------

AddressSpace::AddressSpace() : impl_(std::make_unique<Impl>(this)) {}

AddressSpace::~AddressSpace() {
  std::unique_lock<std::shared_mutex> lock(mmap_lock_);
  (void)impl_->pt.zap(0, kTaskSize);
  for (auto& [start, vma] : impl_->vmas) {
    vma->owner->unlink(vma.get());
    vma->owner->on_close(*vma);
  }
  impl_->vmas.clear();
}

Result<std::uint64_t> AddressSpace::mmap(std::uint64_t addr, std::uint64_t len, std::uint32_t prot,
                                         std::uint32_t flags, std::shared_ptr<MappingOwner> owner,
                                         std::uint64_t offset) {
  if (!owner) return Error(Errc::invalid_argument, "mmap: no owner");
  if (len == 0 || !is_aligned(len, kPageSize) || !is_aligned(offset, kPageSize)) {
    return Error(Errc::invalid_argument,
                 fmt::format("mmap: len {:#x} / offset {:#x} not page aligned", len, offset));
  }
  const bool shared = (flags & kMapShared) != 0;
  if (shared == ((flags & kMapPrivate) != 0)) {
    return Error(Errc::invalid_argument, "mmap: exactly one of MAP_SHARED and MAP_PRIVATE");
  }
  if ((flags & ~(kMapShared | kMapPrivate | kMapFixed)) != 0 ||
      (prot & ~(kProtRead | kProtWrite)) != 0) {
    return Error(Errc::invalid_argument, "mmap: unknown prot or flags");
  }
  const bool fixed = (flags & kMapFixed) != 0;
  if (fixed && !is_aligned(addr, kPageSize)) {
    return Error(Errc::invalid_argument, fmt::format("mmap: MAP_FIXED at unaligned {:#x}", addr));
  }
  const std::uint64_t size = owner->size();
  if (offset > size || len > size - offset) {
    return Error(Errc::out_of_range,
                 fmt::format("mmap: [{:#x}, +{:#x}) past the end of {} ({:#x} bytes)", offset, len,
                             owner->name(), size));
  }
  if (fixed && !range_ok(addr, len)) {
    return Error(Errc::out_of_range,
                 fmt::format("mmap: [{:#x}, +{:#x}) past the task size", addr, len));
  }
  std::unique_lock<std::shared_mutex> lock(mmap_lock_);
  std::uint64_t start = addr;
  if (fixed) {
    if (impl_->check_cut(addr) != Errc::ok || impl_->check_cut(addr + len) != Errc::ok) {
      return Error(Errc::invalid_argument, "mmap: MAP_FIXED would split a VMA its owner refuses");
    }
  } else {
    auto free = impl_->find_free(len, addr);
    if (!free) return Error(Errc::no_memory, fmt::format("mmap: no free range of {:#x}", len));
    start = *free;
  }
  auto vma = std::make_unique<Vma>();
  vma->as = this;
  vma->start = start;
  vma->end = start + len;
  vma->flags = prot_flags(prot) | (shared ? std::uint32_t{kVmShared} : 0u) | owner->vma_flags();
  vma->pgoff = offset >> kPageShift;
  vma->owner = owner;
  if (Errc e = owner->on_mmap(*vma); e != Errc::ok) {
    return Error(e, fmt::format("mmap: {} refused [{:#x}, +{:#x})", owner->name(), offset, len));
  }
  if (fixed) impl_->unmap(start, start + len);
  impl_->insert(std::move(vma));
  lock.unlock();
  impl_->pt.reclaim();  // tables the MAP_FIXED unmap freed
  return start;
}

Errc AddressSpace::munmap(std::uint64_t addr, std::uint64_t len) {
  if (len == 0 || !is_aligned(addr, kPageSize)) return Errc::invalid_argument;
  const auto rounded = page_len(len);  // Linux: EINVAL when the rounded range wraps
  if (!rounded || !range_ok(addr, *rounded)) return Errc::invalid_argument;
  len = *rounded;
  {
    std::unique_lock<std::shared_mutex> lock(mmap_lock_);
    if (impl_->check_cut(addr) != Errc::ok || impl_->check_cut(addr + len) != Errc::ok) {
      return Errc::invalid_argument;
    }
    impl_->unmap(addr, addr + len);
  }
  impl_->pt.reclaim();  // after a grace period, without mmap_lock
  return Errc::ok;
}

Errc AddressSpace::mprotect(std::uint64_t addr, std::uint64_t len, std::uint32_t prot) {
  if (len == 0 || !is_aligned(addr, kPageSize) || (prot & ~(kProtRead | kProtWrite)) != 0) {
    return Errc::invalid_argument;
  }
  const auto rounded = page_len(len);
  // Linux: ENOMEM when the rounded range wraps or leaves the user address range.
  if (!rounded || !range_ok(addr, *rounded)) return Errc::no_memory;
  len = *rounded;
  const std::uint64_t end = addr + len;
  std::unique_lock<std::shared_mutex> lock(mmap_lock_);
  std::vector<Vma*> affected = impl_->overlapping(addr, end);
  // The range must be mapped throughout (Linux: ENOMEM).
  std::uint64_t covered = addr;
  for (Vma* v : affected) {
    if (v->start > covered) break;
    covered = v->end;
  }
  if (covered < end) return Errc::out_of_range;
  const std::uint32_t want = prot_flags(prot);
  auto new_flags = [&](const Vma& v) { return (v.flags & ~(kVmRead | kVmWrite)) | want; };
  std::vector<Vma*> changing;
  for (Vma* v : affected) {
    if (new_flags(*v) == v->flags) continue;
    changing.push_back(v);
  }
  if (changing.empty()) return Errc::ok;
  if ((changing.front()->start < addr && impl_->check_cut(addr) != Errc::ok) ||
      (changing.back()->end > end && impl_->check_cut(end) != Errc::ok)) {
    return Errc::invalid_argument;
  }
  if (changing.front()->start < addr) impl_->split_huge(addr);
  if (changing.back()->end > end) impl_->split_huge(end);
  for (Vma* v : changing) {
    std::vector<std::unique_ptr<Vma>> pieces;
    const std::uint64_t lo = std::max(v->start, addr);
    const std::uint64_t hi = std::min(v->end, end);
    if (v->start < lo) pieces.push_back(Impl::piece(*v, v->start, lo));
    auto mid = Impl::piece(*v, lo, hi);
    mid->flags = new_flags(*v);
    pieces.push_back(std::move(mid));
    if (hi < v->end) pieces.push_back(Impl::piece(*v, hi, v->end));
    (void)impl_->replace(v, std::move(pieces));
  }
  if ((want & kVmRead) == 0) {
    (void)impl_->pt.zap(addr, end);  // PROT_NONE: no entry may remain accessible
  } else if ((want & kVmWrite) == 0) {
    impl_->pt.write_protect(addr, end);
  }
  return Errc::ok;
}

Result<std::uint64_t> AddressSpace::mremap(std::uint64_t old_addr, std::uint64_t old_len,
                                           std::uint64_t new_len, std::uint32_t flags,
                                           std::uint64_t new_addr) {
  if (!is_aligned(old_addr, kPageSize) || old_len == 0 || new_len == 0 ||
      (flags & ~(kMremapMayMove | kMremapFixed)) != 0) {
    return Error(Errc::invalid_argument, "mremap: bad address, length or flags");
  }
  const bool fixed = (flags & kMremapFixed) != 0;
  const bool may_move = (flags & kMremapMayMove) != 0;
  if (fixed && (!may_move || !is_aligned(new_addr, kPageSize))) {
    return Error(Errc::invalid_argument, "mremap: MREMAP_FIXED needs MREMAP_MAYMOVE and alignment");
  }
  // Linux: EINVAL when a length rounds up past the end of the address space (PAGE_ALIGN wraps).
  const auto old_rounded = page_len(old_len);
  const auto new_rounded = page_len(new_len);
  if (!old_rounded || !new_rounded) {
    return Error(Errc::invalid_argument, "mremap: length past the task size");
  }
  old_len = *old_rounded;
  new_len = *new_rounded;
  if (!range_ok(old_addr, old_len) || !range_ok(old_addr, new_len)) {
    return Error(Errc::out_of_range, "mremap: range past the task size");
  }
  const std::uint64_t old_end = old_addr + old_len;
  std::unique_lock<std::shared_mutex> lock(mmap_lock_);
  Vma* v = impl_->find(old_addr);
  if (v == nullptr || old_end > v->end) {
    return Error(Errc::out_of_range,
                 fmt::format("mremap: [{:#x}, {:#x}) is not inside one VMA", old_addr, old_end));
  }
  const std::uint64_t pgoff = v->pgoff_of(old_addr);
  const bool private_vma = !v->shared();
  const std::uint64_t owner_pages = v->owner->size() >> kPageShift;
  if (pgoff > owner_pages || (new_len >> kPageShift) > owner_pages - pgoff) {
    return Error(Errc::out_of_range,
                 fmt::format("mremap: {:#x} bytes at page {} past the end of {}", new_len, pgoff,
                             v->owner->name()));
  }
  auto refused = [] {
    return Error(Errc::invalid_argument, "mremap: the owner refuses to split the VMA there");
  };

  if (!fixed) {
    if (new_len <= old_len) {  // shrink in place
      if (new_len < old_len) {
        if (impl_->check_cut(old_addr + new_len) != Errc::ok ||
            impl_->check_cut(old_end) != Errc::ok) {
          return refused();
        }
        impl_->unmap(old_addr + new_len, old_end);
        lock.unlock();
        impl_->pt.reclaim();
      }
      return old_addr;
    }
    // Grow in place when the range ends the VMA and the space after it is free.
    const std::uint64_t grow_end = old_addr + new_len;
    if (old_end == v->end && impl_->range_free(old_end, grow_end)) {
      std::vector<std::unique_ptr<Vma>> pieces;
      pieces.push_back(Impl::piece(*v, v->start, grow_end));
      (void)impl_->replace(v, std::move(pieces));
      return old_addr;
    }
    if (!may_move) {
      return Error(Errc::no_memory, "mremap: cannot grow in place and MREMAP_MAYMOVE not given");
    }
  }

  // Move [old_addr, old_addr + min(old_len, new_len)) to the destination.
  std::uint64_t dest = new_addr;
  if (fixed) {
    if (!range_ok(new_addr, new_len)) {
      return Error(Errc::out_of_range, "mremap: destination past the task size");
    }
    if (new_addr < old_end && old_addr < new_addr + new_len) {
      return Error(Errc::invalid_argument, "mremap: source and destination overlap");
    }
  } else {
    auto free = impl_->find_free(new_len, 0);
    if (!free) return Error(Errc::no_memory, "mremap: no free destination");
    dest = *free;
  }
  const std::uint64_t moved_end = old_addr + std::min(old_len, new_len);
  // Every cut first; nothing changes if the owner refuses one.
  if (impl_->check_cut(old_addr) != Errc::ok || impl_->check_cut(old_end) != Errc::ok ||
      impl_->check_cut(moved_end) != Errc::ok ||
      (fixed &&
       (impl_->check_cut(dest) != Errc::ok || impl_->check_cut(dest + new_len) != Errc::ok))) {
    return refused();
  }
  if (fixed) impl_->unmap(dest, dest + new_len);
  if (moved_end < old_end) impl_->unmap(moved_end, old_end);  // the part that does not move
  // The destination never overlaps the source, so the VMA containing old_addr still covers it.
  v = impl_->find(old_addr);
  impl_->split_huge(old_addr);
  impl_->split_huge(moved_end);
  // Anonymous pages (copy-on-write copies) move with the VMA: they are the only copy of their
  // bytes. Owner pages just fault in again at the new place.
  std::vector<PageTable::Leaf> anon;
  if (private_vma) {
    for (const PageTable::Leaf& l : impl_->pt.leaves(old_addr, moved_end)) {
      if (AnonPool::is_anon(l.pgmap) && l.pgmap->get_folio(l.pfn) == Errc::ok) anon.push_back(l);
    }
  }
  (void)impl_->pt.zap(old_addr, moved_end);
  auto moved = Impl::piece(*v, dest, dest + new_len);
  moved->pgoff = pgoff;
  std::vector<std::unique_ptr<Vma>> keep;
  if (v->start < old_addr) keep.push_back(Impl::piece(*v, v->start, old_addr));
  if (v->end > moved_end) keep.push_back(Impl::piece(*v, moved_end, v->end));
  if (anon.empty()) {
    impl_->insert(std::move(moved));
  } else {
    Vma* m = moved.get();
    impl_->vmas.emplace(m->start, std::move(moved));
    m->owner->link_and_copy(m, [&] {
      for (const PageTable::Leaf& l : anon) {
        if (impl_->pt.install(dest + (l.addr - old_addr), Level::pte, l.pfn, l.pgmap, l.writable) !=
            PageTable::Install::installed) {
          (void)l.pgmap->put_folio(l.pfn);  // taken above; the install did not take it
        }
      }
    });
  }
  (void)impl_->replace(v, std::move(keep));  // the moved piece is not closed: it lives on
  impl_->free_tables_around(old_addr, moved_end);
  lock.unlock();
  impl_->pt.reclaim();
  return dest;
}

std::unique_ptr<AddressSpace> AddressSpace::fork() {
  auto child = std::make_unique<AddressSpace>();
  // Exclusive, as dup_mmap's mmap_write_lock: write-protecting the parent's anonymous pages must
  // not race with its faults.
  std::unique_lock<std::shared_mutex> lock(mmap_lock_);
  for (const auto& [start, vma] : impl_->vmas) {
    // Like vm_ops->open on dup_mmap: the owner learns of the copy through its i_mmap, on_mmap is
    // not called again. Shared mappings copy no entry (they fault in again in the child); private
    // ones copy their page table (copy_page_range), see Impl::copy_private.
    auto copy = std::make_unique<Vma>(*vma);
    copy->as = child.get();
    if (vma->shared()) {
      child->impl_->insert(std::move(copy));
      continue;
    }
    Vma* c = copy.get();
    child->impl_->vmas.emplace(c->start, std::move(copy));
    const Vma& parent = *vma;
    c->owner->link_and_copy(c, [&] { impl_->copy_private(parent, child->impl_->pt); });
  }
  return child;
}

SignalInfo AddressSpace::read(std::uint64_t addr, void* buf, std::uint64_t len) {
  if (len != 0 && buf == nullptr)
    return sigsegv(0, SigCode::segv_maperr, "read into a null buffer");
  if (!range_ok(addr, len)) {  // access_ok: nothing is copied
    return sigsegv(addr, SigCode::segv_maperr,
                   fmt::format("read of [{:#x}, +{:#x}) past the task size", addr, len));
  }
  return impl_->access(addr, static_cast<std::byte*>(buf), nullptr, len);
}

SignalInfo AddressSpace::write(std::uint64_t addr, const void* buf, std::uint64_t len) {
  if (len != 0 && buf == nullptr)
    return sigsegv(0, SigCode::segv_maperr, "write from a null buffer");
  if (!range_ok(addr, len)) {  // access_ok: nothing is copied
    return sigsegv(addr, SigCode::segv_maperr,
                   fmt::format("write of [{:#x}, +{:#x}) past the task size", addr, len));
  }
  return impl_->access(addr, nullptr, static_cast<const std::byte*>(buf), len);
}

SignalInfo AddressSpace::handle_fault(std::uint64_t addr, bool write) {
  std::shared_lock<std::shared_mutex> lock(mmap_lock_);
  return impl_->fault(addr, write);
}

SignalInfo AddressSpace::handle_fault_locked(std::uint64_t addr, bool write) {
  return impl_->fault(addr, write);
}

std::optional<PtEntry> AddressSpace::lookup(std::uint64_t addr) const noexcept {
  auto leaf = impl_->pt.lookup(addr);
  if (!leaf) return std::nullopt;
  return PtEntry{leaf->addr,     leaf->pfn,   leaf->level,
                 leaf->writable, leaf->pgmap, AnonPool::is_anon(leaf->pgmap)};
}

std::optional<Vma> AddressSpace::find_vma(std::uint64_t addr) const {
  std::shared_lock<std::shared_mutex> lock(mmap_lock_);
  const Vma* v = impl_->find(addr);
  if (v == nullptr) return std::nullopt;
  return *v;
}

const Vma* AddressSpace::find_vma_locked(std::uint64_t addr) const {
  return impl_->find(addr);
}

std::size_t AddressSpace::nr_vmas() const {
  std::shared_lock<std::shared_mutex> lock(mmap_lock_);
  return impl_->vmas.size();
}

std::uint64_t AddressSpace::nr_entries() const noexcept {
  return impl_->pt.nr_entries();
}

std::uint64_t AddressSpace::nr_page_tables() const noexcept {
  return impl_->pt.nr_tables();
}

const PageTable& detail::GupAccess::page_table(const AddressSpace& as) noexcept {
  return as.impl_->pt;
}

std::uint64_t AddressSpace::zap_range(const Vma& vma, std::uint64_t start, std::uint64_t end,
                                      bool even_cows) {
  start = std::max(start, vma.start);
  end = std::min(end, vma.end);
  if (start >= end) return 0;
  // Only private VMAs hold anonymous pages.
  return impl_->pt.zap(start, end, /*keep_anon=*/!even_cows && !vma.shared());
}

void AddressSpace::for_each_entry(const std::function<void(const PtEntry&, const Vma*)>& fn) const {
  std::shared_lock<std::shared_mutex> lock(mmap_lock_);
  impl_->pt.for_each_present([&](const PageTable::Leaf& l) {
    fn(PtEntry{l.addr, l.pfn, l.level, l.writable, l.pgmap, AnonPool::is_anon(l.pgmap)},
       impl_->find(l.addr));
  });
}

}  // namespace pgmap::mm
