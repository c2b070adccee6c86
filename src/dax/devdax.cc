#include "pgmap/dax/devdax.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "pgmap/core/diagnostics.h"
#include "pgmap/core/error.h"
#include "pgmap/core/rcu.h"
#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/page_ref.h"

namespace pgmap::dax {
namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The page-table level that maps one folio of `order` (dev_dax_pagesize).
mm::Level level_of_order(unsigned order) {
  if (order == kPudOrder) return mm::Level::pud;
  if (order == kPmdOrder) return mm::Level::pmd;
  return mm::Level::pte;
}

// True if a folio with a pfn in [lo, hi) has a non-zero refcount. The pagemap must not be torn
// down (the caller holds an allocation of it, or knows it is not dead).
bool any_busy(const DevPagemap& pg, Pfn lo, Pfn hi) {
  for (std::size_t i = 0; i < pg.nr_ranges(); ++i) {
    const PfnRange r = pg.range(i);
    const Pfn from = std::max(lo, r.start);
    const Pfn to = std::min(hi, r.end());
    if (from >= to) continue;
    PageArray* a = pg.array_for(r.start);
    if (a == nullptr) continue;
    const std::uint64_t e0 = a->head_of(a->index_of(from));
    const std::uint64_t e1 = a->index_of(to - 1) + 1;
    if (a->find_busy(e0, e1) != e1) return true;
  }
  return false;
}

}  // namespace

// ---- alloc_event bookkeeping --------------------------------------------------------------------

struct VmaState;

// State shared by the DevDax and the VMA states (which may outlive the DevDax object's users but
// never the Core).
struct DevDax::Core {
  explicit Core(std::shared_ptr<DevPagemap> p) : pgmap(std::move(p)) {}

  // An allocation kept after its VMA went away: folios in [lo, hi) it vouched for were still
  // referenced then.
  struct Lingering {
    DevPagemap::Allocation alloc;
    Pfn lo = 0;
    Pfn hi = 0;
  };

  // Drops the lingering allocations whose folios are all idle now.
  void reap_locked() {
    if (lingering.empty()) return;
    sanitizer::full_fence();  // the puts that made them idle before our loads
    std::erase_if(lingering, [&](const Lingering& l) { return !any_busy(*pgmap, l.lo, l.hi); });
  }

  const std::shared_ptr<DevPagemap> pgmap;
  std::mutex mu;               // guards everything below and every VmaState::alloc
  std::set<VmaState*> states;  // live VMA states
  std::vector<Lingering> lingering;
};

// vma.owner_data of a devdax VMA under alloc_event: shared by the VMA's pieces and fork copies,
// destroyed with the last of them.
struct VmaState {
  explicit VmaState(std::shared_ptr<DevDax::Core> c) : core(std::move(c)) {
    std::lock_guard<std::mutex> lock(core->mu);
    core->states.insert(this);
  }
  ~VmaState() {
    std::lock_guard<std::mutex> lock(core->mu);
    core->states.erase(this);
    release_locked();
  }
  VmaState(const VmaState&) = delete;
  VmaState& operator=(const VmaState&) = delete;

  // Records that [pfn, pfn + n) is mapped through this VMA (before the entry exists).
  void note(Pfn pfn, std::uint64_t n) {
    Pfn cur = lo.load(std::memory_order_relaxed);
    while (pfn < cur && !lo.compare_exchange_weak(cur, pfn, std::memory_order_acq_rel)) {
    }
    cur = hi.load(std::memory_order_relaxed);
    while (pfn + n > cur && !hi.compare_exchange_weak(cur, pfn + n, std::memory_order_acq_rel)) {
    }
  }

  // The VMA's entries are gone (zapped by unbind, or the VMA was unmapped): give the allocation
  // up — to the device if a folio it mapped is still referenced (a pin outliving the mapping).
  void release_locked() {
    if (!alloc) return;
    has_alloc.store(false, std::memory_order_relaxed);
    const Pfn l = lo.load(std::memory_order_acquire);
    const Pfn h = hi.load(std::memory_order_acquire);
    // Pairs with GUP's seq_cst reference before it re-reads the (now zapped) entry: either we see
    // its reference, or it sees the entry gone and drops the reference.
    sanitizer::full_fence();
    if (l < h && any_busy(*core->pgmap, l, h)) {
      core->lingering.push_back(DevDax::Core::Lingering{std::move(alloc), l, h});
    } else {
      alloc.reset();
    }
  }

