#include "pgmap/debug/fs_invariants.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <utility>

#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/dio.h"
#include "pgmap/fs/inode.h"
#include "pgmap/fs/pipe.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::debug {
namespace {

struct FsState {
  const fs::DaxFs* fs = nullptr;
  std::vector<std::shared_ptr<fs::Inode>> inodes;
  std::vector<fs::InodeSnapshot> snaps;
};

class FsChecker {
 public:
  FsChecker(const FsState& st, Report& r) : st_(st), r_(r), pg_(st.fs->pagemap()) {}

  void run() {
    const bool readable = pg_.state() != DevPagemap::State::dead;
    base_ = pg_.range(0).start;
    check_blocks();
    for (std::size_t i = 0; i < st_.snaps.size(); ++i)
      check_inode(*st_.inodes[i], st_.snaps[i], readable);
    if (readable) check_folios();
  }

 private:
  void add(Check c, Pfn pfn, std::string detail) {
    r_.violations.push_back(Violation{c, pg_.name(), pfn, std::move(detail)});
  }

  // Allocator share counts against the files' block maps (I7, I12).
  void check_blocks() {
    const fs::BlockAllocator& alloc = st_.fs->allocator();
    std::map<std::uint64_t, std::uint32_t> users;
    for (const fs::InodeSnapshot& s : st_.snaps) {
      for (const auto& [page, block] : s.blocks)
        ++users[block];
    }
    for (std::uint64_t b = 0; b < alloc.nr_blocks(); ++b) {
      const std::uint32_t share = alloc.share_count(b);
      auto it = users.find(b);
      const std::uint32_t n = it == users.end() ? 0 : it->second;
      if (n != 0 && share == 0) {
        add(Check::fs_block_in_use_free, base_ + b,
            fmt::format("block {} is free but {} file page(s) map it", b, n));
      } else if (share != n) {
        add(Check::fs_share_count, base_ + b,
            fmt::format("block {} has share count {} but {} file page(s) map it", b, share, n));
      }
    }
  }

  void check_inode(const fs::Inode& inode, const fs::InodeSnapshot& s, bool readable) {
    const fs::BlockAllocator& alloc = st_.fs->allocator();
    const auto* owner = static_cast<const mm::MappingOwner*>(&inode);
    const Strategy strat = pg_.strategy();
    std::uint64_t pages = 0;
    for (const fs::EntryMap::Slot& slot : s.entries) {
      const fs::Entry e = slot.entry;
      if (e.locked()) {
        add(Check::fs_entry_folio, e.is_block() ? e.pfn() : 0,
            fmt::format("ino {} entry at index {} is locked at a quiescent point", s.ino,
                        slot.index));
      }
      if (!e.is_block()) continue;
      pages += e.pages();
      const Pfn pfn = e.pfn();
      if (!pg_.contains(pfn) || !pg_.contains(pfn + e.pages() - 1)) {
        add(Check::fs_entry_folio, pfn,
            fmt::format("ino {} entry at index {} maps pfns outside the device", s.ino,
                        slot.index));
        continue;
      }
      const std::uint64_t block = pfn - base_;
      for (std::uint64_t i = 0; i < e.pages(); ++i) {
        auto it = s.blocks.find(slot.index + i);
        if (it == s.blocks.end() || it->second != block + i) {
          add(Check::fs_entry_folio, pfn + i,
              fmt::format("ino {} entry at index {} maps block {} but the file's page {} is {}",
                          s.ino, slot.index, block + i, slot.index + i,
                          it == s.blocks.end() ? std::string("a hole")
                                               : fmt::format("block {}", it->second)));
        }
        if (alloc.share_count(block + i) == 0) {
          add(Check::fs_block_in_use_free, pfn + i,
              fmt::format("ino {} entry at index {} maps free block {}", s.ino, slot.index,
                          block + i));
        }
      }
      if (strat == Strategy::alloc_event) {
        auto a = s.allocations.find(slot.index);
        if (a == s.allocations.end() || a->second.first != pfn || a->second.count != e.pages()) {
          add(Check::fs_entry_pagemap_refs, pfn,
              fmt::format(
                  "ino {} entry at index {} ({} pages) has {}", s.ino, slot.index, e.pages(),
                  a == s.allocations.end() ? std::string("no allocation")
                                           : fmt::format("an allocation of [{:#x}, +{})",
                                                         a->second.first, a->second.count)));
        }
      }
      if (!readable) continue;
      PageArray* arr = pg_.array_for(pfn);
      if (arr == nullptr || arr->retired()) continue;  // reported by pfn_in_live_pagemap
      const std::uint64_t idx = arr->index_of(pfn);
      const std::uint64_t head = arr->head_of(idx);
      const unsigned order = arr->order(head);
      if (head != idx || order != e.order()) {
        add(Check::fs_entry_folio, pfn,
            fmt::format("ino {} entry at index {} of order {} maps a folio of order {} at {:#x} "
                        "(I11: folio order == entry order)",
                        s.ino, slot.index, e.order(), order, arr->pfn_of(head)));
        continue;
      }
      const bool shared = (arr->flags(head).load(std::memory_order_acquire) & kPageShared) != 0;
      const void* mapping = arr->mapping(head).load(std::memory_order_acquire);
      const std::uint64_t index = arr->index_or_share(head).load(std::memory_order_acquire);
      if (shared) {
        ++shared_assoc_[pfn];
        if (mapping != nullptr) {
          add(Check::fs_entry_folio, pfn, "shared folio has a mapping (I12: mapping == NULL)");
        }
      } else {
        ++unshared_assoc_[pfn];
        if (mapping != owner || index != slot.index) {
          add(Check::fs_entry_folio, pfn,
              fmt::format("folio of ino {} entry at index {} has mapping {} index {} (expected "
                          "the inode and the entry's index)",
                          s.ino, slot.index, fmt::ptr(mapping), index));
        }
      }
    }
    if (strat == Strategy::alloc_event) {
      for (const auto& [index, a] : s.allocations) {
        bool found = false;
        for (const fs::EntryMap::Slot& slot : s.entries)
          found = found || (slot.index == index && slot.entry.is_block());
        if (!found) {
          add(Check::fs_entry_pagemap_refs, a.first,
              fmt::format("ino {} holds an allocation for index {} without a block entry", s.ino,
                          index));
        }
      }
    }
    if ((strat == Strategy::per_lookup || strat == Strategy::transition) &&
        pg_.state() == DevPagemap::State::live && pages > 0) {
      entry_pages_ += pages;
    }
    if (s.nrpages != pages) {
      add(Check::fs_nrpages, 0,
          fmt::format("ino {} has nrpages {} but its block entries cover {} page(s)", s.ino,
                      s.nrpages, pages));
    }
  }

