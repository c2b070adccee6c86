// DevPagemap: device memory handed out as pages (the kernel's struct dev_pagemap with
// memremap_pages / memunmap_pages, mm/memremap.c).
//
// A pagemap covers one or more pfn ranges of backings, owns their page metadata (PageArray), and
// has a liveness reference (PercpuRef) that lookups take with tryget_live. Its strategy
// (strategy.h) decides what folio references cost and what memunmap waits for.
//
// ---- Lifecycle ---------------------------------------------------------------------------------
//
//   memremap(params)    validate ranges (aligned, inside the backing, not overlapping any live
//                       pagemap), build the metadata, publish in the pfn -> pagemap registry.
//                       State: live.
//   memunmap(opts)      1. kill: lookups (get_dev_pagemap, tryget_live, request) fail from now on,
//                          and no idle folio can become busy.           State: dying.
//                       2. wait for what the strategy counts (see strategy.h), bounded by
//                          opts.timeout, reporting progress every opts.progress_every; the
//                          refuse policy instead returns Errc::busy at once if anything is held.
//                       3. unpublish from the registry and wait for an RCU grace period.
//                       4. mark the pagemap torn down (later folio operations return
//                          Errc::use_after_teardown without touching the metadata), retire the
//                          metadata and revoke the device bytes (ASan).     State: dead.
//                       If step 2 times out or refuses, the kill is undone and the pagemap is
//                       live again, exactly as before the call, its reference back in percpu
//                       mode (ref_is_percpu()); the Error carries a HolderReport of who holds
//                       what. If the kill finds more pagemap puts than gets (a stray put_ref),
//                       it is refused: Errc::underflow and a misuse report, nothing torn down.
//   ~DevPagemap         memunmap with no timeout unless already dead; while it waits it reports
//                       the holders on stderr every 5 s (it never hangs silently).
//
// ---- Folio references (hot path, never block) --------------------------------------------------
//
// get_folio / put_folio / pin_folio / unpin_folio take any pfn of a folio and act on its head.
// They never block, take no lock and may be called inside any read section. The caller must
// either already hold a reference on that folio, or hold a pagemap reference (get_dev_pagemap) or
// be the pagemap's owner: nothing may look at an idle folio's pagemap otherwise (I1). Errors:
// Errc::out_of_range (pfn not in this pagemap), Errc::dead (the pagemap is dying and the strategy
// refuses the reference; nothing changed), Errc::underflow (put below zero; misuse reported,
// nothing changed), Errc::busy (sweep / alloc_event: a get on a folio whose last put is running
// its free path; misuse reported, nothing changed), Errc::use_after_teardown (the pagemap was
// already torn down, or quarantined metadata was reached: the caller held nothing that kept the
// pagemap alive — only possible under `none` or by misuse; counted in late_accesses(), never a
// crash, nothing changed).
//
// When a folio's refcount reaches zero, a split its owner left owed (kPageSplitOwed, page_array.h:
// a large fsdax folio disassociated while held) is paid first — so page_free sees the base order —
// then ops.page_free runs on the putting thread, then waiters
// keyed on the folio's refcount are woken (always for FS_DAX, I16; for other types while the
// pagemap is dying); under `transition` the folio's pagemap reference is dropped last. Under
// sweep and alloc_event page_free runs while the refcount reads FREEING (busy to memunmap's scan),
// so the pagemap exists throughout; no read section is involved (docs/strategies.md).
//
// Thread safety: every member is thread-safe. memunmap may run concurrently with any folio
// operation; concurrent memunmaps of one pagemap: one wins, the others get Errc::already_dead.
// Lock order: docs/lock-order.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "pgmap/core/diagnostics.h"
#include "pgmap/core/error.h"
#include "pgmap/core/percpu_ref.h"
#include "pgmap/core/wait_table.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/memory/strategy.h"

