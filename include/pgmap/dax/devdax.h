// DevDax: device-dax, the character device that maps a DAX device's memory straight into user
// address spaces (drivers/dax/device.c, drivers/dax/bus.c). A MappingOwner (mm/mapping.h) over a
// DevPagemap of type GENERIC whose folios have the device alignment: 4 KiB, 2 MiB or 1 GiB (base
// order 0, 9 or 18 — dev_dax_probe sets vmemmap_shift from the alignment).
//
// Rules (each mirrors a kernel function; docs/devdax.md maps them to the tests):
//   on_mmap    (dax_mmap -> check_vma) Errc::dead if the device is dead; Errc::invalid_argument
//              for a private mapping (only MAP_SHARED), a VMA whose start or end is not aligned
//              to the device alignment, or a VMA without kVmDax. Our addition: Errc::unaligned
//              for a file offset not aligned to the alignment (the kernel does not check it).
//   fault      (dev_dax_huge_fault) inside DaxDevice::ReadLock: SIGBUS if dead or the VMA fails
//              check_vma; SIGBUS if the fault level is smaller than the alignment, FALLBACK if
//              larger; SIGBUS if the aligned range leaves the VMA or the device
//              (dax_pgoff_to_phys); SIGBUS BUS_MCEERR_AR for a poisoned folio; else a folio
//              reference (PageRef) on the pfn from DaxDevice::direct_access, taken inside the read
//              lock (mm/mapping.h, fault contract), with the folio's mapping/index recorded on its
//              head (dax_set_mapping).
//   max_level  the alignment's level (dev_dax_pagesize).
//   may_split  (dev_dax_may_split) Errc::invalid_argument for a cut not aligned to the alignment:
//              munmap/mprotect/mremap of a piece fail and change nothing.
// There is no read()/write(): access goes through mappings only.
//
// alloc_event. The pagemap's folio references are bare; whoever uses the pages holds an
// Allocation. A VMA takes one at its first fault (DaxDevice::direct_access) and keeps it in
// vma.owner_data, shared with its pieces (split, mremap) and fork copies; it covers the VMA's
// entries and the GUP pins taken through them. It is released when the last copy of the VMA goes
// away (munmap, address-space exit) or by unbind's zap — unless a folio the VMA mapped is still
// referenced then (a pin that outlives the mapping): the allocation then lingers with the device
// until those folios are idle (checked at every VMA close and by unbind, which waits for them).
//
// Unbind (the device-dax driver's remove: dev_dax_kill -> kill_dev_dax, then the devm release of
// the pagemap): kill the DaxDevice (kill_dax), zap every user mapping (unmap_mapping_range(0, 0)),
// [alloc_event: wait for the folios the released allocations vouched for], then memunmap the
// pagemap with the caller's options. Afterwards every access through an old mapping is SIGBUS and
// every new mmap fails. If the memunmap refuses (Errc::busy) or times out (Errc::timed_out), the
// Error carries the HolderReport (who pins what); the device stays killed (faults SIGBUS) and the
// pagemap stays mapped, killed; a later unbind completes the teardown once the pins are gone.
//
// DevDax owns the pagemap's teardown from create() on: destroying the DevDax unbinds it (waiting
// for every holder, like ~DevPagemap). Thread-safe throughout. Lock order: AddressSpace mmap_lock
// -> DevDax internal lock (Core::mu) -> wait-table buckets; the i_mmap lock and Core::mu are never
// held together. unbind must not be called while holding a folio reference or an allocation of
// this device (it would wait for itself; a timeout reports it).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "pgmap/core/error.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::dax {

class DevDax final : public mm::MappingOwner {
 public:
  // Errc::invalid_argument (null pagemap, type not GENERIC, base order not 0/9/18, a range not
  // aligned to the folio size), Errc::dead (pagemap not live).
  static Result<std::shared_ptr<DevDax>> create(std::shared_ptr<DevPagemap> pgmap,
                                                std::string name = {});
  // Unbinds (wait policy, no timeout) if unbind() has not completed.
  ~DevDax() override;
  DevDax(const DevDax&) = delete;
  DevDax& operator=(const DevDax&) = delete;

  // ---- MappingOwner ----
  std::string name() const override { return name_; }
  std::uint64_t size() const override { return dax_->size(); }
  mm::Level max_level() const override { return level_; }
  std::uint32_t vma_flags() const override { return mm::kVmDax; }
  Errc on_mmap(mm::Vma& vma) override;
  mm::FaultResult fault(const mm::Vma& vma, const mm::FaultRequest& req) override;
  Errc may_split(const mm::Vma& vma, std::uint64_t addr) override;
  void on_close(const mm::Vma& vma) override;

  // ---- device ----
  std::uint64_t align() const noexcept { return align_; }
  DaxDevice& dax_device() const noexcept { return *dax_; }
  const std::shared_ptr<DaxDevice>& dax_device_ptr() const noexcept { return dax_; }
  DevPagemap& pagemap() const noexcept { return dax_->pagemap(); }

  // Disable the device (see above). Errc::already_dead once an unbind has completed.
  // Errc::invalid_argument inside an RCU read section (it waits for grace periods; misuse is
  // reported) and Errc::already_dead when the pagemap was memunmapped directly rather than through
  // unbind: both refuse up front and change nothing (the device stays alive, mappings stay, the
  // DevDax does not become unbound; its faults SIGBUS since the pagemap is gone).
  Result<TeardownStats> unbind(const MemunmapOptions& opts = {});
  bool unbound() const;

  // alloc_event bookkeeping (diagnostics and tests): allocations held by VMAs, and allocations
  // kept after their VMA went away because folios it mapped are still referenced.
  std::size_t vma_allocations() const;
  std::size_t lingering_allocations() const;

  struct Core;  // shared with the per-VMA state (src/dax/devdax.cc)

 private:
  DevDax(std::shared_ptr<DaxDevice> dax, std::string name);
  Result<TeardownStats> unbind_locked(const MemunmapOptions& opts);

  const std::shared_ptr<DaxDevice> dax_;
  const std::shared_ptr<Core> core_;
  const std::uint64_t align_;
  const mm::Level level_;
  const std::string name_;
  mutable std::mutex unbind_mu_;  // one unbind at a time
  bool unbound_ = false;          // guarded by unbind_mu_
};

}  // namespace pgmap::dax