  const std::shared_ptr<DevDax::Core> core;
  std::atomic<bool> has_alloc{false};
  DevPagemap::Allocation alloc;  // guarded by core->mu
  std::atomic<Pfn> lo{std::numeric_limits<Pfn>::max()};
  std::atomic<Pfn> hi{0};
};

// ---- DevDax ------------------------------------------------------------------------------------

Result<std::shared_ptr<DevDax>> DevDax::create(std::shared_ptr<DevPagemap> pgmap,
                                               std::string name) {
  if (!pgmap) return Error(Errc::invalid_argument, "devdax: no pagemap");
  if (pgmap->type() != PagemapType::generic) {
    return Error(Errc::invalid_argument,
                 fmt::format("devdax: {} is {}, not a GENERIC (device-dax) pagemap", pgmap->name(),
                             pagemap_type_name(pgmap->type())));
  }
  const unsigned order = pgmap->base_order();
  if (order != 0 && order != kPmdOrder && order != kPudOrder) {
    return Error(
        Errc::invalid_argument,
        fmt::format("devdax: base order {} of {} is not 0, 9 or 18", order, pgmap->name()));
  }
  // dev_dax_probe builds the memmap with compound folios of the device alignment: every range must
  // be made of whole folios.
  const std::uint64_t pages = order_pages(order);
  for (std::size_t i = 0; i < pgmap->nr_ranges(); ++i) {
    const PfnRange r = pgmap->range(i);
    if (!is_aligned(r.start, pages) || !is_aligned(r.count, pages)) {
      return Error(Errc::invalid_argument,
                   fmt::format("devdax: range {} of {} is not aligned to {:#x} bytes", i,
                               pgmap->name(), order_bytes(order)));
    }
  }
  auto dax = DaxDevice::create(pgmap, name.empty() ? std::string{} : "dax:" + name);
  if (!dax) return dax.error();
  if (name.empty()) name = "devdax:" + pgmap->name();
  return std::shared_ptr<DevDax>(new DevDax(std::move(dax).value(), std::move(name)));
}

DevDax::DevDax(std::shared_ptr<DaxDevice> dax, std::string name)
    : dax_(std::move(dax)),
      core_(std::make_shared<Core>(dax_->pagemap_ptr())),
      align_(order_bytes(dax_->pagemap().base_order())),
      level_(level_of_order(dax_->pagemap().base_order())),
      name_(std::move(name)) {}

DevDax::~DevDax() {
  // The device-dax driver's remove: the pagemap does not outlive its device.
  if (!unbound()) (void)unbind();
}

bool DevDax::unbound() const {
  std::lock_guard<std::mutex> lock(unbind_mu_);
  return unbound_;
}

std::size_t DevDax::vma_allocations() const {
  std::lock_guard<std::mutex> lock(core_->mu);
  return static_cast<std::size_t>(std::count_if(core_->states.begin(), core_->states.end(),
                                                [](const VmaState* s) { return bool(s->alloc); }));
}

std::size_t DevDax::lingering_allocations() const {
  std::lock_guard<std::mutex> lock(core_->mu);
  return core_->lingering.size();
}

// ---- mapping rules (drivers/dax/device.c) -------------------------------------------------------

Errc DevDax::on_mmap(mm::Vma& vma) {
  // dax_mmap: check_vma under the read lock; the fault re-checks liveness.
  DaxDevice::ReadLock lock;
  if (!dax_->alive()) return Errc::dead;
  if (!vma.shared()) return Errc::invalid_argument;  // private mappings are refused
  if (!is_aligned(vma.start, align_) || !is_aligned(vma.end, align_)) {
    return Errc::invalid_argument;  // unaligned vma
  }
  if ((vma.flags & mm::kVmDax) == 0) return Errc::invalid_argument;  // !vma_is_dax
  // Not in check_vma: a file offset off the alignment would make every fault SIGBUS (no folio of
  // the alignment starts there); refuse it up front.
  if (!is_aligned(vma.pgoff << kPageShift, align_)) return Errc::unaligned;
  if (dax_->shares_liveness()) {
    // The VMA is not yet visible to anyone: install its allocation holder.
    vma.owner_data = std::make_shared<VmaState>(core_);
  }
  return Errc::ok;
}

