#include "pgmap/memory/dev_pagemap.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <thread>

#include "memory/pagemap_registry.h"
#include "memory/strategy/strategy_ops.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"

namespace pgmap {
namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr bool kQuarantineDefault =
#ifdef PGMAP_DEBUG_INVARIANTS
    true;
#else
    false;
#endif

}  // namespace

// ---- PagemapRef / Allocation ------------------------------------------------------------------

void PagemapRef::reset() noexcept {
  if (p_ != nullptr) (void)std::exchange(p_, nullptr)->put_ref();  // reported by the ref
}

DevPagemap::Allocation& DevPagemap::Allocation::operator=(Allocation&& o) noexcept {
  if (this != &o) {
    reset();
    pgmap_ = std::exchange(o.pgmap_, nullptr);
    first_ = o.first_;
    nr_ = o.nr_;
  }
  return *this;
}

void DevPagemap::Allocation::reset() noexcept {
  if (pgmap_ != nullptr) (void)std::exchange(pgmap_, nullptr)->put_ref();  // reported by the ref
}

// ---- construction -----------------------------------------------------------------------------

DevPagemap::DevPagemap(const MemremapParams& params, std::vector<Range> ranges)
    : type_(params.type),
      strategy_(params.strategy),
      base_order_(params.base_order),
      ops_(params.ops),
      owner_(params.owner),
      quarantine_(params.quarantine.value_or(kQuarantineDefault)),
      name_(params.name),
      ranges_(std::move(ranges)),
      free_work_(static_cast<bool>(params.ops.page_free) || params.type == PagemapType::fs_dax),
      // kAllowReinit: a refused or timed-out memunmap resurrects the ref into percpu mode, so the
      // pagemap is live again at the same cost as before (issue 7 item 3).
      ref_([this] { on_release(); }, PercpuRef::kAllowReinit) {
  first_array_ = ranges_.front().array.get();
  if (name_.empty()) {
    name_ =
        fmt::format("pagemap {:#x}-{:#x}", ranges_.front().pfns.start, ranges_.back().pfns.end());
  }
}

Result<std::shared_ptr<DevPagemap>> memremap(MemremapParams params) {
  if (rcu::in_read_section()) {
    // Publishing waits for a grace period (to free the registry's old snapshot).
    report_misuse(Errc::invalid_argument, "memremap inside an RCU read section");
    return Error(Errc::invalid_argument,
                 "memremap inside an RCU read section (it waits for a grace period)");
  }
  if (params.strategy != Strategy::none && params.strategy != Strategy::per_lookup &&
      params.strategy != Strategy::transition && params.strategy != Strategy::sweep &&
      params.strategy != Strategy::alloc_event) {
    return Error(Errc::invalid_argument, "memremap: unknown strategy");
  }
  if (params.ranges.empty()) return Error(Errc::invalid_argument, "memremap: no ranges");
  if (params.base_order != 0 && params.base_order != kPmdOrder && params.base_order != kPudOrder) {
    return Error(Errc::invalid_argument,
                 fmt::format("memremap: base order {} (must be 0, 9 or 18)", params.base_order));
  }
  if (params.type == PagemapType::private_mem && !params.ops.page_free) {
    return Error(Errc::invalid_argument, "memremap: a PRIVATE pagemap needs ops.page_free");
  }
  const std::uint64_t unit = order_bytes(params.base_order);
  std::vector<PfnRange> pfns;
  for (std::size_t i = 0; i < params.ranges.size(); ++i) {
    const PagemapRangeSpec& spec = params.ranges[i];
    if (!spec.backing) {
      return Error(Errc::invalid_argument, fmt::format("memremap: range {} has no backing", i));
    }
    const Backing& b = *spec.backing;
    std::uint64_t size = spec.size != 0 ? spec.size : b.size() - std::min(spec.offset, b.size());
    if (spec.offset >= b.size() || size > b.size() - spec.offset || size == 0) {
      return Error(Errc::out_of_range,
                   fmt::format("memremap: range {} [{:#x}, +{:#x}) outside backing of {:#x} bytes",
                               i, spec.offset, size, b.size()));
    }
    std::uint64_t need = std::max(unit, kPageSize);
    if (!is_aligned(spec.offset, need) || !is_aligned(size, need) ||
        !is_aligned(b.base_pfn() << kPageShift, need)) {
      return Error(Errc::unaligned,
                   fmt::format("memremap: range {} offset {:#x} size {:#x} not aligned to the "
                               "{:#x}-byte folio of base order {}",
                               i, spec.offset, size, need, params.base_order));
    }
    PfnRange r{b.base_pfn() + (spec.offset >> kPageShift), size >> kPageShift};
    for (const PfnRange& other : pfns) {
      if (other.overlaps(r)) {
        return Error(Errc::overlap, fmt::format("memremap: range {} overlaps another range of "
                                                "the same request",
                                                i));
      }
    }
    pfns.push_back(r);
  }
  auto overlap_error = [](const PfnRange& r, const PagemapRegistry::Conflict& c, const char* how) {
    return Error(Errc::overlap,
                 fmt::format("memremap: pfns {:#x}-{:#x} overlap {} (pfns {:#x}-{:#x}){}", r.start,
                             r.end(), c.name, c.range.start, c.range.end(), how));
  };
  // Early check (a real interval query, not a probe of the ends); insert() re-checks under the
  // registry's writer lock.
  for (const PfnRange& r : pfns) {
    if (auto c = PagemapRegistry::global().find_overlap(r)) return overlap_error(r, *c, "");
  }
  std::vector<DevPagemap::Range> ranges;
  for (std::size_t i = 0; i < params.ranges.size(); ++i) {
    auto array = PageArray::create(pfns[i], params.base_order);
    if (!array) return array.error();
    ranges.push_back(
        {pfns[i], params.ranges[i].backing, params.ranges[i].offset, std::move(array).value()});
  }
  std::shared_ptr<DevPagemap> pgmap(new DevPagemap(params, std::move(ranges)));
  PagemapRegistry::Conflict conflict;
  if (Errc e = PagemapRegistry::global().insert(pgmap.get(), pfns, &conflict); e != Errc::ok) {
    pgmap->state_.store(DevPagemap::State::dead, std::memory_order_release);  // never published
    if (e != Errc::overlap) return Error(e, "memremap: publishing the pagemap failed");
    for (const PfnRange& r : pfns) {
      if (r.overlaps(conflict.range)) {
        return overlap_error(r, conflict, ", published by a concurrent memremap");
      }
    }
    return Error(Errc::overlap, "memremap: pfns already mapped");
  }
  for (const DevPagemap::Range& r : pgmap->ranges_) {
    (void)r.backing->restore(r.offset, r.pfns.bytes());  // a previous memunmap may have revoked it
  }
  return pgmap;
}

