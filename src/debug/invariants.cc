#include "pgmap/debug/invariants.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <unordered_set>
#include <utility>

#include "memory/pagemap_registry.h"
#include "pgmap/core/rcu.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::debug {

std::string_view check_name(Check c) noexcept {
  switch (c) {
    case Check::refcount_covers_users:
      return "refcount_covers_users";
    case Check::pfn_in_live_pagemap:
      return "pfn_in_live_pagemap";
    case Check::pagemaps_disjoint:
      return "pagemaps_disjoint";
    case Check::folio_order_matches_entry:
      return "folio_order_matches_entry";
    case Check::freed_unreferenced:
      return "freed_unreferenced";
    case Check::strategy_ref_count:
      return "strategy_ref_count";
    case Check::mapcount_matches_entries:
      return "mapcount_matches_entries";
    case Check::holds_match:
      return "holds_match";
    case Check::fs_entry_folio:
      return "fs_entry_folio";
    case Check::fs_block_in_use_free:
      return "fs_block_in_use_free";
    case Check::fs_share_count:
      return "fs_share_count";
    case Check::fs_entry_pagemap_refs:
      return "fs_entry_pagemap_refs";
    case Check::fs_nrpages:
      return "fs_nrpages";
  }
  return "?";
}

std::size_t Report::count(Check c) const noexcept {
  return static_cast<std::size_t>(std::count_if(violations.begin(), violations.end(),
                                                [c](const Violation& v) { return v.check == c; }));
}

std::string Report::to_string(std::size_t max_listed) const {
  std::string out = fmt::format(
      "invariants: {} violation(s) over {} pagemap(s), {} folio(s), {} entr(ies), {} held page(s)",
      violations.size(), pagemaps_checked, folios_checked, entries_checked, held_checked);
  for (std::size_t i = 0; i < violations.size() && i < max_listed; ++i) {
    const Violation& v = violations[i];
    out += fmt::format("\n  [{}] {} pfn {:#x}: {}", check_name(v.check),
                       v.pagemap.empty() ? "-" : v.pagemap, v.pfn, v.detail);
  }
  if (violations.size() > max_listed) {
    out += fmt::format("\n  ... {} more", violations.size() - max_listed);
  }
  if (!violations.empty()) {
    out += "\n  per check:";
    for (std::size_t c = 0; c < kNumChecks; ++c) {
      const std::size_t n = count(static_cast<Check>(c));
      if (n != 0) out += fmt::format(" {}={}", check_name(static_cast<Check>(c)), n);
    }
  }
  return out;
}

namespace {

// What the universe's entries and held pages put on one folio.
struct FolioUse {
  std::uint64_t entries = 0;  // page-table entries mapping it
  std::uint64_t refs = 0;     // refcount expected from entries and held pages
  std::uint64_t pins = 0;     // exact pincount expected (large folios)
};

class Checker {
 public:
  explicit Checker(const Universe& u) : u_(u) {
    for (const DevPagemap* p : u.pagemaps) {
      if (p != nullptr) known_.insert(p);
    }
  }

  Report run() {
    check_disjoint();
    for (const mm::AddressSpace* as : u_.address_spaces) {
      if (as == nullptr) continue;
      as->for_each_entry([&](const mm::PtEntry& e, const mm::Vma* vma) { check_entry(e, vma); });
    }
    for (const HeldPage& h : u_.held)
      check_held(h);
    for (const DevPagemap* p : known_)
      check_folios(*p);
    return std::move(r_);
  }

 private:
  void add(Check c, const DevPagemap* p, Pfn pfn, std::string detail) {
    r_.violations.push_back(
        Violation{c, p != nullptr ? p->name() : std::string{}, pfn, std::move(detail)});
  }

  bool freed(const DevPagemap& p, Pfn pfn) const {
    for (const PfnRange& r : u_.freed_ranges) {
      if (r.contains(pfn)) return true;
    }
    return u_.is_freed && u_.is_freed(p, pfn);
  }

  static bool retired(const DevPagemap& p, Pfn pfn) {
    const PageArray* a = p.array_for(pfn);
    return a == nullptr || a->retired();
  }