  // Folio-side association state (I11, I12, bug 5.8).
  void check_folios() {
    if ((pg_.strategy() == Strategy::per_lookup || pg_.strategy() == Strategy::transition) &&
        pg_.state() == DevPagemap::State::live) {
      const std::int64_t refs = pg_.ref_count_snapshot();
      if (refs < static_cast<std::int64_t>(entry_pages_) + 1) {
        add(Check::fs_entry_pagemap_refs, base_,
            fmt::format("pagemap ref count {} cannot cover the {} entry page(s) plus the initial "
                        "reference",
                        refs, entry_pages_));
      }
    }
    for (std::size_t i = 0; i < pg_.nr_ranges(); ++i) {
      PageArray* a = pg_.array_for(pg_.range(i).start);
      if (a == nullptr || a->retired()) continue;
      for (std::uint64_t e = 0; e < a->entries(); ++e) {
        if (a->head_of(e) != e) continue;
        const Pfn pfn = a->pfn_of(e);
        const bool shared = (a->flags(e).load(std::memory_order_acquire) & kPageShared) != 0;
        const void* mapping = a->mapping(e).load(std::memory_order_acquire);
        const std::uint64_t share = a->index_or_share(e).load(std::memory_order_acquire);
        auto sh = shared_assoc_.find(pfn);
        auto un = unshared_assoc_.find(pfn);
        const std::uint64_t nsh = sh == shared_assoc_.end() ? 0 : sh->second;
        const std::uint64_t nun = un == unshared_assoc_.end() ? 0 : un->second;
        if (shared && share != nsh) {
          add(Check::fs_share_count, pfn,
              fmt::format("shared folio has share count {} but {} entries are associated with it",
                          share, nsh));
        }
        if (!shared && mapping != nullptr && nun != 1) {
          add(Check::fs_entry_folio, pfn,
              fmt::format("folio has a mapping but {} entries are associated with it (I12: "
                          "exactly one)",
                          nun));
        }
        const bool owed = (a->flags(e).load(std::memory_order_acquire) & kPageSplitOwed) != 0;
        const std::uint32_t ref = a->ref(e).load(std::memory_order_acquire);
        if (!shared && mapping == nullptr && a->order(e) != pg_.base_order() &&
            !(owed && ref != 0)) {
          // A held folio may wait for its last put to be split (docs/fsdax.md, "Order reset at
          // the last put"); an idle one may not.
          add(Check::fs_entry_folio, pfn,
              fmt::format("folio associated with no entry still has order {} (bug 5.8: "
                          "disassociation, or the last put when it was held, resets it to {}){}",
                          a->order(e), pg_.base_order(),
                          owed ? "; its split is owed but it is idle" : ""));
        } else if (owed && (mapping != nullptr || shared)) {
          add(Check::fs_entry_folio, pfn,
              "associated folio is still owed a split at its last put (the association did not "
              "settle it)");
        }
      }
    }
  }