DevPagemap::~DevPagemap() {
  // Already torn down, or never published (lost a memremap race): nothing to do; the PercpuRef
  // destructor folds a reference that was never shared.
  if (state() == State::dead) return;
  // Still published: live, or killed (kill()) but never unmapped. The owner gave up its last
  // handle while something may still hold the pagemap, so the teardown must wait (freeing under
  // a holder is the bug this library exists to prevent), but never silently: every 5 s it says
  // who is being waited for.
  MemunmapOptions opts;
  opts.progress_every = std::chrono::seconds(5);
  opts.progress = [this](const DrainProgress& p) {
    std::fprintf(stderr, "pgmap: destroying %s, still waiting after %.0f s for: %s\n",
                 name_.c_str(), std::chrono::duration<double>(p.elapsed).count(),
                 holders().to_string().c_str());
  };
  // A stray put_ref makes the kill refuse (Errc::underflow) and reset the reference to the holders
  // the fold found; the next attempt then completes.
  bool finished = false;
  for (int attempt = 0; attempt < 3 && !finished; ++attempt) {
    auto r = memunmap(opts);
    if (r || r.code() != Errc::underflow) {
      if (!r && r.code() != Errc::already_dead) {
        std::fprintf(stderr, "pgmap: destroying %s: %s\n", name_.c_str(),
                     r.error().to_string().c_str());
      }
      finished = true;
    }
  }
  if (!finished) {
    std::fprintf(stderr, "pgmap: destroying %s: its pagemap reference keeps underflowing\n",
                 name_.c_str());
  }
  // A teardown that did not complete may leave this pagemap killed: once gone it no longer counts.
  if ((life_.load(std::memory_order_seq_cst) & (kKilled | kTornDown)) == kKilled) {
    killed_pagemaps_.n.fetch_sub(1, std::memory_order_seq_cst);
  }
}

// ---- lookups ----------------------------------------------------------------------------------

DevPagemap::Loc DevPagemap::locate_slow(Pfn pfn) const noexcept {
  for (const Range& r : ranges_) {
    if (r.pfns.contains(pfn)) {
      PageArray* a = r.array.get();
      return {a, a->head_of(a->index_of(pfn))};
    }
  }
  return {};
}

bool DevPagemap::contains(Pfn pfn) const noexcept {
  for (const Range& r : ranges_) {
    if (r.pfns.contains(pfn)) return true;
  }
  return false;
}

