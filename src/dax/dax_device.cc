#include "pgmap/dax/dax_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

namespace pgmap::dax {

Result<std::shared_ptr<DaxDevice>> DaxDevice::create(std::shared_ptr<DevPagemap> pgmap,
                                                     std::string name) {
  if (!pgmap) return Error(Errc::invalid_argument, "DaxDevice: no pagemap");
  if (pgmap->state() != DevPagemap::State::live) {
    return Error(Errc::dead, fmt::format("DaxDevice: {} is not live", pgmap->name()));
  }
  return std::shared_ptr<DaxDevice>(new DaxDevice(std::move(pgmap), std::move(name)));
}

DaxDevice::DaxDevice(std::shared_ptr<DevPagemap> pgmap, std::string name)
    : pgmap_(std::move(pgmap)),
      shared_liveness_(pgmap_->strategy() == Strategy::alloc_event),
      name_(std::move(name)) {
  if (name_.empty()) name_ = "dax:" + pgmap_->name();
  for (std::size_t i = 0; i < pgmap_->nr_ranges(); ++i) {
    const PfnRange r = pgmap_->range(i);
    ranges_.push_back(Range{r, nr_pages_});
    nr_pages_ += r.count;
  }
}

DaxDevice::~DaxDevice() = default;

bool DaxDevice::alive_locked() const noexcept {
  if (shared_liveness_) return pgmap_->state() == DevPagemap::State::live;
  return alive_.load(std::memory_order_acquire);
}

bool DaxDevice::alive() const noexcept {
  // dax_alive() asserts the SRCU read lock (lockdep): the answer means nothing outside it.
  if (!rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DaxDevice::alive() outside a ReadLock");
  }
  return alive_locked();
}

Result<DaxAccess> DaxDevice::direct_access(std::uint64_t pgoff,
                                           std::uint64_t nr_pages) const noexcept {
  if (!alive()) return Error(Errc::dead, name_ + ": direct_access on a dead device");
  if (nr_pages == 0) return Error(Errc::invalid_argument, name_ + ": direct_access of 0 pages");
  // The range holding pgoff (dax_pgoff_to_phys).
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), pgoff,
                             [](std::uint64_t p, const Range& r) { return p < r.first_pgoff; });
  if (pgoff >= nr_pages_ || it == ranges_.begin()) {
    return Error(Errc::out_of_range, fmt::format("{}: page offset {} past the end ({} pages)",
                                                 name_, pgoff, nr_pages_));
  }
  const Range& r = *std::prev(it);
  DaxAccess a;
  a.pfn = r.pfns.start + (pgoff - r.first_pgoff);
  a.nr = std::min(nr_pages, r.pfns.end() - a.pfn);
  a.kaddr = pgmap_->address_of(a.pfn);
  if (shared_liveness_) {
    // The allocation event: fails once the pagemap is dying (kill raced with us after alive()).
    auto alloc = pgmap_->request(a.pfn, a.nr);
    if (!alloc) return alloc.error();
    a.allocation = std::move(alloc).value();
  }
  return a;
}

Errc DaxDevice::notify_locked(std::uint64_t offset, std::uint64_t len, int mf_flags) noexcept {
  if (!alive_locked()) return Errc::dead;
  const HolderOps* ops = holder_ops_.load(std::memory_order_acquire);
  if (ops == nullptr || !ops->notify_failure) return Errc::not_supported;
  return ops->notify_failure(*this, holder_.load(std::memory_order_acquire), offset, len, mf_flags);
}

Errc DaxDevice::notify_failure(std::uint64_t offset, std::uint64_t len, int mf_flags) noexcept {
  ReadLock lock;
  return notify_locked(offset, len, mf_flags);
}

Errc DaxDevice::kill() noexcept {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DaxDevice::kill() inside a ReadLock");
    return Errc::invalid_argument;
  }
  std::lock_guard<std::mutex> lock(kill_mu_);
  if (killed_.load(std::memory_order_acquire)) return Errc::already_dead;
  // 1. Tell the holder the whole device is going away, while it is still alive (the holder may
  // need direct access to shut its users down).
  if (holder_.load(std::memory_order_acquire) != nullptr) {
    ReadLock read;
    (void)notify_locked(0, kWholeDevice, kMfMemPreRemove);
  }
  // 2. Clear ALIVE. Under alloc_event the pagemap is the liveness object: its kill makes every
  // later request() (so every later direct_access) fail and no idle folio become busy. If the
  // pagemap was already killed by its owner, it is dead already, which is all we need.
  if (shared_liveness_) {
    if (pgmap_->state() == DevPagemap::State::live) (void)pgmap_->kill();
  } else {
    alive_.store(false, std::memory_order_seq_cst);
  }
  killed_.store(true, std::memory_order_release);
  // 3. Every read section that saw the device alive ends before we return.
  (void)rcu::synchronize();
  // 4. No notification can reach the holder any more (one would find the device dead anyway).
  std::lock_guard<std::mutex> registration(holder_mu_);
  holder_ops_.store(nullptr, std::memory_order_release);
  holder_.store(nullptr, std::memory_order_release);
  return Errc::ok;
}

Errc DaxDevice::set_holder(void* holder, const HolderOps* ops) noexcept {
  if (holder == nullptr || ops == nullptr) return Errc::invalid_argument;
  std::lock_guard<std::mutex> registration(holder_mu_);
  ReadLock lock;
  if (!alive_locked()) return Errc::dead;
  // One holder at most (the kernel's cmpxchg on holder_data).
  void* expected = nullptr;
  if (!holder_.compare_exchange_strong(expected, holder, std::memory_order_acq_rel)) {
    return Errc::busy;
  }
  holder_ops_.store(ops, std::memory_order_release);
  return Errc::ok;
}

Errc DaxDevice::clear_holder(void* holder) noexcept {
  if (rcu::in_read_section()) {
    report_misuse(Errc::invalid_argument, "DaxDevice::clear_holder() inside a ReadLock");
    return Errc::invalid_argument;
  }
  {
    std::lock_guard<std::mutex> registration(holder_mu_);
    if (holder == nullptr || holder_.load(std::memory_order_acquire) != holder) {
      return Errc::not_found;
    }
    // Ops first: a notification that still sees the holder but no ops answers not_supported.
    holder_ops_.store(nullptr, std::memory_order_release);
    holder_.store(nullptr, std::memory_order_release);
  }
  (void)rcu::synchronize();  // notifications that loaded the old ops have returned
  return Errc::ok;
}

}  // namespace pgmap::dax