mm::FaultResult DevDax::fault(const mm::Vma& vma, const mm::FaultRequest& req) {
  // dev_dax_huge_fault: everything under the read lock, so kill_dax waits for us.
  DaxDevice::ReadLock lock;
  // check_vma, again at fault time.
  if (!dax_->alive()) return mm::FaultResult::sigbus(name_ + " is disabled");
  if (!vma.shared()) return mm::FaultResult::sigbus(name_ + ": private mapping");
  if (!is_aligned(vma.start, align_) || !is_aligned(vma.end, align_)) {
    return mm::FaultResult::sigbus(fmt::format("{}: VMA [{:#x}, {:#x}) not aligned to {:#x}", name_,
                                               vma.start, vma.end, align_));
  }
  // __dev_dax_{pte,pmd,pud}_fault: the fault size must be the alignment.
  const std::uint64_t bytes = mm::level_bytes(req.level);
  if (bytes < align_) {
    return mm::FaultResult::sigbus(
        fmt::format("{}: alignment {:#x} > fault size {:#x}", name_, align_, bytes));
  }
  if (bytes > align_) return mm::FaultResult::fallback();
  if (req.addr < vma.start || req.addr + bytes > vma.end) {
    return mm::FaultResult::sigbus(
        fmt::format("{}: fault at {:#x} outside the VMA", name_, req.addr));
  }
  // dax_pgoff_to_phys: the whole fault must lie in one range of the device.
  const std::uint64_t pages = bytes >> kPageShift;
  auto acc = dax_->direct_access(req.pgoff, pages);
  if (!acc) return mm::FaultResult::sigbus(acc.error().to_string());
  if (acc->nr < pages || !is_aligned(acc->pfn, pages)) {
    return mm::FaultResult::sigbus(fmt::format(
        "{}: page offset {} does not start a mappable {:#x} range", name_, req.pgoff, bytes));
  }
  DevPagemap& pg = pagemap();
  // Separate-flag strategies: a pagemap torn down under a live device (only by misuse, unbind
  // kills the device first) must not have its metadata touched.
  if (pg.state() != DevPagemap::State::live) {
    return mm::FaultResult::sigbus(name_ + ": its pagemap is being torn down");
  }
  if (dax_->shares_liveness()) {
    auto* state = static_cast<VmaState*>(vma.owner_data.get());
    if (state == nullptr) return mm::FaultResult::sigbus(name_ + ": VMA not set up by mmap");
    state->note(acc->pfn, pages);
    if (!state->has_alloc.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> guard(core_->mu);
      if (!state->alloc) {
        state->alloc = std::move(acc->allocation);
        state->has_alloc.store(true, std::memory_order_release);
      }
    }
  }
  PageArray* a = pg.array_for(acc->pfn);
  const std::uint64_t head = a->head_of(a->index_of(acc->pfn));
  // A memory failure recorded on the folio: the access would consume poison (BUS_MCEERR_AR).
  if ((a->flags(head).load(std::memory_order_acquire) & kPagePoisoned) != 0) {
    return mm::FaultResult::memory_failure(
        fmt::format("{}: pfn {:#x} is poisoned (memory failure)", name_, acc->pfn));
  }
  // dax_set_mapping: record the owner and file index on the folio head, once.
  const void* expected = nullptr;
  if (a->mapping(head).compare_exchange_strong(expected, static_cast<const mm::MappingOwner*>(this),
                                               std::memory_order_acq_rel)) {
    a->index_or_share(head).store(req.pgoff, std::memory_order_release);
  }
  // The reference the entry will hold, taken inside the read section: kill_dax waits for this
  // section, so either the reference exists before unbind's folio wait starts (which then waits
  // for it, and its zap removes the entry) or the fault saw the device dead.
  auto ref = PageRef::get(pg, acc->pfn);
  if (!ref) {
    return mm::FaultResult::sigbus(fmt::format("{}: cannot reference pfn {:#x}: {}", name_,
                                               acc->pfn, ref.error().to_string()));
  }
  return mm::FaultResult::insert(std::move(ref).value());
}

Errc DevDax::may_split(const mm::Vma& vma, std::uint64_t addr) {
  (void)vma;
  // dev_dax_may_split.
  return is_aligned(addr, align_) ? Errc::ok : Errc::invalid_argument;
}

void DevDax::on_close(const mm::Vma& vma) {
  (void)vma;
  // The VMA's own allocation goes with its last copy (VmaState); here, give back the lingering
  // ones whose pins are gone by now.
  std::lock_guard<std::mutex> lock(core_->mu);
  core_->reap_locked();
}

// ---- unbind (kill_dev_dax + the devm release of the pagemap) -----------------------------------

