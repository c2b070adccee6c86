// Test helper: a MappingOwner over a range of one DevPagemap. Owner page offset N maps pfn
// base + N; faults are offered at up to a configurable level (a level is used only where the pfn
// is aligned to it); the owner can be killed (every later fault gets SIGBUS, as a disabled devdax
// device), given holes (pages whose faults get SIGBUS), told to refuse mmap or VMA splits; it
// records its on_mmap / may_split / on_close calls and its faults per level.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "memory/testing/pagemap_fixture.h"
#include "pgmap/core/error.h"
#include "pgmap/memory/dev_pagemap.h"
#include "pgmap/memory/page_array.h"
#include "pgmap/memory/page_ref.h"
#include "pgmap/memory/pfn.h"
#include "pgmap/mm/mapping.h"

namespace pgmap::mm::testutil {

class FakeOwner : public MappingOwner {
 public:
  struct Options {
    Level max_level = Level::pte;
    // Faults of a smaller level get SIGBUS, as a device-dax device refuses a fault smaller than its
    // alignment (pte: none refused).
    Level min_level = Level::pte;
    std::uint32_t vma_flags = kVmDax;
    std::string name = "fake-owner";
  };

  // Maps `npages` pages of `pgmap` starting at pfn `base`.
  FakeOwner(std::shared_ptr<DevPagemap> pgmap, Pfn base, std::uint64_t npages, Options opts)
      : pgmap_(std::move(pgmap)), base_(base), npages_(npages), opts_(std::move(opts)) {}
  FakeOwner(std::shared_ptr<DevPagemap> pgmap, Pfn base, std::uint64_t npages)
      : FakeOwner(std::move(pgmap), base, npages, Options{}) {}

  // ---- MappingOwner ----
  std::string name() const override { return opts_.name; }
  std::uint64_t size() const override { return npages_ << kPageShift; }
  Level max_level() const override {
    if (before_levels_) before_levels_();
    return opts_.max_level;
  }
  std::uint32_t vma_flags() const override { return opts_.vma_flags; }

  Errc on_mmap(Vma& vma) override {
    mmap_calls_.fetch_add(1, std::memory_order_relaxed);
    (void)vma;
    return refuse_mmap_.load(std::memory_order_relaxed);
  }

  FaultResult fault(const Vma& vma, const FaultRequest& req) override {
    (void)vma;
    faults_[static_cast<std::size_t>(req.level)].fetch_add(1, std::memory_order_relaxed);
    if (killed_.load(std::memory_order_acquire)) return FaultResult::sigbus(opts_.name + " killed");
    if (req.level < opts_.min_level) {
      return FaultResult::sigbus(opts_.name + ": fault smaller than its minimum level");
    }
    const std::uint64_t pages = order_pages(level_order(req.level));
    if (req.pgoff >= npages_ || pages > npages_ - req.pgoff) {
      if (req.level != Level::pte) return FaultResult::fallback();
      return FaultResult::sigbus("page offset past the end of " + opts_.name);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto hole = holes_.lower_bound(req.pgoff);
      if (hole != holes_.end() && *hole < req.pgoff + pages) {
        if (req.level != Level::pte) return FaultResult::fallback();
        return FaultResult::sigbus("hole in " + opts_.name);
      }
    }
    const Pfn pfn = base_ + req.pgoff;
    if (!is_aligned(pfn, pages)) return FaultResult::fallback();
    if (pgmap_->state() != DevPagemap::State::live) {
      return FaultResult::sigbus("pagemap of " + opts_.name + " is not live");
    }
    // The owner's "read section" is this call: the reference is taken before it returns.
    auto ref = PageRef::get(*pgmap_, pfn);
    if (!ref) return FaultResult::sigbus("cannot reference a page of " + opts_.name);
    if (after_fault_) after_fault_();
    return FaultResult::insert(std::move(ref).value());
  }

  Errc may_split(const Vma& vma, std::uint64_t addr) override {
    (void)vma;
    (void)addr;
    split_calls_.fetch_add(1, std::memory_order_relaxed);
    return refuse_split_.load(std::memory_order_relaxed) ? Errc::invalid_argument : Errc::ok;
  }

  void on_close(const Vma& vma) override {
    std::lock_guard<std::mutex> lock(mu_);
    closed_.emplace_back(vma.start, vma.end);
  }