std::uint64_t DevPagemap::total_pages() const noexcept {
  std::uint64_t n = 0;
  for (const Range& r : ranges_)
    n += r.pfns.count;
  return n;
}

std::byte* DevPagemap::address_of(Pfn pfn) const noexcept {
  for (const Range& r : ranges_) {
    if (r.pfns.contains(pfn)) return r.backing->address_of(pfn);
  }
  return nullptr;
}

PagemapRef get_dev_pagemap(Pfn pfn, PagemapRef cached) noexcept {
  if (cached && cached->contains(pfn)) return cached;
  cached.reset();
  rcu::ReadGuard guard;
  DevPagemap* p = PagemapRegistry::global().lookup(pfn);
  if (p == nullptr || !p->tryget_live()) return {};
  return PagemapRef(p);
}

std::size_t pagemap_count() noexcept {
  return PagemapRegistry::global().size();
}

// ---- folio references -------------------------------------------------------------------------

[[gnu::cold]] Errc DevPagemap::late_access() noexcept {
  late_accesses_.fetch_add(1, std::memory_order_relaxed);
  return Errc::use_after_teardown;
}

[[gnu::cold]] Errc DevPagemap::torn_down_access(Pfn pfn) noexcept {
  // The ranges (not the metadata) answer whether the pfn is ours: they are never torn down.
  return contains(pfn) ? late_access() : Errc::out_of_range;
}

// Every folio operation first checks the torn-down flag, so that a late access never touches
// retired metadata (whatever retire made of it); the strategies check again after their atomic
// for a teardown that raced it. One dispatch point (strategy_ops.h) picks the strategy; each
// strategy's get and put is its own small out-of-line function (folio_get<S> / folio_put<S>), so
// the hot path of one strategy carries no register pressure from another's, and get_folio /
// put_folio are a jump table and a tail call. The hot ones start on a 64-byte boundary: at the
// default 16, where each lands depends on every function before it in this file, and an edit
// elsewhere moved the page cycle ratios by up to 0.07 (a fetch window or an op-cache line split
// differently); aligned, sweep's page cycle measured 1.00-1.02x `none` where it had read
// 1.06-1.07x with the same code.
namespace strategy_impl {
namespace {

// A pfn outside the first range: the other ranges (locate_slow), out of line so that the hot
// functions below make no call that is not a tail call (and so save no registers).
template <typename S>
[[gnu::noinline]] Errc folio_get_other(DevPagemap& pg, Pfn pfn, std::uint32_t refs) noexcept {
  const auto l = Access::locate(pg, pfn);
  if (l.array == nullptr) return Errc::out_of_range;
  return S::get(pg, *l.array, l.head, refs);
}

template <typename S>
[[gnu::noinline]] Errc folio_put_other(DevPagemap& pg, Pfn pfn, std::uint32_t refs) noexcept {
  const auto l = Access::locate(pg, pfn);
  if (l.array == nullptr) return Errc::out_of_range;
  return S::put(pg, *l.array, l.head, refs);
}

template <typename S>
[[gnu::noinline, gnu::aligned(64)]] Errc folio_get(DevPagemap& pg, Pfn pfn,
                                                   std::uint32_t refs) noexcept {
  if (Access::torn_down(pg)) [[unlikely]]
    return Access::torn_down_access(pg, pfn);
  PageArray& a = Access::first_array(pg);
  if (!a.contains(pfn)) [[unlikely]]
    return folio_get_other<S>(pg, pfn, refs);
  return S::get(pg, a, a.head_of(a.index_of(pfn)), refs);
}

// per_lookup holds a pagemap reference for every folio reference, so its get takes the pagemap
// reference before it locates the folio, where every other strategy's get works on the located
// folio. The rseq section's two stores (the rseq_cs arm and the counter's add) then leave the
// store buffer while the folio is located; right in front of the refcount's lock xadd, which
// waits for every older store, they cost the page cycle about 0.6 ns (docs/strategies.md, "Why
// per_lookup and transition cost more than their rseq pair"). The order of the pagemap reference
// and the folio's refcount is the same as in PerLookupStrategy::get.
[[gnu::cold, gnu::noinline]] Errc per_lookup_get_other_held(DevPagemap& pg, Pfn pfn,
                                                            std::uint32_t refs) noexcept {
  const auto l = Access::locate(pg, pfn);
  if (l.array == nullptr) {
    (void)Access::ref(pg).put_many(refs);  // ours: cannot underflow
    return Errc::out_of_range;
  }
  return PerLookupStrategy::get_held(pg, *l.array, l.head, refs);
}

template <>
[[gnu::noinline, gnu::aligned(64)]] Errc folio_get<PerLookupStrategy>(DevPagemap& pg, Pfn pfn,
                                                                      std::uint32_t refs) noexcept {
  if (Access::torn_down(pg)) [[unlikely]]
    return Access::torn_down_access(pg, pfn);
  // Not in percpu mode: the general path, whose PerLookupStrategy::get takes the slow way.
  if (!Access::ref(pg).get_if_percpu(refs)) [[unlikely]]
    return folio_get_other<PerLookupStrategy>(pg, pfn, refs);
  PageArray& a = Access::first_array(pg);
  if (!a.contains(pfn)) [[unlikely]]
    return per_lookup_get_other_held(pg, pfn, refs);
  return PerLookupStrategy::get_held(pg, a, a.head_of(a.index_of(pfn)), refs);
}

template <typename S>
[[gnu::noinline, gnu::aligned(64)]] Errc folio_put(DevPagemap& pg, Pfn pfn,
                                                   std::uint32_t refs) noexcept {
  if (Access::torn_down(pg)) [[unlikely]]
    return Access::torn_down_access(pg, pfn);
  PageArray& a = Access::first_array(pg);
  if (!a.contains(pfn)) [[unlikely]]
    return folio_put_other<S>(pg, pfn, refs);
  // Nothing of this pagemap may be touched after the strategy's put returns: it may have dropped
  // what kept the pagemap alive.
  return S::put(pg, a, a.head_of(a.index_of(pfn)), refs);
}

// The strategy's get / put on an already located folio (pin_folio / unpin_folio, which have
// checked the torn-down flag and located the folio themselves).
template <typename S>
[[gnu::noinline, gnu::aligned(64)]] Errc get_at(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                                std::uint32_t refs) noexcept {
  return S::get(pg, a, head, refs);
}

template <typename S>
[[gnu::noinline, gnu::aligned(64)]] Errc put_at(DevPagemap& pg, PageArray& a, std::uint64_t head,
                                                std::uint32_t refs) noexcept {
  return S::put(pg, a, head, refs);
}

}  // namespace
}  // namespace strategy_impl