Result<TeardownStats> DevDax::unbind(const MemunmapOptions& opts) {
  // kill_dax and memunmap wait for a grace period, which a read section would never see end:
  // refuse before anything changes (as DevPagemap::memunmap does).
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DevDax::unbind inside an RCU read section");
    return Error(Errc::invalid_argument,
                 fmt::format("unbind of {} inside an RCU read section (it waits for a grace "
                             "period)",
                             name_));
  }
  std::lock_guard<std::mutex> lock(unbind_mu_);
  if (unbound_) return Error(Errc::already_dead, name_ + " was already unbound");
  // The pagemap was memunmapped directly (behind the device's back): there is nothing left for
  // unbind to tear down, and an error changes nothing — the device is not killed, no mapping is
  // zapped and the DevDax does not become unbound.
  if (pagemap().state() == DevPagemap::State::dead) {
    return Error(
        Errc::already_dead,
        fmt::format("unbind of {}: its pagemap {} was already unmapped", name_, pagemap().name()));
  }
  auto r = unbind_locked(opts);
  if (r || r.code() == Errc::already_dead) unbound_ = true;
  return r;
}

Result<TeardownStats> DevDax::unbind_locked(const MemunmapOptions& opts) {
  const auto t0 = Clock::now();
  const Deadline deadline = deadline_after(opts.timeout);
  DevPagemap& pg = pagemap();

  // 1. kill_dax: from here every fault and mmap fails; no fault that saw the device alive is
  // still running. Errc::already_dead: an earlier unbind got this far (nothing to redo);
  // Errc::invalid_argument (inside a read section) cannot happen: unbind refused that up front.
  (void)dax_->kill();
  // A fault that left its read section before the kill, holding its folio reference, may be
  // about to install its entry: the zap below (and the fault's sequence check) removes it.
  PGMAP_YIELD_POINT("unbind.after_kill_dax");
  // 2. unmap_mapping_range(i_mapping, 0, 0, 1): zap every user mapping. Faults after the zap find
  // the device dead (SIGBUS).
  (void)unmap_mapping_range(0, 0);
  // 3. The first stage of memunmap_pages on its own, so that a teardown that cannot finish below
  // leaves the pagemap killed (no lookup succeeds, no idle folio becomes busy) rather than live.
  // Under alloc_event kill_dax did it already.
  if (pg.state() == DevPagemap::State::live) (void)pg.kill();

  TeardownStats drain;
  if (dax_->shares_liveness()) {
    // 4. alloc_event: the VMAs' allocations. Each vouches for its VMA's entries (all zapped now)
    // and for the pins taken through them; it is released now, or kept until the pinned folios
    // are idle.
    {
      std::lock_guard<std::mutex> guard(core_->mu);
      for (VmaState* s : core_->states)
        s->release_locked();
    }
    auto t1 = Clock::now();
    if (pg.state() != DevPagemap::State::dead) {
      // The one scan-and-wait over the pagemap's folios (the pagemap is killed by now): woken by
      // each folio going idle, bounded by the deadline, reporting progress at the caller's pace.
      WaitProgress wp;
      wp.report = opts.progress;
      wp.every = opts.progress_every;
      wp.start = t0;
      std::uint64_t busy_folios = 0;
      Errc waited = pg.wait_folios_idle(deadline, wp, &busy_folios, opts.policy);
      // already_dead: the pagemap was memunmapped concurrently; the memunmap below reports it.
      if (waited == Errc::already_dead) waited = Errc::ok;
      if (waited == Errc::ok) drain.waited_folios = busy_folios;
      if (waited != Errc::ok) {
        // The allocations stay (lingering) for a later unbind; the device stays dead.
        HolderReport rep = pg.holders();
        const char* why = waited == Errc::busy        ? "refused: pages still referenced"
                          : waited == Errc::timed_out ? "timed out waiting for referenced pages"
                                                      : "could not wait for its pages";
        std::string msg = fmt::format("unbind of {} {}: {}", name_, why, rep.to_string());
        return Error(waited, std::move(msg), std::make_shared<const HolderReport>(std::move(rep)));
      }
    }
    drain.sweep_seconds = seconds_since(t1);
    std::lock_guard<std::mutex> guard(core_->mu);
    core_->lingering.clear();  // every folio is idle: nothing left to vouch for
  }

  // 5. memunmap_pages with the caller's policy, within what is left of the timeout.
  PGMAP_YIELD_POINT("unbind.before_memunmap");
  MemunmapOptions m = opts;
  if (deadline) {
    m.timeout =
        std::max<std::chrono::nanoseconds>(std::chrono::nanoseconds(0), *deadline - Clock::now());
  }
  auto r = pg.memunmap(m);
  if (!r) return r;
  TeardownStats stats = *r;
  stats.sweep_seconds += drain.sweep_seconds;
  stats.waited_folios += drain.waited_folios;
  stats.total_seconds = seconds_since(t0);
  return stats;
}

}  // namespace pgmap::dax
