// DaxDevice: the logical DAX device over a pagemap's ranges (the kernel's struct dax_device,
// drivers/dax/super.c). One per pagemap here; device page offsets run through the pagemap's
// ranges in order (as a multi-range dev_dax's ranges do).
//
// ---- Liveness (I10) ----------------------------------------------------------------------------
//
// Every DAX operation (direct access, fault, holder notification) runs inside a read section
// (`ReadLock`, the kernel's dax_read_lock(): an rcu::ReadGuard here) and checks alive() first.
// kill() (kill_dax) clears ALIVE and waits for a grace period: when it returns, no operation that
// saw the device alive is still running and every later one sees it dead. The read section does
// not keep the DaxDevice object alive; the caller's shared_ptr does.
//
// Where ALIVE lives depends on the pagemap's strategy:
//   * per_lookup, transition, sweep, none: a flag of the DaxDevice, separate from the pagemap's
//     percpu ref, as in Linux (two objects, two kill paths, §2.3);
//   * alloc_event: the DaxDevice and the pagemap share one liveness object (Dan Williams' proposal,
//     §0 row 7): alive() is "the pagemap is live", kill() kills the pagemap (DevPagemap::kill),
//     and direct_access() is the allocation event: it also returns a DevPagemap::Allocation
//     (DevPagemap::request) that the caller keeps for as long as it uses those pages outside the
//     read section. kaddr/pfn are valid only inside the read section otherwise (§3.3).
//
// ---- Holder ------------------------------------------------------------------------------------
//
// At most one holder (a filesystem or a mapped device stacked on the DAX device) registers with
// set_holder (cmpxchg: Errc::busy if taken, fs_dax_get_by_bdev). notify_failure() forwards a
// memory failure on [offset, offset + len) bytes of the device to it (dax_holder_notify_failure);
// kill() first notifies it with kMfMemPreRemove over the whole device (0, UINT64_MAX) so it can
// unmap and stop its users (§3.14), then clears the registration.
//
// Thread safety: every member is thread-safe. kill(), clear_holder() and the holder callbacks'
// registration changes must not run inside a read section (they wait for a grace period);
// a holder's notify_failure must not call kill() or clear_holder().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "pgmap/core/error.h"
#include "pgmap/core/rcu.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/pfn.h"

namespace pgmap::dax {

// Memory-failure flags (the subset of include/linux/mm.h's enum mf_flags that DAX uses; values as
// in Linux).
inline constexpr int kMfActionRequired = 1 << 1;  // MF_ACTION_REQUIRED
// MF_MEM_PRE_REMOVE (v6.7): the whole device is about to be removed; the holder must stop every
// user and must not treat it as media poison.
inline constexpr int kMfMemPreRemove = 1 << 7;

// "The whole device" for notify_failure (the kernel passes 0, U64_MAX).
inline constexpr std::uint64_t kWholeDevice = ~std::uint64_t{0};

class DaxDevice;

// The holder's callbacks (struct dax_holder_operations).
struct HolderOps {
  // A failure on [offset, offset + len) bytes of the device (len kWholeDevice: to the end).
  // Runs inside the device's read section on the caller's thread; must not block on the device's
  // teardown (kill waits for it).
  std::function<Errc(DaxDevice& dax, void* holder, std::uint64_t offset, std::uint64_t len,
                     int mf_flags)>
      notify_failure;
};

// What direct_access hands out (dax_direct_access's kaddr/pfn/return value).
struct DaxAccess {
  std::byte* kaddr = nullptr;  // bytes of pfn
  Pfn pfn = 0;                 // pfn of the requested page offset
  std::uint64_t nr = 0;        // pages usable from pfn: min(available in its range, asked)
  // alloc_event only: the pagemap reference covering [pfn, pfn + nr) for as long as the caller
  // uses the pages beyond the read section (empty under the other strategies).
  DevPagemap::Allocation allocation;
};

class DaxDevice {
 public:
  // The read section (dax_read_lock / dax_read_unlock). Nests; cheap (a liburcu read lock).
  class ReadLock {
   public:
    ReadLock() = default;
    ReadLock(const ReadLock&) = delete;
    ReadLock& operator=(const ReadLock&) = delete;

   private:
    rcu::ReadGuard guard_;
  };