Errc DevPagemap::get_folio(Pfn pfn, std::uint32_t refs) noexcept {
  return strategy_impl::dispatch(
      strategy_, [&](auto s) { return strategy_impl::folio_get<decltype(s)>(*this, pfn, refs); });
}

Errc DevPagemap::put_folio(Pfn pfn, std::uint32_t refs) noexcept {
  return strategy_impl::dispatch(
      strategy_, [&](auto s) { return strategy_impl::folio_put<decltype(s)>(*this, pfn, refs); });
}

Errc DevPagemap::pin_folio(Pfn pfn, std::uint32_t npages) noexcept {
  if (torn_down()) [[unlikely]]
    return torn_down_access(pfn);
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  const Pfn folio_end = l.array->pfn_of(l.head) + order_pages(l.array->order(l.head));
  if (npages == 0 || npages > folio_end - pfn) [[unlikely]]
    return Errc::invalid_argument;
  if ((l.array->flags(l.head).load(std::memory_order_acquire) & kPagePoisoned) != 0) {
    return Errc::poisoned;
  }
  auto get = [&](std::uint32_t refs) {
    return strategy_impl::dispatch(strategy_, [&](auto s) {
      return strategy_impl::get_at<decltype(s)>(*this, *l.array, l.head, refs);
    });
  };
  if (l.array->uses_pin_bias(l.head)) return get(PageArray::kPinBias);
  Errc e = get(npages);
  if (e == Errc::ok) l.array->pincount(l.head).fetch_add(npages, std::memory_order_acq_rel);
  return e;
}