  const FsState& st_;
  Report& r_;
  const DevPagemap& pg_;
  Pfn base_ = 0;
  std::map<Pfn, std::uint64_t> shared_assoc_;
  std::map<Pfn, std::uint64_t> unshared_assoc_;
  std::uint64_t entry_pages_ = 0;
};

void add_pagemap(Universe& u, const DevPagemap* p) {
  if (std::find(u.pagemaps.begin(), u.pagemaps.end(), p) == u.pagemaps.end())
    u.pagemaps.push_back(p);
}

}  // namespace

Report check_fs_invariants(Universe u, const FsUniverse& f) {
  std::vector<FsState> states;
  std::map<const DevPagemap*, std::int64_t> entry_refs;  // per pagemap, held by entries
  std::vector<std::pair<const DevPagemap*, const fs::DaxFs*>> allocators;
  for (const fs::DaxFs* fs : f.filesystems) {
    if (fs == nullptr) continue;
    FsState st;
    st.fs = fs;
    st.inodes = fs->inodes();
    for (const auto& inode : st.inodes)
      st.snaps.push_back(inode->snapshot());
    const DevPagemap& pg = fs->pagemap();
    add_pagemap(u, &pg);
    add_pagemap(u, &fs->zero_pagemap());
    allocators.emplace_back(&pg, fs);
    std::int64_t& refs = entry_refs[&pg];
    for (const fs::InodeSnapshot& s : st.snaps) {
      switch (pg.strategy()) {
        case Strategy::per_lookup:
        case Strategy::transition:
          for (const fs::EntryMap::Slot& slot : s.entries) {
            if (slot.entry.is_block()) refs += static_cast<std::int64_t>(slot.entry.pages());
          }
          break;
        case Strategy::alloc_event:
          refs += static_cast<std::int64_t>(s.allocations.size());
          break;
        case Strategy::none:
        case Strategy::sweep:
          break;
      }
    }
    states.push_back(std::move(st));
  }
  for (const fs::PipeBuffer* p : f.pipes) {
    if (p == nullptr) continue;
    for (const mm::GupPage& g : p->pages())
      u.held.push_back(HeldPage{g.pfn, g.pgmap, false});
  }
  for (const fs::DioRequest* d : f.dios) {
    if (d == nullptr) continue;
    for (const mm::GupPage& g : d->pages())
      u.held.push_back(HeldPage{g.pfn, g.pgmap, true});
  }
  auto prev_refs = std::move(u.extra_pagemap_refs);
  u.extra_pagemap_refs = [prev_refs, entry_refs](const DevPagemap& p) {
    std::int64_t n = prev_refs ? prev_refs(p) : 0;
    // Entries hold their references while the pagemap lives; a killed one's were dropped by the
    // entries' deletion or are about to be (pre-remove).
    if (auto it = entry_refs.find(&p); it != entry_refs.end()) n += it->second;
    return n;
  };
  auto prev_freed = std::move(u.is_freed);
  u.is_freed = [prev_freed, allocators](const DevPagemap& p, Pfn pfn) {
    if (prev_freed && prev_freed(p, pfn)) return true;
    for (const auto& [pg, fs] : allocators) {
      if (pg == &p) return fs->allocator().share_count(pfn - p.range(0).start) == 0;
    }
    return false;
  };
  Report r = check_invariants(u);
  for (const FsState& st : states)
    FsChecker(st, r).run();
  return r;
}

void assert_fs_invariants(const Universe& u, const FsUniverse& f, const char* where) {
  Report r = check_fs_invariants(u, f);
  if (r.ok()) return;
  std::fprintf(stderr, "pgmap: invariant violation at %s\n%s\n", where, r.to_string().c_str());
  std::abort();
}

}  // namespace pgmap::debug