  // ---- test controls ----
  void kill() { killed_.store(true, std::memory_order_release); }
  void revive() { killed_.store(false, std::memory_order_release); }
  void add_hole(std::uint64_t pgoff) {
    std::lock_guard<std::mutex> lock(mu_);
    holes_.insert(pgoff);
  }
  void refuse_mmap(Errc e) { refuse_mmap_.store(e, std::memory_order_relaxed); }
  void refuse_split(bool refuse) { refuse_split_.store(refuse, std::memory_order_relaxed); }
  // Runs at the end of every successful fault() (after the reference was taken): a test widens
  // the window between the owner's fault and the address space installing the entry with it.
  // Set before the owner is used concurrently.
  void set_after_fault(std::function<void()> fn) { after_fault_ = std::move(fn); }
  // Runs in max_level(), which a fault reads after its page-table lookup found nothing and before
  // it tries the levels: a test stops a fault there while another one maps the address. Set
  // before the owner is used concurrently.
  void set_before_levels(std::function<void()> fn) { before_levels_ = std::move(fn); }

  // ---- observations ----
  DevPagemap& pgmap() const { return *pgmap_; }
  Pfn pfn_of(std::uint64_t pgoff) const { return base_ + pgoff; }
  int mmap_calls() const { return mmap_calls_.load(std::memory_order_relaxed); }
  int split_calls() const { return split_calls_.load(std::memory_order_relaxed); }
  std::uint64_t faults(Level l) const {
    return faults_[static_cast<std::size_t>(l)].load(std::memory_order_relaxed);
  }
  // [start, end) of every VMA (or removed piece) closed so far, in call order.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }

 private:
  std::shared_ptr<DevPagemap> pgmap_;
  Pfn base_;
  std::uint64_t npages_;
  Options opts_;
  std::atomic<bool> killed_{false};
  std::atomic<Errc> refuse_mmap_{Errc::ok};
  std::atomic<bool> refuse_split_{false};
  std::atomic<int> mmap_calls_{0};
  std::atomic<int> split_calls_{0};
  std::array<std::atomic<std::uint64_t>, 3> faults_{};
  mutable std::mutex mu_;
  std::set<std::uint64_t> holes_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> closed_;
  std::function<void()> after_fault_;
  std::function<void()> before_levels_;
};

// A pagemap over a fresh anonymous backing and a FakeOwner over all of it.
struct FakeDevice {
  std::shared_ptr<DevPagemap> pgmap;
  std::shared_ptr<FakeOwner> owner;

  Pfn pfn(std::uint64_t pgoff) const { return pgmap->range(0).start + pgoff; }
  std::uint32_t refcount(std::uint64_t pgoff) const { return pgmap->folio_ref_count(pfn(pgoff)); }
  std::int32_t mapcount(std::uint64_t pgoff) const {
    PageArray* a = pgmap->array_for(pfn(pgoff));
    return a->mapcount(a->head_of(a->index_of(pfn(pgoff)))).load();
  }
  std::uint32_t pincount(std::uint64_t pgoff) const {
    PageArray* a = pgmap->array_for(pfn(pgoff));
    return a->pincount(a->head_of(a->index_of(pfn(pgoff)))).load();
  }
  std::byte* bytes(std::uint64_t pgoff) const { return pgmap->address_of(pfn(pgoff)); }
  // Tears the pagemap down with the refuse policy: fails if any folio or pagemap reference is
  // still held (a leak). A pagemap that refused is kept alive for the rest of the process, so
  // the leak fails the test instead of hanging in ~DevPagemap (which waits for every holder).
  Errc memunmap_refuse() {
    MemunmapOptions o;
    o.policy = UnmapPolicy::refuse;
    auto r = pgmap->memunmap(o);
    if (r) return Errc::ok;
    static std::mutex mu;
    static std::vector<std::shared_ptr<DevPagemap>>* leaked =
        new std::vector<std::shared_ptr<DevPagemap>>();  // never destroyed
    std::lock_guard<std::mutex> lock(mu);
    leaked->push_back(pgmap);
    return r.code();
  }
};

inline FakeDevice make_fake_device(std::uint64_t bytes, unsigned base_order = 0,
                                   FakeOwner::Options opts = {},
                                   PagemapType type = PagemapType::fs_dax,
                                   Strategy strategy = Strategy::transition) {
  const std::uint64_t align = std::max(kPmdSize, order_bytes(base_order));
  MemremapParams p = pgmap::testutil::make_params(
      strategy, pgmap::testutil::make_backing(bytes, align), base_order, type);
  FakeDevice d;
  d.pgmap = pgmap::testutil::must_memremap(std::move(p));
  if (d.pgmap) {
    d.owner = std::make_shared<FakeOwner>(d.pgmap, d.pgmap->range(0).start, d.pgmap->total_pages(),
                                          std::move(opts));
  }
  return d;
}

}  // namespace pgmap::mm::testutil
