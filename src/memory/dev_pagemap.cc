#include "pgmap/memory/dev_pagemap.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <thread>

#include "memory/pagemap_registry.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/wait_table.h"

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
      ref_([this] { on_release(); }) {
  first_array_ = ranges_.front().array.get();
  if (name_.empty()) {
    name_ =
        fmt::format("pagemap {:#x}-{:#x}", ranges_.front().pfns.start, ranges_.back().pfns.end());
  }
}

Result<std::shared_ptr<DevPagemap>> memremap(MemremapParams params) {
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
  {
    rcu::ReadGuard guard;  // cheap early check; insert() re-checks under the writer lock
    for (const PfnRange& r : pfns) {
      if (PagemapRegistry::global().lookup(r.start) != nullptr ||
          PagemapRegistry::global().lookup(r.end() - 1) != nullptr) {
        return Error(Errc::overlap,
                     fmt::format("memremap: pfns {:#x}-{:#x} already mapped", r.start, r.end()));
      }
    }
  }
  std::vector<DevPagemap::Range> ranges;
  for (std::size_t i = 0; i < params.ranges.size(); ++i) {
    auto array = PageArray::create(pfns[i], params.base_order);
    if (!array) return array.error();
    ranges.push_back(
        {pfns[i], params.ranges[i].backing, params.ranges[i].offset, std::move(array).value()});
  }
  std::shared_ptr<DevPagemap> pgmap(new DevPagemap(params, std::move(ranges)));
  if (PagemapRegistry::global().insert(pgmap.get(), pfns) != Errc::ok) {
    pgmap->state_.store(DevPagemap::State::dead, std::memory_order_release);  // never published
    return Error(Errc::overlap, "memremap: pfns already mapped by a concurrent memremap");
  }
  for (const DevPagemap::Range& r : pgmap->ranges_) {
    (void)r.backing->restore(r.offset, r.pfns.bytes());  // a previous memunmap may have revoked it
  }
  return pgmap;
}

DevPagemap::~DevPagemap() {
  // A pagemap that lost a memremap race was never published and is already dead; its reference
  // was never shared and the PercpuRef destructor folds it.
  // Killed (kill()) but never unmapped counts too: it is still published in the registry.
  if (state() == State::dead) return;
  // The owner gave up its last handle while something may still hold the pagemap: the teardown
  // must wait (freeing under a holder is the bug this library exists to prevent), but never
  // silently — say every few seconds who is being waited for.
  MemunmapOptions opts;
  opts.progress_every = std::chrono::seconds(5);
  opts.progress = [this](const DrainProgress& p) {
    std::fprintf(stderr, "pgmap: destroying %s, still waiting after %.0f s for: %s\n",
                 name_.c_str(), std::chrono::duration<double>(p.elapsed).count(),
                 holders().to_string().c_str());
  };
  (void)memunmap(opts);
}

// ---- lookups ----------------------------------------------------------------------------------