  // Common to entries and held pages: the pfn must be inside a live pagemap of the universe.
  // Returns the pagemap's metadata when it may be read, else nullptr (violation recorded).
  PageArray* resolve(const DevPagemap* p, Pfn pfn, const char* what) {
    if (p == nullptr || known_.count(p) == 0) {
      add(Check::pfn_in_live_pagemap, nullptr, pfn,
          fmt::format("{} refers to a pagemap ({}) that is not in the universe", what,
                      fmt::ptr(p)));
      return nullptr;
    }
    if (p->state() == DevPagemap::State::dead) {
      add(Check::pfn_in_live_pagemap, p, pfn, fmt::format("{} refers to a dead pagemap", what));
      return nullptr;
    }
    if (!p->contains(pfn)) {
      add(Check::pfn_in_live_pagemap, p, pfn, fmt::format("{} pfn is outside its pagemap", what));
      return nullptr;
    }
    if (retired(*p, pfn)) {
      add(Check::pfn_in_live_pagemap, p, pfn,
          fmt::format("{} pfn's metadata is retired although the pagemap is not dead", what));
      return nullptr;
    }
    {
      rcu::ReadGuard guard;
      const DevPagemap* published = PagemapRegistry::global().lookup(pfn);
      if (published != p) {
        add(Check::pfn_in_live_pagemap, p, pfn,
            fmt::format("{} pfn resolves to {} in the registry, not to its pagemap", what,
                        published == nullptr ? std::string("nothing") : published->name()));
      }
    }
    if (freed(*p, pfn)) {
      add(Check::freed_unreferenced, p, pfn, fmt::format("{} is on freed memory", what));
    }
    return p->array_for(pfn);
  }

  void check_entry(const mm::PtEntry& e, const mm::Vma* vma) {
    ++r_.entries_checked;
    const std::string what = fmt::format("entry at {:#x}", e.addr);
    if (vma == nullptr) {
      add(Check::pfn_in_live_pagemap, nullptr, e.pfn,
          fmt::format("{} lies in no VMA (stale entry)", what));
    }
    PageArray* a = resolve(e.pgmap, e.pfn, what.c_str());
    if (a == nullptr) return;
    const std::uint64_t head = a->head_of(a->index_of(e.pfn));
    const unsigned order = a->order(head);
    const Pfn head_pfn = a->pfn_of(head);
    const unsigned lo = mm::level_order(e.level);
    const std::uint64_t span = order_pages(lo);
    if (!is_aligned(e.pfn, span) || order < lo || e.pfn + span > head_pfn + order_pages(order) ||
        !is_aligned(e.addr, mm::level_bytes(e.level))) {
      add(Check::folio_order_matches_entry, e.pgmap, e.pfn,
          fmt::format("{} of {} KiB maps pfn {:#x} of a folio of order {} at {:#x}", what,
                      mm::level_bytes(e.level) >> 10, e.pfn, order, head_pfn));
    }
    FolioUse& use = uses_[{e.pgmap, head_pfn}];
    ++use.entries;
    ++use.refs;
  }

  void check_held(const HeldPage& h) {
    ++r_.held_checked;
    PageArray* a = resolve(h.pgmap, h.pfn, h.pin ? "pinned page" : "referenced page");
    if (a == nullptr) return;
    const std::uint64_t head = a->head_of(a->index_of(h.pfn));
    FolioUse& use = uses_[{h.pgmap, a->pfn_of(head)}];
    if (!h.pin) {
      ++use.refs;
    } else if (a->uses_pin_bias(head)) {
      use.refs += PageArray::kPinBias;
    } else {
      ++use.refs;
      ++use.pins;
    }
  }

  void check_disjoint() {
    std::vector<std::pair<PfnRange, const DevPagemap*>> ranges;
    for (const DevPagemap* p : known_) {
      if (p->state() == DevPagemap::State::dead) continue;
      ++r_.pagemaps_checked;
      for (std::size_t i = 0; i < p->nr_ranges(); ++i) {
        const PfnRange r = p->range(i);
        ranges.emplace_back(r, p);
        rcu::ReadGuard guard;
        const DevPagemap* a = PagemapRegistry::global().lookup(r.start);
        const DevPagemap* b = PagemapRegistry::global().lookup(r.end() - 1);
        if (a != p || b != p) {
          add(Check::pagemaps_disjoint, p, r.start,
              fmt::format("range [{:#x}, {:#x}) is not published for this pagemap", r.start,
                          r.end()));
        }
      }
    }
    std::sort(ranges.begin(), ranges.end(),
              [](const auto& x, const auto& y) { return x.first.start < y.first.start; });
    for (std::size_t i = 1; i < ranges.size(); ++i) {
      if (ranges[i - 1].first.overlaps(ranges[i].first)) {
        add(Check::pagemaps_disjoint, ranges[i].second, ranges[i].first.start,
            fmt::format("[{:#x}, {:#x}) overlaps [{:#x}, {:#x}) of {}", ranges[i].first.start,
                        ranges[i].first.end(), ranges[i - 1].first.start, ranges[i - 1].first.end(),
                        ranges[i - 1].second->name()));
      }
    }
  }