Errc DevPagemap::unpin_folio(Pfn pfn, std::uint32_t npages) noexcept {
  if (torn_down()) [[unlikely]]
    return torn_down_access(pfn);
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  const Pfn folio_end = l.array->pfn_of(l.head) + order_pages(l.array->order(l.head));
  if (npages == 0 || npages > folio_end - pfn) [[unlikely]]
    return Errc::invalid_argument;
  // Nothing of this pagemap may be touched after the strategy's put returns.
  auto put = [&](std::uint32_t refs) {
    return strategy_impl::dispatch(strategy_, [&](auto s) {
      return strategy_impl::put_at<decltype(s)>(*this, *l.array, l.head, refs);
    });
  };
  if (l.array->uses_pin_bias(l.head)) {
    const std::uint32_t r = l.array->ref(l.head).load(std::memory_order_acquire);
    if (r < PageArray::kPinBias || r > PageArray::kMaxRef) {
      if (torn_down()) return late_access();
      if (r > PageArray::kMaxRef && r != strategy_impl::kFreeingRef) return late_access();
      report_misuse(Errc::underflow, "DevPagemap::unpin_folio of a folio that is not pinned");
      return Errc::underflow;
    }
    return put(PageArray::kPinBias);
  }
  std::atomic<std::uint32_t>& pc = l.array->pincount(l.head);
  std::uint32_t old = pc.load(std::memory_order_relaxed);
  do {
    if (old < npages) {
      if (torn_down()) return late_access();
      report_misuse(Errc::underflow, "DevPagemap::unpin_folio of a folio that is not pinned");
      return Errc::underflow;
    }
  } while (!pc.compare_exchange_weak(old, old - npages, std::memory_order_acq_rel,
                                     std::memory_order_relaxed));
  return put(npages);
}

std::uint32_t DevPagemap::folio_ref_count(Pfn pfn) const noexcept {
  if (torn_down() && !quarantine_) return 0;  // the metadata is retired
  Loc l = locate(pfn);
  return l.array == nullptr ? 0 : l.array->ref(l.head).load(std::memory_order_acquire);
}

bool DevPagemap::folio_maybe_dma_pinned(Pfn pfn) const noexcept {
  if (torn_down() && !quarantine_) return false;
  Loc l = locate(pfn);
  if (l.array == nullptr) return false;
  if (l.array->uses_pin_bias(l.head)) {
    std::uint32_t r = l.array->ref(l.head).load(std::memory_order_acquire);
    return r >= PageArray::kPinBias && r <= PageArray::kMaxRef;
  }
  return l.array->pincount(l.head).load(std::memory_order_acquire) > 0;
}

Result<DevPagemap::Allocation> DevPagemap::request(Pfn first, std::uint64_t nr) noexcept {
  if (nr == 0) return Error(Errc::invalid_argument, "request of zero pages");
  bool inside = false;
  for (const Range& r : ranges_) {
    if (r.pfns.contains(first) && nr <= r.pfns.end() - first) inside = true;
  }
  if (!inside) {
    return Error(Errc::out_of_range,
                 fmt::format("request [{:#x}, +{}) not inside {}", first, nr, name_));
  }
  if (!ref_.tryget_live()) return Error(Errc::dead, name_ + " is being torn down");
  return Allocation(this, first, nr);
}

// ---- teardown ---------------------------------------------------------------------------------

void DevPagemap::on_release() noexcept {
  release_gen_.fetch_add(1, std::memory_order_seq_cst);
  wake_up_var(&release_gen_);  // the key is only an address: the pagemap may be gone by now
}

bool DevPagemap::released_since(std::uint64_t gen0) const noexcept {
  return release_gen_.load(std::memory_order_acquire) != gen0;
}

// Undoes a kill: the pagemap is live again, as before, with its reference back in percpu mode
// (kAllowReinit kept its slot). `kill_dropped_initial` is false when the kill itself refused (the
// fold found more puts than gets): the initial reference is still counted and no release will
// come. Otherwise, if the last holder let go meanwhile, its put ran (or is running) release: wait
// for that to finish, so that no stale release is taken for a later one, and start afresh. Every
// wait here is bounded; nothing here can hang.
void DevPagemap::revive(std::uint64_t gen0, bool kill_dropped_initial) noexcept {
  if (!kill_dropped_initial && !ref_.is_dying()) {
    // The ref undid the refused kill itself (live, same mode, its count as the fold found it:
    // 1 - k after k stray puts, k >= 1). Bring it back to one (the initial reference), so the
    // pagemap's own reference is counted again and the next kill balances whatever k was; giving
    // back one reference per attempt took k + 1 attempts (and made ~DevPagemap give up for
    // k >= 3). The fold's figure is exact unless a holder gets or puts meanwhile, which no
    // accounting can tell from a stray put.
    const std::int64_t found = ref_.approx_count();
    const std::uint64_t give_back = found < 1 ? static_cast<std::uint64_t>(1 - found) : 1;
    (void)ref_.get_many(give_back);  // on a live ref: cannot fail
  } else if (ref_.is_dying() && ref_.resurrect() == Errc::released) {
    if (kill_dropped_initial) {
      // release() follows the final put by a few instructions; 10 s is "never" for it.
      WaitOptions w;
      w.deadline = Clock::now() + std::chrono::seconds(10);
      if (wait_var_event(
              &release_gen_, [&] { return released_since(gen0); }, w) != Errc::ok) {
        report_misuse(Errc::timed_out, "DevPagemap: the pagemap reference's release never ran");
      }
    }
    // At zero: back to one initial reference. A fold that found the count below zero (more than
    // one stray put) leaves it there; reinit then refuses and reports, and the ref stays killed.
    (void)ref_.reinit();
  }
  if (ref_.is_dying()) {
    state_.store(State::dying, std::memory_order_release);  // could not be brought back
    return;
  }
  if ((life_.fetch_and(static_cast<std::uint8_t>(~kKilled), std::memory_order_seq_cst) & kKilled) !=
      0) {
    killed_pagemaps_.n.fetch_sub(1, std::memory_order_seq_cst);
  }
  state_.store(State::live, std::memory_order_release);
}