  // A live device over `pgmap` (run_dax). Errc::invalid_argument (null pagemap), Errc::dead (the
  // pagemap is not live).
  static Result<std::shared_ptr<DaxDevice>> create(std::shared_ptr<DevPagemap> pgmap,
                                                   std::string name = {});
  ~DaxDevice();
  DaxDevice(const DaxDevice&) = delete;
  DaxDevice& operator=(const DaxDevice&) = delete;

  const std::string& name() const noexcept { return name_; }
  DevPagemap& pagemap() const noexcept { return *pgmap_; }
  const std::shared_ptr<DevPagemap>& pagemap_ptr() const noexcept { return pgmap_; }
  // True under alloc_event: ALIVE is the pagemap's liveness and direct_access allocates.
  bool shares_liveness() const noexcept { return shared_liveness_; }
  std::uint64_t nr_pages() const noexcept { return nr_pages_; }
  std::uint64_t size() const noexcept { return nr_pages_ << kPageShift; }

  // dax_alive(). Must be called inside a ReadLock (misuse reported otherwise: aborts in
  // PGMAP_DEBUG_INVARIANTS builds; the answer is still returned).
  bool alive() const noexcept;
  // True once kill() ran (no read section needed).
  bool killed() const noexcept { return killed_.load(std::memory_order_acquire); }

  // dax_direct_access(): translate device page offset `pgoff` to its pfn and bytes, for up to
  // `nr_pages` pages. Must be called inside a ReadLock (misuse reported otherwise).
  // Errors: Errc::dead (-ENXIO: not alive; under alloc_event also when the allocation fails
  // because the pagemap is dying), Errc::invalid_argument (nr_pages 0), Errc::out_of_range
  // (-ERANGE: pgoff past the end of the device). Changes nothing on error.
  Result<DaxAccess> direct_access(std::uint64_t pgoff, std::uint64_t nr_pages) const noexcept;

  // kill_dax(): notify the holder (kMfMemPreRemove, whole device), clear ALIVE (alloc_event:
  // DevPagemap::kill), wait for a grace period, clear the holder. Errc::already_dead if killed
  // before (nothing happens); Errc::invalid_argument (misuse) inside a read section.
  Errc kill() noexcept;

  // ---- holder ----
  // fs_dax_get_by_bdev's registration: Errc::invalid_argument (null holder or ops), Errc::dead
  // (not alive), Errc::busy (another holder is registered; cmpxchg, nothing changed).
  Errc set_holder(void* holder, const HolderOps* ops) noexcept;
  // fs_put_dax's release: Errc::not_found if `holder` is not the registered holder. Waits for a
  // grace period, so no notify_failure to it is running when it returns (Errc::invalid_argument,
  // misuse, inside a read section).
  Errc clear_holder(void* holder) noexcept;
  void* holder() const noexcept { return holder_.load(std::memory_order_acquire); }
  // dax_holder_notify_failure(): Errc::dead (-ENXIO) if not alive, Errc::not_supported
  // (-EOPNOTSUPP) with no holder, else the holder's answer. Takes its own read section.
  Errc notify_failure(std::uint64_t offset, std::uint64_t len, int mf_flags) noexcept;

 private:
  struct Range {
    PfnRange pfns;
    std::uint64_t first_pgoff;  // device page offset of pfns.start
  };
  DaxDevice(std::shared_ptr<DevPagemap> pgmap, std::string name);
  bool alive_locked() const noexcept;  // alive() without the read-section check
  Errc notify_locked(std::uint64_t offset, std::uint64_t len, int mf_flags) noexcept;

  const std::shared_ptr<DevPagemap> pgmap_;
  const bool shared_liveness_;
  std::string name_;
  std::vector<Range> ranges_;
  std::uint64_t nr_pages_ = 0;
  std::atomic<bool> alive_{true};  // DAXDEV_ALIVE (separate-flag strategies)
  std::atomic<bool> killed_{false};
  std::atomic<void*> holder_{nullptr};
  std::atomic<const HolderOps*> holder_ops_{nullptr};
  std::mutex kill_mu_;    // one kill at a time
  std::mutex holder_mu_;  // serializes holder registration changes (not notifications)
};

}  // namespace pgmap::dax