  void check_folios(const DevPagemap& p) {
    if (p.state() == DevPagemap::State::dead) return;  // metadata gone: nothing to read
    std::uint64_t busy = 0;
    std::uint64_t sum_refs = 0;
    for (std::size_t i = 0; i < p.nr_ranges(); ++i) {
      PageArray* a = p.array_for(p.range(i).start);
      if (a == nullptr || a->retired()) {
        add(Check::pfn_in_live_pagemap, &p, p.range(i).start,
            "metadata retired although the pagemap is not dead");
        continue;
      }
      const std::uint64_t n = a->entries();
      for (std::uint64_t e = 0; e < n; ++e) {
        const std::uint64_t head = a->head_of(e);
        if (head != e) {
          if (const std::uint32_t t = a->ref(e).load(std::memory_order_acquire); t != 0) {
            add(Check::refcount_covers_users, &p, a->pfn_of(e),
                fmt::format("tail entry has refcount {} (only heads count)", t));
          }
          continue;
        }
        ++r_.folios_checked;
        const Pfn pfn = a->pfn_of(head);
        const std::uint32_t ref = a->ref(head).load(std::memory_order_acquire);
        const std::int32_t map = a->mapcount(head).load(std::memory_order_acquire);
        const std::uint32_t pins = a->pincount(head).load(std::memory_order_acquire);
        const bool small = a->uses_pin_bias(head);
        if (ref > PageArray::kMaxRef) {
          add(Check::refcount_covers_users, &p, pfn,
              fmt::format("refcount {:#x} reads as retired in live metadata", ref));
          continue;
        }
        if (map < 0) {
          add(Check::refcount_covers_users, &p, pfn, fmt::format("mapcount {} < 0", map));
        }
        const std::uint64_t users = static_cast<std::uint64_t>(std::max(map, 0)) +
                                    (small ? std::uint64_t{0} : std::uint64_t{pins});
        if (ref < users) {
          add(Check::refcount_covers_users, &p, pfn,
              fmt::format("refcount {} < mapcount {} + pincount {}", ref, map, small ? 0 : pins));
        }
        if (small && pins != 0) {
          add(Check::refcount_covers_users, &p, pfn,
              fmt::format("small folio with exact pincount {} (its pins live in the bias)", pins));
        }
        if (ref != 0) {
          ++busy;
          sum_refs += ref;
          if (freed(p, pfn)) {
            add(Check::freed_unreferenced, &p, pfn,
                fmt::format("freed folio has refcount {}", ref));
          }
        }
        if (u_.complete) {
          auto it = uses_.find({&p, pfn});
          const FolioUse use = it == uses_.end() ? FolioUse{} : it->second;
          if (static_cast<std::uint64_t>(std::max(map, 0)) != use.entries || map < 0) {
            add(Check::mapcount_matches_entries, &p, pfn,
                fmt::format("mapcount {} but {} entries map the folio", map, use.entries));
          }
          if (ref != use.refs || (!small && pins != use.pins)) {
            add(Check::holds_match, &p, pfn,
                fmt::format("refcount {} pincount {}, expected {} and {} from {} entries and "
                            "the held pages",
                            ref, pins, use.refs, small ? 0 : use.pins, use.entries));
          }
        }
      }
    }
    std::int64_t predicted = p.state() == DevPagemap::State::live ? 1 : 0;
    if (u_.extra_pagemap_refs) predicted += u_.extra_pagemap_refs(p);
    switch (p.strategy()) {
      case Strategy::per_lookup:
        predicted += static_cast<std::int64_t>(sum_refs);
        break;
      case Strategy::transition:
        predicted += static_cast<std::int64_t>(busy);
        break;
      case Strategy::none:
      case Strategy::sweep:
      case Strategy::alloc_event:
        break;
    }
    const std::int64_t actual = p.ref_count_snapshot();
    if (actual != predicted) {
      add(Check::strategy_ref_count, &p, p.range(0).start,
          fmt::format("pagemap ref count {} but {} predicts {} ({} busy folios, {} folio refs)",
                      actual, strategy_name(p.strategy()), predicted, busy, sum_refs));
    }
  }

  const Universe& u_;
  std::unordered_set<const DevPagemap*> known_;
  std::map<std::pair<const DevPagemap*, Pfn>, FolioUse> uses_;
  Report r_;
};

}  // namespace

Report check_invariants(const Universe& u) {
  return Checker(u).run();
}

void assert_invariants(const Universe& u, const char* where) {
  Report r = check_invariants(u);
  if (r.ok()) return;
  std::fprintf(stderr, "pgmap: invariant violation at %s\n%s\n", where, r.to_string().c_str());
  std::abort();
}

}  // namespace pgmap::debug