bool DevPagemap::anything_held(bool initial_ref_held) const noexcept {
  // After the kill, ref_ is atomic and exact: every holder, plus the initial reference while the
  // kill has not dropped it yet.
  if (ref_.approx_count() > (initial_ref_held ? 1 : 0)) return true;
  for (const Range& r : ranges_) {
    if (r.array->find_busy(0, r.array->entries()) != r.array->entries()) return true;
  }
  return false;
}

Error DevPagemap::holders_error(Errc code, const char* why) const {
  HolderReport rep = holders();
  std::string msg = fmt::format("memunmap of {} {}: {}", name_, why, rep.to_string());
  return Error(code, std::move(msg), std::make_shared<const HolderReport>(std::move(rep)));
}

HolderReport DevPagemap::holders() const {
  HolderReport rep;
  rep.object = describe();
  rep.pagemap_refs = ref_.approx_count();
  if (state() == State::live) rep.pagemap_refs -= 1;  // the initial reference is not a holder
  for (const Range& r : ranges_) {
    PageArray& a = *r.array;
    if (a.retired()) continue;
    for (std::uint64_t e = a.find_busy(0, a.entries()); e < a.entries();
         e = a.find_busy(e + 1, a.entries())) {
      ++rep.total_busy;
      if (rep.busy.size() < HolderReport::kMaxListed) {
        BusyPage p;
        p.pfn = a.pfn_of(e);
        p.order = a.order(e);
        p.refcount = a.ref(e).load(std::memory_order_relaxed);
        p.mapcount = a.mapcount(e).load(std::memory_order_relaxed);
        p.pincount = a.uses_pin_bias(e) ? p.refcount / PageArray::kPinBias
                                        : a.pincount(e).load(std::memory_order_relaxed);
        p.owner = a.mapping(e).load(std::memory_order_relaxed);
        rep.busy.push_back(p);
      }
    }
  }
  return rep;
}

std::string DevPagemap::describe() const {
  return fmt::format("{} ({}, {}, {} pages at order {})", name_, pagemap_type_name(type_),
                     strategy_name(strategy_), total_pages(), base_order_);
}

DrainProgress DevPagemap::drain_progress(Clock::time_point start) const {
  DrainProgress p;
  for (const Range& r : ranges_) {
    if (!r.array->retired()) p.busy_folios += r.array->count_busy();
  }
  p.pagemap_refs = ref_.approx_count();
  p.elapsed = Clock::now() - start;
  return p;
}

Errc DevPagemap::wait_folios_idle(Deadline deadline, const WaitProgress& progress,
                                  std::uint64_t* waited, UnmapPolicy policy,
                                  unsigned scan_threads) {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DevPagemap::wait_folios_idle inside a read section");
    return Errc::invalid_argument;
  }
  const State st = state();
  if (st == State::dead || torn_down()) return Errc::already_dead;
  if (st == State::live) return Errc::invalid_argument;  // folios could become busy meanwhile
  return scan_and_wait(deadline, progress, waited, policy, scan_threads);
}