DevPagemap::Loc DevPagemap::locate(Pfn pfn) const noexcept {
  PageArray* a = first_array_;
  if (!a->contains(pfn)) [[unlikely]] {
    a = nullptr;
    for (const Range& r : ranges_) {
      if (r.pfns.contains(pfn)) a = r.array.get();
    }
    if (a == nullptr) return {};
  }
  return {a, a->head_of(a->index_of(pfn))};
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

Errc DevPagemap::late_access(PageArray* a, std::uint64_t head, std::uint32_t undo_add,
                             std::uint32_t undo_sub) noexcept {
  // Restore the value so the entry keeps reading as retired, then report.
  if (undo_add != 0) a->ref(head).fetch_add(undo_add, std::memory_order_relaxed);
  if (undo_sub != 0) a->ref(head).fetch_sub(undo_sub, std::memory_order_relaxed);
  late_accesses_.fetch_add(1, std::memory_order_relaxed);
  return Errc::use_after_teardown;
}

Errc DevPagemap::get_folio(Pfn pfn, std::uint32_t refs) noexcept {
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  std::atomic<std::uint32_t>& r = l.array->ref(l.head);
  std::uint32_t old = 0;
  switch (strategy_) {
    case Strategy::none:
      // Nothing vouches for the pagemap.
      old = r.fetch_add(refs, std::memory_order_acq_rel);
      break;

    case Strategy::per_lookup:
      if (!ref_.tryget_live()) return Errc::dead;
      if (refs > 1) (void)ref_.get_many(refs - 1);
      old = r.fetch_add(refs, std::memory_order_acq_rel);
      break;

    case Strategy::transition:
      // A busy folio already carries the pagemap reference of its busy period.
      old = r.load(std::memory_order_relaxed);
      while (old != 0 && old <= PageArray::kMaxRef) {
        if (r.compare_exchange_weak(old, old + refs, std::memory_order_acq_rel,
                                    std::memory_order_relaxed)) {
          return Errc::ok;
        }
      }
      // 0 -> refs: take the reference before the folio can be seen busy.
      if (!ref_.tryget_live()) return Errc::dead;
      old = r.fetch_add(refs, std::memory_order_acq_rel);
      // Lost the race to another 0 -> 1; theirs covers the folio. Our get succeeded, so this put
      // cannot underflow.
      if (old != 0) (void)ref_.put();
      break;

    case Strategy::sweep:
    case Strategy::alloc_event:
      old = r.fetch_add(refs, std::memory_order_seq_cst);
      // Pairs with memunmap's store of alive_ = false before its scan: either we see the kill
      // and back out, or the scan sees our reference and waits for it. Under alloc_event the
      // caller's allocation keeps the pagemap, but no folio may become busy after the kill either.
      if (!alive_.load(std::memory_order_seq_cst)) [[unlikely]] {
        if (old > PageArray::kMaxRef) return late_access(l.array, l.head, 0, refs);
        if (r.fetch_sub(refs, std::memory_order_seq_cst) == refs) wake_up_var(&r);
        return Errc::dead;
      }
      break;
  }
  if (old > PageArray::kMaxRef - refs) [[unlikely]] {
    if (strategy_ == Strategy::per_lookup) (void)ref_.put_many(refs);  // undoes our own get
    return late_access(l.array, l.head, 0, refs);
  }
  return Errc::ok;
}

Errc DevPagemap::put_refcount(PageArray* a, std::uint64_t head, std::uint32_t refs) noexcept {
  std::atomic<std::uint32_t>& r = a->ref(head);
  std::uint32_t old = r.load(std::memory_order_relaxed);
  // Under sweep nothing but the folio's refcount keeps the pagemap, and memunmap's scan sees it
  // idle as soon as the last put lands, while folio_freed (page_free, the wake-up) still uses the
  // pagemap. So the last put and its free path run in a read section, entered before the
  // refcount can reach zero: memunmap's grace period, after the scan, waits for it.
  std::optional<rcu::ReadGuard> freeing;
  do {
    if (old < refs) [[unlikely]] {
      report_misuse(Errc::underflow, "DevPagemap::put_folio below zero");
      return Errc::underflow;
    }
    if (old > PageArray::kMaxRef) [[unlikely]]
      return late_access(a, head, 0, 0);
    if (old == refs && strategy_ == Strategy::sweep && !freeing) freeing.emplace();
  } while (!r.compare_exchange_weak(old, old - refs, std::memory_order_seq_cst,
                                    std::memory_order_relaxed));
  if (old == refs) folio_freed(a, head);
  return Errc::ok;
}

Errc DevPagemap::put_folio(Pfn pfn, std::uint32_t refs) noexcept {
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  // Read before the put: once the last reference is gone (transition: inside folio_freed) the
  // pagemap may be freed by its owner.
  const bool per_lookup = strategy_ == Strategy::per_lookup;
  Errc e = put_refcount(l.array, l.head, refs);
  // The folio references being dropped each carried a pagemap reference (per_lookup); an
  // underflow here is already reported by the ref.
  if (e == Errc::ok && per_lookup) (void)ref_.put_many(refs);
  return e;
}

void DevPagemap::folio_freed(PageArray* a, std::uint64_t head) noexcept {
  if (ops_.page_free) ops_.page_free(*this, a->pfn_of(head), a->order(head));
  // Wake before dropping the pagemap reference: the wake-up touches this pagemap's metadata,
  // which must still exist.
  if (type_ == PagemapType::fs_dax || dying_.load(std::memory_order_seq_cst)) {
    wake_up_var(&a->ref(head));
  }
  // The busy period's reference, taken at 0 -> 1 (an underflow is reported by the ref itself).
  if (strategy_ == Strategy::transition) (void)ref_.put();
}

Errc DevPagemap::pin_folio(Pfn pfn, std::uint32_t npages) noexcept {
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  const Pfn folio_end = l.array->pfn_of(l.head) + order_pages(l.array->order(l.head));
  if (npages == 0 || npages > folio_end - pfn) [[unlikely]]
    return Errc::invalid_argument;
  if ((l.array->flags(l.head).load(std::memory_order_acquire) & kPagePoisoned) != 0) {
    return Errc::poisoned;
  }
  if (l.array->uses_pin_bias(l.head)) return get_folio(pfn, PageArray::kPinBias);
  Errc e = get_folio(pfn, npages);
  if (e == Errc::ok) l.array->pincount(l.head).fetch_add(npages, std::memory_order_acq_rel);
  return e;
}

Errc DevPagemap::unpin_folio(Pfn pfn, std::uint32_t npages) noexcept {
  Loc l = locate(pfn);
  if (l.array == nullptr) [[unlikely]]
    return Errc::out_of_range;
  const Pfn folio_end = l.array->pfn_of(l.head) + order_pages(l.array->order(l.head));
  if (npages == 0 || npages > folio_end - pfn) [[unlikely]]
    return Errc::invalid_argument;
  if (l.array->uses_pin_bias(l.head)) {
    if (l.array->ref(l.head).load(std::memory_order_acquire) < PageArray::kPinBias) {
      report_misuse(Errc::underflow, "DevPagemap::unpin_folio of a folio that is not pinned");
      return Errc::underflow;
    }
    return put_folio(pfn, PageArray::kPinBias);
  }
  std::atomic<std::uint32_t>& pc = l.array->pincount(l.head);
  std::uint32_t old = pc.load(std::memory_order_relaxed);
  do {
    if (old < npages) {
      report_misuse(Errc::underflow, "DevPagemap::unpin_folio of a folio that is not pinned");
      return Errc::underflow;
    }
  } while (!pc.compare_exchange_weak(old, old - npages, std::memory_order_acq_rel,
                                     std::memory_order_relaxed));
  return put_folio(pfn, npages);
}

std::uint32_t DevPagemap::folio_ref_count(Pfn pfn) const noexcept {
  if (state() == State::dead && !quarantine_) return 0;  // the metadata is gone
  Loc l = locate(pfn);
  return l.array == nullptr ? 0 : l.array->ref(l.head).load(std::memory_order_acquire);
}

bool DevPagemap::folio_maybe_dma_pinned(Pfn pfn) const noexcept {
  if (state() == State::dead && !quarantine_) return false;
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
  wake_up_var(&release_gen_);
}

bool DevPagemap::released_since(std::uint64_t gen0) const noexcept {
  return release_gen_.load(std::memory_order_acquire) != gen0;
}

// Undoes a kill whose wait timed out or was refused: the pagemap is live again, as before the
// memunmap call. If the last holder let go in the meantime, its put already ran (or is running)
// release; wait for that to finish, so no stale release can be mistaken for a later one, and start
// the reference afresh.
void DevPagemap::revive(std::uint64_t gen0) noexcept {
  if (ref_.resurrect() == Errc::released) {
    (void)wait_var_event(&release_gen_, [&] { return released_since(gen0); });
    (void)ref_.reinit();
  }
  alive_.store(true, std::memory_order_seq_cst);
  dying_.store(false, std::memory_order_seq_cst);
  state_.store(State::live, std::memory_order_release);
}

bool DevPagemap::anything_held(bool initial_ref_held) const noexcept {
  // After the kill, ref_ is atomic and exact: every holder, plus the initial reference while the
  // kill has not dropped it yet.
  if (const_cast<PercpuRef&>(ref_).approx_count() > (initial_ref_held ? 1 : 0)) return true;
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
  rep.pagemap_refs = const_cast<PercpuRef&>(ref_).approx_count();
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

Errc DevPagemap::sweep(const MemunmapOptions& opts, Deadline deadline, TeardownStats& stats) {
  std::atomic<std::uint64_t> waited{0};
  std::atomic<bool> timed_out{false};
  auto scan = [&](PageArray& a, std::uint64_t from, std::uint64_t to) {
    for (std::uint64_t e = a.find_busy(from, to); e < to; e = a.find_busy(e + 1, to)) {
      waited.fetch_add(1, std::memory_order_relaxed);
      std::atomic<std::uint32_t>& r = a.ref(e);
      WaitOptions w;
      w.deadline = deadline;
      if (wait_var_event(
              &r, [&] { return r.load(std::memory_order_acquire) == 0; }, w) != Errc::ok) {
        timed_out.store(true, std::memory_order_relaxed);
        return;
      }
    }
  };
  unsigned threads = std::max(1u, opts.scan_threads);
  for (const Range& range : ranges_) {
    PageArray& a = *range.array;
    std::uint64_t n = a.entries();
    if (threads == 1 || n < (1u << 20)) {
      scan(a, 0, n);
    } else {
      std::vector<std::thread> workers;
      std::uint64_t chunk = align_up(n / threads + 1, 4096);
      for (unsigned t = 1; t < threads && t * chunk < n; ++t) {
        workers.emplace_back(scan, std::ref(a), t * chunk, std::min(n, (t + 1) * chunk));
      }
      scan(a, 0, std::min(n, chunk));
      for (std::thread& w : workers)
        w.join();
    }
    if (timed_out.load()) break;
  }
  stats.waited_folios = waited.load();
  return timed_out.load() ? Errc::timed_out : Errc::ok;
}

// The kill stage (memunmap step 1), with teardown_mu_ held and the pagemap live. If `refused`
// is given, looks for holders inside the kill's confirm callback — while the initial reference
// still keeps the count above zero, so a refused memunmap can always resurrect — and sets it.
Errc DevPagemap::kill_locked(bool* refused) noexcept {
  kill_gen_ = release_gen_.load(std::memory_order_acquire);
  dying_.store(true, std::memory_order_seq_cst);
  alive_.store(false, std::memory_order_seq_cst);
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
  if (e != Errc::ok) revive(kill_gen_);  // the fold found an underflow: stay live, say so
  return e;
}

Result<TeardownStats> DevPagemap::memunmap(const MemunmapOptions& opts) {
  std::lock_guard<std::mutex> lock(teardown_mu_);
  const State entry_state = state();
  if (entry_state == State::dead) {
    return Error(Errc::already_dead, name_ + " was already unmapped");
  }
  // A pagemap killed beforehand (kill(), e.g. by kill_dax under alloc_event) stays killed when
  // this call gives up; one that was live is made live again.
  const bool killed_before = entry_state == State::dying;
  TeardownStats stats;
  const auto t0 = Clock::now();
  const Deadline deadline = deadline_after(opts.timeout);
  auto give_up = [&](Errc code, const char* why) -> Result<TeardownStats> {
    if (!killed_before) revive(kill_gen_);
    return holders_error(code, why);
  };

  // 1. kill.
  if (!killed_before) {
    bool refused = false;
    Errc killed = kill_locked(opts.policy == UnmapPolicy::refuse ? &refused : nullptr);
    if (refused) return give_up(Errc::busy, "refused: still in use");
    // The fold found a put without a get: keep the pagemap rather than tear down memory whose
    // accounting is wrong.
    if (killed != Errc::ok) return give_up(Errc::underflow, "found more pagemap puts than gets");
  } else if (opts.policy == UnmapPolicy::refuse && anything_held(/*initial_ref_held=*/false)) {
    return give_up(Errc::busy, "refused: still in use");
  }
  const std::uint64_t gen0 = kill_gen_;
  stats.kill_seconds = seconds_since(t0);

  // 2. wait.
  if (strategy_ != Strategy::none) {
    WaitOptions w;
    w.deadline = deadline;
    if (opts.progress) {
      w.progress = [&] {
        DrainProgress p;
        p.pagemap_refs = ref_.approx_count();
        p.elapsed = Clock::now() - t0;
        opts.progress(p);
      };
      w.progress_every = opts.progress_every;
    }
    auto t1 = Clock::now();
    if (wait_var_event(
            &release_gen_, [&] { return released_since(gen0); }, w) != Errc::ok) {
      return give_up(Errc::timed_out, "timed out waiting for pagemap references");
    }
    stats.drain_seconds = seconds_since(t1);
    if (strategy_ == Strategy::sweep) {
      auto t2 = Clock::now();
      sanitizer::full_fence();  // alive_ store before the scan loads
      if (sweep(opts, deadline, stats) != Errc::ok) {
        return give_up(Errc::timed_out, "timed out waiting for busy folios");
      }
      stats.sweep_seconds = seconds_since(t2);
    }
  }
  // 3 and 4: unpublish, grace period, retire. The grace period also waits for the free path of
  // a last put that the sweep saw land (put_refcount).
  auto t3 = Clock::now();
  PagemapRegistry::global().remove(this);
  for (Range& r : ranges_) {
    r.array->retire(quarantine_ ? PageArray::RetireMode::quarantine : PageArray::RetireMode::unmap);
    (void)r.backing->revoke(r.offset, r.pfns.bytes());
  }
  state_.store(State::dead, std::memory_order_release);
  stats.teardown_seconds = seconds_since(t3);
  stats.total_seconds = seconds_since(t0);
  return stats;
}

}  // namespace pgmap