namespace pgmap {

class DevPagemap;
namespace strategy_impl {
struct Access;
}

struct PagemapOps {
  // A folio's refcount reached zero. Runs on the thread that dropped the last reference, while
  // the pagemap still exists (under sweep / alloc_event memunmap's scan waits for it); must not
  // block, take references on this pagemap, or call memunmap.
  std::function<void(DevPagemap& pgmap, Pfn head, unsigned order)> page_free;
  // Memory failure on [pfn, pfn + nr_pages) (used by the upper layers; Errc::not_supported makes
  // the caller fall back to the generic handler).
  std::function<Errc(DevPagemap& pgmap, Pfn pfn, std::uint64_t nr_pages, int flags)> memory_failure;
};

struct PagemapRangeSpec {
  std::shared_ptr<Backing> backing;
  std::uint64_t offset = 0;  // bytes into the backing
  std::uint64_t size = 0;    // bytes; 0 = to the end of the backing
};

struct MemremapParams {
  PagemapType type = PagemapType::fs_dax;
  Strategy strategy = Strategy::transition;
  unsigned base_order = 0;  // folio order of the memmap (vmemmap_shift): 0, 9 or 18
  std::vector<PagemapRangeSpec> ranges;
  PagemapOps ops;
  const void* owner = nullptr;  // who created it (driver), reported in diagnostics
  std::string name;             // for messages; defaults to the pfn span
  // Keep retired metadata mapped and poisoned-by-value so late accesses are detected instead of
  // faulting. Default: on in PGMAP_DEBUG_INVARIANTS builds.
  std::optional<bool> quarantine;
};

enum class UnmapPolicy {
  wait,    // wait for every holder (bounded by `timeout` if given)
  refuse,  // Errc::busy, with a holder report, if anything is held; never waits for folios
};

struct DrainProgress {
  std::uint64_t busy_folios = 0;  // folios with a non-zero refcount at this report
  std::int64_t pagemap_refs = 0;  // outstanding pagemap references
  std::chrono::nanoseconds elapsed{0};
};

struct MemunmapOptions {
  UnmapPolicy policy = UnmapPolicy::wait;
  std::optional<std::chrono::nanoseconds> timeout{};     // none: wait as long as it takes
  unsigned scan_threads = 1;                             // sweep: threads that scan the metadata
  std::function<void(const DrainProgress&)> progress{};  // optional; runs on the waiting thread
  std::chrono::milliseconds progress_every{500};
};

// Progress reporting of a wait on folios (DevPagemap::wait_folios_idle).
struct WaitProgress {
  std::function<void(const DrainProgress&)> report{};  // optional; runs on the waiting thread
  std::chrono::milliseconds every{500};
  Clock::time_point start = Clock::now();  // DrainProgress::elapsed counts from here
};

struct TeardownStats {
  double kill_seconds = 0;      // kill (percpu fold and membarrier)
  double drain_seconds = 0;     // waiting for the pagemap reference to be released
  double sweep_seconds = 0;     // scanning every folio and waiting on busy ones (sweep)
  double teardown_seconds = 0;  // unpublish + grace period + retiring the metadata
  double total_seconds = 0;
  std::uint64_t waited_folios = 0;  // folios the sweep found busy and waited on
};

// RAII reference on a pagemap (get_dev_pagemap's result). Empty when the lookup failed.
class PagemapRef {
 public:
  PagemapRef() = default;
  explicit PagemapRef(DevPagemap* p) noexcept : p_(p) {}
  PagemapRef(PagemapRef&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  PagemapRef& operator=(PagemapRef&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  ~PagemapRef() { reset(); }
  DevPagemap* get() const noexcept { return p_; }
  DevPagemap* operator->() const noexcept { return p_; }
  DevPagemap& operator*() const noexcept { return *p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  void reset() noexcept;
  DevPagemap* release() noexcept { return std::exchange(p_, nullptr); }

 private:
  DevPagemap* p_ = nullptr;
};

namespace detail {
// DevPagemap::killed_pagemaps_: a counter alone on its 128 bytes (an adjacent-line pair).
struct alignas(128) KilledPagemaps {
  std::atomic<std::uint32_t> n{0};
};
}  // namespace detail

class DevPagemap {
 public:
  enum class State { live, dying, dead };

  ~DevPagemap();
  DevPagemap(const DevPagemap&) = delete;
  DevPagemap& operator=(const DevPagemap&) = delete;

  PagemapType type() const noexcept { return type_; }
  Strategy strategy() const noexcept { return strategy_; }
  unsigned base_order() const noexcept { return base_order_; }
  State state() const noexcept { return state_.load(std::memory_order_acquire); }
  const void* owner() const noexcept { return owner_; }
  const std::string& name() const noexcept { return name_; }
  std::size_t nr_ranges() const noexcept { return ranges_.size(); }
  PfnRange range(std::size_t i) const noexcept { return ranges_[i].pfns; }
  std::uint64_t total_pages() const noexcept;
  // Whether pfn is in one of the ranges (answered from the ranges, valid in any state).
  bool contains(Pfn pfn) const noexcept;

  // Metadata of the range containing pfn, or nullptr if pfn is in none. Like every access to a
  // folio's metadata, only while the caller holds a reference that keeps the pagemap alive (a
  // folio or pagemap reference: I1); after memunmap the metadata is gone.
  PageArray* array_for(Pfn pfn) const noexcept { return locate(pfn).array; }
  // Bytes of the device at pfn (valid while the caller holds a reference keeping it alive).
  std::byte* address_of(Pfn pfn) const noexcept;

  // ---- pagemap references (get_dev_pagemap / put_dev_pagemap) ----
  // Never block. tryget_live fails once the pagemap is killed. put_ref without a matching get is
  // misuse: in percpu mode it is found only at the kill, which then refuses (Errc::underflow).
  // Prefer the RAII PagemapRef (get_dev_pagemap).
  // Always inlined: an out-of-line copy would carry its own rseq descriptor in __rseq_cs, which
  // the linker cannot drop with a discarded duplicate (clang -O1 builds failed to link).
  [[gnu::always_inline]] bool tryget_live() noexcept { return ref_.tryget_live(); }
  [[gnu::always_inline]] Errc put_ref() noexcept { return ref_.put(); }
  // `n` references at once, all or none: tryget_live, then the other n - 1 while that one keeps
  // the count above zero (the kernel's percpu_ref_tryget_live + percpu_ref_get_many). put_refs
  // drops n. For holders of many references, such as a 2 MiB file entry (fs/entry_refs.h).
  [[gnu::always_inline]] bool tryget_live_many(std::uint64_t n) noexcept {
    if (n == 0) return true;
    if (!ref_.tryget_live()) return false;
    if (n == 1 || ref_.get_many(n - 1) == Errc::ok) return true;
    (void)ref_.put();  // the one taken just above; the count cannot reach zero here
    return false;
  }
  [[gnu::always_inline]] Errc put_refs(std::uint64_t n) noexcept {
    return n == 0 ? Errc::ok : ref_.put_many(n);
  }
  // Whether the pagemap reference is in percpu (cheap) mode: true while live, including after a
  // refused or timed-out memunmap (diagnostics and tests).
  bool ref_is_percpu() const noexcept { return ref_.is_percpu(); }

  // ---- folio references: hot path (never block, no locks; see "Folio references" above) ----
  // Prefer the RAII handles PageRef and Pin (page_ref.h).
  Errc get_folio(Pfn pfn, std::uint32_t refs = 1) noexcept;
  Errc put_folio(Pfn pfn, std::uint32_t refs = 1) noexcept;
  // FOLL_PIN of `npages` consecutive pages starting at pfn, all inside one folio: the pin bias
  // per page on a small folio (npages must then be 1), +npages refcount and +npages exact
  // pincount on a large one — one refcount operation either way. The one pin-accounting path:
  // GUP and the RAII Pin both come here. Errc::invalid_argument (npages 0, or the pages leave
  // the folio), Errc::poisoned, and the errors of get_folio; nothing changed on error.
  Errc pin_folio(Pfn pfn, std::uint32_t npages = 1) noexcept;
  // Drops `npages` pins taken by pin_folio on pages of one folio. Errc::underflow (misuse
  // reported, nothing changed) if the folio has fewer pins than that.
  Errc unpin_folio(Pfn pfn, std::uint32_t npages = 1) noexcept;
  // Diagnostics: 0 / false after memunmap unless the metadata is quarantined.
  std::uint32_t folio_ref_count(Pfn pfn) const noexcept;
  bool folio_maybe_dma_pinned(Pfn pfn) const noexcept;

  // ---- folio references in batches (dev_pagemap_batch.cc; docs/gup.md) ----
  // The four operations above over many pages in one call. `pages` lists pfns, one entry per
  // 4 KiB page (any pfns of this pagemap, in any order, from any of its ranges). The effect is
  // that of calling the single operation once per entry, in order, with one page each
  // (get_folio(p, 1), put_folio(p, 1), pin_folio(p, 1), unpin_folio(p, 1)), stopping at the first
  // that fails; only the cost differs: one torn-down check and one strategy dispatch per call, one
  // pfn -> page array resolution per run of entries in one range, then one refcount operation per
  // folio, where consecutive entries that are consecutive pages of one large folio share one
  // operation (the refs or pins of those pages added or dropped together, as pin_folio(p, n)).
  // Returns Errc::ok, or the error the single operation would have given for the first entry
  // that fails. result->done: the number of leading entries that succeeded (their references are
  // taken or dropped; the failing entry and every later one are untouched); result->atomics: the
  // refcount operations they cost. Bad input changes nothing: Errc::out_of_range (done 0) if any
  // entry is outside the pagemap, found before any reference moves. An empty batch is a no-op.
  // Same contract as the single operations otherwise (never block, no lock, any read section; a
  // put or unpin batch touches nothing of the pagemap after its last refcount operation).
  struct BatchResult {
    std::size_t done = 0;     // leading entries that succeeded
    std::size_t atomics = 0;  // refcount operations issued for them
  };
  Errc get_folios(std::span<const Pfn> pages, BatchResult* result = nullptr) noexcept;
  Errc put_folios(std::span<const Pfn> pages, BatchResult* result = nullptr) noexcept;
  Errc pin_folios(std::span<const Pfn> pages, BatchResult* result = nullptr) noexcept;
  Errc unpin_folios(std::span<const Pfn> pages, BatchResult* result = nullptr) noexcept;
  // The same over the consecutive pages [pages.start, pages.end()) (entry i is pages.start + i):
  // no list to read, no search for the runs of a large folio.
  Errc get_folios(PfnRange pages, BatchResult* result = nullptr) noexcept;
  Errc put_folios(PfnRange pages, BatchResult* result = nullptr) noexcept;
  Errc pin_folios(PfnRange pages, BatchResult* result = nullptr) noexcept;
  Errc unpin_folios(PfnRange pages, BatchResult* result = nullptr) noexcept;

  // ---- the allocation event (alloc_event strategy; usable by any strategy) ----
  // Takes one pagemap reference for [first, first + nr) that the caller keeps for as long as it
  // uses those pages (Dan Williams' proposal: discovering the pfn is the allocation). Fails with
  // Errc::dead once the pagemap is dying, Errc::out_of_range if the range is not inside one of its
  // ranges. The Allocation releases the reference when destroyed.
  class Allocation {
   public:
    Allocation() = default;
    Allocation(Allocation&& o) noexcept
        : pgmap_(std::exchange(o.pgmap_, nullptr)), first_(o.first_), nr_(o.nr_) {}
    Allocation& operator=(Allocation&& o) noexcept;
    ~Allocation() { reset(); }
    void reset() noexcept;
    explicit operator bool() const noexcept { return pgmap_ != nullptr; }
    Pfn first() const noexcept { return first_; }
    std::uint64_t count() const noexcept { return nr_; }
    DevPagemap* pagemap() const noexcept { return pgmap_; }

   private:
    friend class DevPagemap;
    Allocation(DevPagemap* p, Pfn first, std::uint64_t nr) : pgmap_(p), first_(first), nr_(nr) {}
    DevPagemap* pgmap_ = nullptr;
    Pfn first_ = 0;
    std::uint64_t nr_ = 0;
  };
  // Never blocks.
  Result<Allocation> request(Pfn first, std::uint64_t nr) noexcept;

  // ---- teardown ----
  // The first stage of memunmap on its own (the kernel's percpu_ref_kill of pgmap->ref): from its
  // return, get_dev_pagemap / tryget_live / request() fail and no idle folio can become busy;
  // state() is dying. A later memunmap() completes the teardown; if that call times out or
  // refuses, the pagemap stays killed (as it was before the call). Used by kill_dax when the DAX
  // device and the pagemap share liveness.
  // Blocks for a process-wide barrier (microseconds) and takes teardown_mu_ (lock 1 of
  // docs/lock-order.md); needs no grace period. Errc::already_dead if the pagemap is not live;
  // Errc::underflow (misuse reported; the pagemap stays live, its reference reset to the
  // holders the fold found) if the fold found more pagemap puts than gets. Always returns within
  // a bounded time.
  Errc kill() noexcept;
  // Tears the pagemap down (see Lifecycle). May block: for the holders (bounded by opts.timeout,
  // reporting progress), for a process-wide barrier, and for an RCU grace period. Must not be
  // called inside an RCU read section (Errc::invalid_argument, misuse reported, nothing changed),
  // nor while holding a reference on this pagemap or one of its folios, nor from page_free.
  // After it returns ok: no folio is referenced, no page_free of this pagemap is running, no
  // lookup can find it, and its folio operations return Errc::use_after_teardown. Errors:
  // Errc::already_dead, Errc::busy (refuse), Errc::timed_out, Errc::underflow (a stray put_ref;
  // nothing torn down); on each the pagemap is as before the call.
  Result<TeardownStats> memunmap(const MemunmapOptions& opts = {});
  // The one scan-and-wait for busy folios (sweep's teardown; devdax's unbind under alloc_event):
  // scans every folio once and waits until each reads idle (0; a folio whose last put is running
  // page_free counts as busy), bounded by `deadline`, calling progress.report every
  // progress.every with the number of busy folios. *waited (if given) receives the number of
  // folios found busy. policy refuse: Errc::busy at the first busy folio, without waiting.
  // Precondition: the pagemap is killed (state dying), so no idle folio becomes busy meanwhile
  // (Errc::invalid_argument if live; Errc::already_dead once torn down). May block; holds no lock;
  // must not be called inside a read section or while holding a folio reference of this
  // pagemap (it would wait for itself until the deadline). Errc::timed_out when the deadline
  // passes; nothing changes either way.
  Errc wait_folios_idle(Deadline deadline, const WaitProgress& progress, std::uint64_t* waited,
                        UnmapPolicy policy, unsigned scan_threads = 1);
  // Who holds what right now (a scan of every folio; cold path).
  HolderReport holders() const;
  // Late accesses detected on quarantined metadata (only `none` or misuse produce them).
  std::uint64_t late_accesses() const noexcept {
    return late_accesses_.load(std::memory_order_relaxed);
  }
  std::string describe() const;
  // Diagnostics (the invariant checker, pgmap::debug): the pagemap reference's count — exact in
  // atomic mode (after kill), a racy snapshot of the per-CPU sum while live; exact at quiescent
  // points either way. Read-only.
  std::int64_t ref_count_snapshot() const noexcept { return ref_.approx_count(); }
  // Diagnostics: how many pagemaps of the process are killed and not torn down (while it is
  // non-zero, the last put of a folio under sweep / alloc_event without FREEING also wakes).
  static std::uint32_t killed_pagemap_count() noexcept {
    return killed_pagemaps_.n.load(std::memory_order_seq_cst);
  }

 private:
  friend Result<std::shared_ptr<DevPagemap>> memremap(MemremapParams params);
  friend struct strategy_impl::Access;

  // Bits of life_.
  static constexpr std::uint8_t kKilled = 1;    // set at kill, cleared by revive
  static constexpr std::uint8_t kTornDown = 2;  // set before the metadata is retired; final

  struct Range {
    PfnRange pfns;
    std::shared_ptr<Backing> backing;
    std::uint64_t offset;
    std::unique_ptr<PageArray> array;
  };
  struct Loc {
    PageArray* array = nullptr;
    std::uint64_t head = 0;  // head entry of the folio containing the pfn
  };

  DevPagemap(const MemremapParams& params, std::vector<Range> ranges);
  // Hot: the first range inline, the others out of line.
  Loc locate(Pfn pfn) const noexcept {
    PageArray* a = first_array_;
    if (!a->contains(pfn)) [[unlikely]]
      return locate_slow(pfn);
    return {a, a->head_of(a->index_of(pfn))};
  }
  Loc locate_slow(Pfn pfn) const noexcept;
  // The batch operations (dev_pagemap_batch.cc): kOp is one of its BatchOp values, Pages a list
  // or a consecutive range of pfns.
  template <int kOp, typename Pages>
  Errc folio_batch(const Pages& pages, BatchResult* result) noexcept;
  bool torn_down() const noexcept {
    return (life_.load(std::memory_order_relaxed) & kTornDown) != 0;
  }
  [[gnu::cold, gnu::noinline]] Errc late_access() noexcept;
  [[gnu::cold, gnu::noinline]] Errc torn_down_access(Pfn pfn) noexcept;  // out_of_range or late
  void on_release() noexcept;
  bool released_since(std::uint64_t gen0) const noexcept;
  void revive(std::uint64_t gen0, bool kill_dropped_initial) noexcept;
  Errc scan_and_wait(Deadline deadline, const WaitProgress& progress, std::uint64_t* waited,
                     UnmapPolicy policy, unsigned scan_threads);
  DrainProgress drain_progress(Clock::time_point start) const;
  bool anything_held(bool initial_ref_held) const noexcept;
  Errc kill_locked(bool* refused) noexcept;
  Error holders_error(Errc code, const char* why) const;

  const PagemapType type_;
  const Strategy strategy_;
  const unsigned base_order_;
  const PagemapOps ops_;
  const void* const owner_;
  const bool quarantine_;
  std::string name_;
  std::vector<Range> ranges_;
  // Hot: read on every folio operation.
  PageArray* first_array_ = nullptr;  // ranges_[0].array, for the common single-range case
  // kKilled | kTornDown. Sweep's gets load it after their add; every folio operation checks
  // kTornDown before touching the metadata; folio frees wake waiters once kKilled is set.
  std::atomic<std::uint8_t> life_{0};
  // Whether a folio's free path has work that uses the pagemap whatever its life (ops.page_free,
  // or FS_DAX's split settling and wake-up). Under sweep / alloc_event such a pagemap's last puts
  // go through FREEING; without it they go straight to 0 (docs/strategies.md, "sweep without a free
  // path"). Beside life_, so that a hot put reads one line of the pagemap.
  const bool free_work_;
  PercpuRef ref_;
  // Cold.
  std::atomic<State> state_{State::live};
  std::atomic<std::uint64_t> release_gen_{0};  // +1 each time ref_ reaches zero
  std::uint64_t kill_gen_ = 0;                 // release_gen_ at the last kill (teardown_mu_)
  std::atomic<std::uint64_t> late_accesses_{0};
  std::mutex teardown_mu_;  // one memunmap at a time

  // Process-wide: how many pagemaps have kKilled set and are not torn down. A lean last put
  // (free_work_ false) loads it after its refcount reached 0, when its own pagemap may be gone,
  // to decide whether to wake a waiter; static storage, so that load is always valid. Alone on
  // its cache line: read by every such put, written twice per kill.
  static inline detail::KilledPagemaps killed_pagemaps_;
};

// Creates a pagemap. May block (an RCU grace period, to free the registry's previous snapshot);
// must not be called inside an RCU read section (Errc::invalid_argument, misuse reported). Errors:
// Errc::invalid_argument (no ranges, null backing, bad base order, PRIVATE without page_free, or
// inside a read section), Errc::unaligned (offset/size not multiples of the base folio size or
// of the backing's alignment), Errc::out_of_range (range past the end of the backing),
// Errc::overlap (range overlaps a live pagemap — the message names it and its pfns — or another
// range of the same request),
// Errc::no_memory. Nothing is published on error.
Result<std::shared_ptr<DevPagemap>> memremap(MemremapParams params);

// The live pagemap covering pfn with a reference held, or an empty PagemapRef. If `cached`
// already covers pfn it is returned as is (no new reference); otherwise its reference is dropped.
// Safe against concurrent memunmap (RCU). Never blocks; may be called inside a read section.
PagemapRef get_dev_pagemap(Pfn pfn, PagemapRef cached = {}) noexcept;

// Number of published pagemaps (diagnostics).
std::size_t pagemap_count() noexcept;

}  // namespace pgmap