// Scans every folio once and waits until each reads 0. The busy-to-0 transition wakes us (the
// putter saw the kill: wakes_on_idle); a folio first seen FREEING is re-checked by polling, since
// its putter may have decided before the kill not to wake (docs/strategies.md). The re-check
// interval is short for FREEING (a page_free in progress) and a safety net otherwise.
Errc DevPagemap::scan_and_wait(Deadline deadline, const WaitProgress& progress,
                               std::uint64_t* waited, UnmapPolicy policy, unsigned scan_threads) {
  // The kill's stores (life_, killed_pagemaps_) before the scan's loads: either a putter's load
  // after its last CAS sees the kill and wakes us, or we see its 0.
  sanitizer::full_fence();
  std::atomic<std::uint64_t> busy_seen{0};
  std::atomic<Errc> failed{Errc::ok};
  std::mutex progress_mu;  // one report at a time, from whichever scanning thread is due
  Clock::time_point next_report = Clock::now() + progress.every;
  auto maybe_report = [&] {
    if (!progress.report) return;
    std::unique_lock<std::mutex> lock(progress_mu, std::try_to_lock);
    if (!lock.owns_lock() || Clock::now() < next_report) return;
    progress.report(drain_progress(progress.start));
    next_report = Clock::now() + progress.every;
  };
  auto wait_idle = [&](std::atomic<std::uint32_t>& r) -> Errc {
    for (;;) {
      const std::uint32_t v = r.load(std::memory_order_acquire);
      if (v == 0) return Errc::ok;
      const auto now = Clock::now();
      if (deadline && now >= *deadline) return Errc::timed_out;
      WaitOptions w;
      w.deadline = now + (v == strategy_impl::kFreeingRef ? std::chrono::microseconds(100)
                                                          : std::chrono::microseconds(10000));
      if (progress.report && next_report < *w.deadline) w.deadline = next_report;
      if (deadline && *deadline < *w.deadline) w.deadline = deadline;
      (void)wait_var_event(
          &r, [&] { return r.load(std::memory_order_acquire) == 0; }, w);
      maybe_report();  // a timed-out slice is not a failure: the loop re-checks the deadline
    }
  };
  auto scan = [&](PageArray& a, std::uint64_t from, std::uint64_t to) {
    for (std::uint64_t e = a.find_busy(from, to); e < to; e = a.find_busy(e + 1, to)) {
      if (failed.load(std::memory_order_relaxed) != Errc::ok) return;
      PGMAP_YIELD_POINT("sweep.scan_entry");
      busy_seen.fetch_add(1, std::memory_order_relaxed);
      if (policy == UnmapPolicy::refuse) {
        failed.store(Errc::busy, std::memory_order_relaxed);
        return;
      }
      if (Errc e2 = wait_idle(a.ref(e)); e2 != Errc::ok) {
        failed.store(e2, std::memory_order_relaxed);
        return;
      }
    }
  };
  const unsigned threads = std::max(1u, scan_threads);
  for (const Range& range : ranges_) {
    PageArray& a = *range.array;
    const std::uint64_t n = a.entries();
    if (threads == 1 || n < (1u << 20)) {
      scan(a, 0, n);
    } else {
      std::vector<std::thread> workers;
      const std::uint64_t chunk = align_up(n / threads + 1, 4096);
      for (unsigned t = 1; t < threads && t * chunk < n; ++t) {
        workers.emplace_back(scan, std::ref(a), t * chunk, std::min(n, (t + 1) * chunk));
      }
      scan(a, 0, std::min(n, chunk));
      for (std::thread& w : workers)
        w.join();
    }
    if (failed.load() != Errc::ok) break;
  }
  if (waited != nullptr) *waited = busy_seen.load();
  return failed.load();
}

// The kill stage (memunmap step 1), with teardown_mu_ held and the pagemap live. If `refused`
// is given, looks for holders inside the kill's confirm callback — while the initial reference
// still keeps the count above zero, so a refused memunmap can always resurrect — and sets it.
Errc DevPagemap::kill_locked(bool* refused) noexcept {
  kill_gen_ = release_gen_.load(std::memory_order_acquire);
  // Before the scan's loads of the refcounts (Dekker with a lean last put: its CAS to 0, then its
  // load of this count; docs/strategies.md). Undone by revive or at teardown.
  killed_pagemaps_.n.fetch_add(1, std::memory_order_seq_cst);
  // Before the ref's kill: a sweep get that loads life_ after its add backs out from here on.
  life_.fetch_or(kKilled, std::memory_order_seq_cst);
  Errc killed = ref_.kill_and_confirm([&] {
    if (refused != nullptr) *refused = anything_held(/*initial_ref_held=*/true);
  });
  if (killed != Errc::ok || (refused != nullptr && *refused)) return killed;
  // Published only now, so that whoever sees `dying` also sees lookups and new references fail.
  state_.store(State::dying, std::memory_order_release);
  return Errc::ok;
}

Errc DevPagemap::kill() noexcept {
  std::lock_guard<std::mutex> lock(teardown_mu_);
  if (state() != State::live) {
    report_misuse(Errc::already_dead, "DevPagemap::kill of a pagemap that is not live");
    return Errc::already_dead;
  }
  Errc e = kill_locked(nullptr);
  // The fold found a put without a get (reported by the ref): stay live, say so.
  if (e != Errc::ok) revive(kill_gen_, /*kill_dropped_initial=*/false);
  return e;
}

Result<TeardownStats> DevPagemap::memunmap(const MemunmapOptions& opts) {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DevPagemap::memunmap inside an RCU read section");
    return Error(Errc::invalid_argument,
                 fmt::format("memunmap of {} inside an RCU read section (it waits for a grace "
                             "period)",
                             name_));
  }
  std::lock_guard<std::mutex> lock(teardown_mu_);
  const State entry_state = state();
  if (entry_state == State::dead) {
    return Error(Errc::already_dead, name_ + " was already unmapped");
  }
  // A pagemap killed beforehand (kill(), e.g. by kill_dax under alloc_event) stays killed when
  // this call gives up; one that was live is made live again.
  const bool killed_before = entry_state == State::dying;
  const strategy_impl::Teardown plan =
      strategy_impl::dispatch(strategy_, [](auto s) { return decltype(s)::teardown; });
  TeardownStats stats;
  const auto t0 = Clock::now();
  const Deadline deadline = deadline_after(opts.timeout);
  auto give_up = [&](Errc code, const char* why) -> Result<TeardownStats> {
    if (!killed_before) revive(kill_gen_, /*kill_dropped_initial=*/code != Errc::underflow);
    return holders_error(code, why);
  };

  // 1. kill.
  if (!killed_before) {
    bool refused = false;
    Errc killed = kill_locked(opts.policy == UnmapPolicy::refuse ? &refused : nullptr);
    // The fold found a put without a get: keep the pagemap rather than tear down memory whose
    // accounting is wrong (the ref reported the misuse).
    if (killed != Errc::ok) return give_up(Errc::underflow, "found more pagemap puts than gets");
    if (refused) return give_up(Errc::busy, "refused: still in use");
  } else if (opts.policy == UnmapPolicy::refuse && anything_held(/*initial_ref_held=*/false)) {
    return give_up(Errc::busy, "refused: still in use");
  }
  PGMAP_YIELD_POINT("memunmap.after_kill");
  const std::uint64_t gen0 = kill_gen_;
  stats.kill_seconds = seconds_since(t0);

  // 2. wait for what the strategy counts.
  WaitProgress progress;
  progress.report = opts.progress;
  progress.every = opts.progress_every;
  progress.start = t0;
  if (plan.drain_ref) {
    WaitOptions w;
    w.deadline = deadline;
    if (opts.progress) {
      w.progress = [&] { opts.progress(drain_progress(t0)); };
      w.progress_every = opts.progress_every;
    }
    auto t1 = Clock::now();
    if (wait_var_event(
            &release_gen_, [&] { return released_since(gen0); }, w) != Errc::ok) {
      return give_up(Errc::timed_out, "timed out waiting for pagemap references");
    }
    stats.drain_seconds = seconds_since(t1);
  }
  if (plan.scan_folios) {
    PGMAP_YIELD_POINT("memunmap.before_scan");
    auto t2 = Clock::now();
    Errc e = scan_and_wait(deadline, progress, &stats.waited_folios, UnmapPolicy::wait,
                           opts.scan_threads);
    if (e != Errc::ok) return give_up(Errc::timed_out, "timed out waiting for busy folios");
    stats.sweep_seconds = seconds_since(t2);
  }

  // 3 and 4: unpublish, grace period, retire. No free path can still be running: under the
  // drain_ref strategies the pagemap reference covers it, under sweep the scan saw every folio
  // read 0, which its putter stores after page_free.
  auto t3 = Clock::now();
  PGMAP_YIELD_POINT("memunmap.before_grace_period");
  // Cannot refuse: we checked for a read section above.
  (void)PagemapRegistry::global().remove(this);
  PGMAP_YIELD_POINT("memunmap.after_grace_period");
  // From here every folio operation returns use_after_teardown before touching the metadata.
  if ((life_.fetch_or(kTornDown, std::memory_order_seq_cst) & kKilled) != 0) {
    killed_pagemaps_.n.fetch_sub(1, std::memory_order_seq_cst);  // nothing waits on its folios now
  }
  for (Range& r : ranges_) {
    r.array->retire(quarantine_ ? PageArray::RetireMode::quarantine : PageArray::RetireMode::unmap);
    (void)r.backing->revoke(r.offset, r.pfns.bytes());  // ASan poisoning only; cannot matter
  }
  state_.store(State::dead, std::memory_order_release);
  stats.teardown_seconds = seconds_since(t3);
  stats.total_seconds = seconds_since(t0);
  return stats;
}

}  // namespace pgmap
