#include "pgmap/fs/dax_fs.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "pgmap/core/rcu.h"
#include "pgmap/fs/inode.h"
#include "pgmap/memory/backing.h"
#include "pgmap/memory/page_array.h"

namespace pgmap::fs {

// ---- File
// ----------------------------------------------------------------------------------------

File::File(File&& o) noexcept : fs_(std::move(o.fs_)), inode_(std::move(o.inode_)) {}

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    close();
    fs_ = std::move(o.fs_);
    inode_ = std::move(o.inode_);
  }
  return *this;
}

void File::close() noexcept {
  if (!inode_) return;
  std::shared_ptr<Inode> ino = std::move(inode_);
  std::shared_ptr<DaxFs> fs = std::move(fs_);
  fs->put_open(*ino);
  ino.reset();
  // `fs` goes last: if it was the last reference, the filesystem unmounts now.
}

std::shared_ptr<Inode> File::mapping() const {
  if (!inode_) return nullptr;
  // The VMA's owner reference keeps the filesystem alive too: its on_close reaches the DaxFs.
  struct Both {
    std::shared_ptr<DaxFs> fs;
    std::shared_ptr<Inode> inode;
  };
  auto both = std::make_shared<Both>(Both{fs_, inode_});
  Inode* raw = both->inode.get();
  return std::shared_ptr<Inode>(std::move(both), raw);
}

// ---- mount / unmount
// -----------------------------------------------------------------------------

DaxFs::DaxFs(std::shared_ptr<dax::DaxDevice> dax, MountOptions opts)
    : dax_(std::move(dax)), opts_(std::move(opts)), alloc_(dax_->nr_pages()) {
  if (opts_.name.empty()) opts_.name = "daxfs:" + dax_->name();
}

Result<std::shared_ptr<DaxFs>> DaxFs::mount(std::shared_ptr<dax::DaxDevice> dax,
                                            MountOptions opts) {
  if (!dax) return Error(Errc::invalid_argument, "mount: no device");
  if (dax->pagemap().type() != PagemapType::fs_dax || dax->pagemap().base_order() != 0) {
    return Error(
        Errc::invalid_argument,
        fmt::format("mount: {} is not an FS_DAX pagemap of 4 KiB folios", dax->pagemap().name()));
  }
  std::shared_ptr<DaxFs> fs(new DaxFs(std::move(dax), std::move(opts)));
  // The shared zero pages: a 4 KiB page and a 2 MiB folio of a small pagemap of our own.
  BackingOptions bo;
  bo.size = 2 * kPmdSize;
  bo.align = kPmdSize;
  bo.name = "daxfs-zero";
  auto backing = make_anonymous_backing(bo);
  if (!backing) return backing.error();
  MemremapParams p;
  p.type = PagemapType::fs_dax;
  p.strategy = Strategy::transition;
  p.ranges.push_back(PagemapRangeSpec{std::shared_ptr<Backing>(std::move(backing).value()), 0, 0});
  p.name = fs->opts_.name + " zero pages";
  auto zp = memremap(std::move(p));
  if (!zp) return zp.error();
  fs->zero_pgmap_ = std::move(zp).value();
  const PfnRange zr = fs->zero_pgmap_->range(0);
  fs->zero_pfn_ = zr.start;
  fs->zero_pmd_pfn_ = zr.start + order_pages(kPmdOrder);
  PageArray* za = fs->zero_pgmap_->array_for(fs->zero_pmd_pfn_);
  if (Errc e = za->set_folio_order(za->index_of(fs->zero_pmd_pfn_), kPmdOrder); e != Errc::ok) {
    return Error(e, "mount: cannot build the 2 MiB zero folio");
  }
  fs->holder_ops_.notify_failure = [](dax::DaxDevice&, void* holder, std::uint64_t offset,
                                      std::uint64_t len, int flags) -> Errc {
    auto* self = static_cast<DaxFs*>(holder);
    if ((flags & dax::kMfMemPreRemove) != 0) return self->pre_remove();
    auto r = self->memory_failure(offset, len, flags);
    return r ? Errc::ok : r.code();
  };
  if (Errc e = fs->dax_->set_holder(fs.get(), &fs->holder_ops_); e != Errc::ok) {
    return Error(e, fmt::format("mount: cannot hold {}", fs->dax_->name()));
  }
  fs->worker_ = std::thread([raw = fs.get()] { raw->eviction_worker(); });
  return fs;
}

DaxFs::~DaxFs() {
  if (mounted()) {
    Errc e = unmount();
    if (e != Errc::ok) {
      std::fprintf(stderr, "pgmap fs: %s destroyed while busy (%s)\n", opts_.name.c_str(),
                   errc_name(e));
    }
  }
  {
    std::lock_guard<std::mutex> lock(evict_mu_);
    stop_worker_ = true;
  }
  evict_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

bool DaxFs::mounted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mounted_;
}

Errc DaxFs::unmount() {
  // Unregistering the holder and tearing down the zero pages wait for a grace period: refused
  // inside a read section before anything changes (half an unmount left the holder registered
  // on a destroyed filesystem).
  if (rcu::in_read_section()) return Errc::invalid_argument;
  std::vector<std::shared_ptr<Inode>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!mounted_) return Errc::already_dead;
    for (const auto& [ino, inode] : inodes_) {
      if (inode->opens() != 0 || inode->nr_vmas() != 0) return Errc::busy;
    }
    mounted_ = false;
    names_.clear();
    for (const auto& [ino, inode] : inodes_)
      all.push_back(inode);
  }
  flush_evictions();
  for (const auto& inode : all) {
    {
      std::lock_guard<std::mutex> lock(inode->mu_);
      inode->nlink_ = 0;
    }
    maybe_evict(*inode, /*defer=*/false);
  }
  flush_evictions();
  // After kill_dax the holder registration is already gone (Errc::not_found then).
  if (!dax_->killed()) (void)dax_->clear_holder(this);
  if (zero_pgmap_) {
    // Every zero mapping went with its inode's mappings; nothing holds the zero pages.
    // Bounded: a GUP reference on a zero page (a pipe over a hole) must not hang unmount.
    MemunmapOptions mo;
    mo.timeout = std::chrono::seconds(10);
    auto r = zero_pgmap_->memunmap(mo);
    if (!r) std::fprintf(stderr, "pgmap fs: zero pages: %s\n", r.error().to_string().c_str());
  }
  return Errc::ok;
}

Pfn DaxFs::zero_pfn(unsigned order) const noexcept {
  return order == kPmdOrder ? zero_pmd_pfn_ : zero_pfn_;
}

// ---- namespace
// -----------------------------------------------------------------------------------

Result<File> DaxFs::create(std::string_view name) {
  if (name.empty()) return Error(Errc::invalid_argument, "create: empty name");
  std::lock_guard<std::mutex> lock(mu_);
  if (!mounted_ || shut_down()) return Error(Errc::dead, opts_.name + " is shut down");
  if (names_.find(name) != names_.end()) {
    return Error(Errc::overlap, fmt::format("create: {} exists", name));
  }
  const std::uint64_t ino = next_ino_.fetch_add(1, std::memory_order_relaxed);
  std::shared_ptr<Inode> inode(new Inode(this, ino, std::string(name)));
  inode->opens_ = 1;
  names_.emplace(std::string(name), inode);
  inodes_.emplace(ino, inode);
  return File(shared_from_this(), std::move(inode));
}

Result<File> DaxFs::open(std::string_view name) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!mounted_ || shut_down()) return Error(Errc::dead, opts_.name + " is shut down");
  auto it = names_.find(name);
  if (it == names_.end()) return Error(Errc::not_found, fmt::format("open: no {}", name));
  {
    std::lock_guard<std::mutex> il(it->second->mu_);
    ++it->second->opens_;
  }
  return File(shared_from_this(), it->second);
}

Errc DaxFs::unlink(std::string_view name) {
  std::shared_ptr<Inode> inode;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!mounted_ || shut_down()) return Errc::dead;
    auto it = names_.find(name);
    if (it == names_.end()) return Errc::not_found;
    inode = it->second;
    names_.erase(it);
    std::lock_guard<std::mutex> il(inode->mu_);
    inode->nlink_ = 0;
  }
  maybe_evict(*inode, /*defer=*/false);
  return Errc::ok;
}

std::size_t DaxFs::nr_inodes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return inodes_.size();
}

FsStats DaxFs::stats() const {
  FsStats s;
  s.blocks = alloc_.nr_blocks();
  s.free_blocks = alloc_.free_blocks();
  s.bad_blocks = alloc_.bad_blocks();
  s.retired_blocks = alloc_.retired_blocks();
  return s;
}

std::vector<std::shared_ptr<Inode>> DaxFs::inodes() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Inode>> out;
  out.reserve(inodes_.size());
  for (const auto& [ino, inode] : inodes_)
    out.push_back(inode);
  return out;
}

// ---- memory failure (§3.10, §3.13; xfstests xfs/550-552)
// ------------------------------------------

Result<std::uint64_t> DaxFs::memory_failure(std::uint64_t offset, std::uint64_t len, int mf_flags) {
  const std::uint64_t nr = alloc_.nr_blocks();
  const std::uint64_t first = offset >> kPageShift;
  if (first >= nr) return Error(Errc::out_of_range, "memory_failure: offset past the device");
  const std::uint64_t end_byte =
      len > (nr << kPageShift) - offset ? nr << kPageShift : offset + len;
  const std::uint64_t last = std::max(first + 1, align_up(end_byte, kPageSize) >> kPageShift);
  if (!mounted()) return Error(Errc::dead, opts_.name + " is unmounted");
  // The failed blocks are never allocated again (a freed one would reach an unrelated file).
  for (std::uint64_t b = first; b < last; ++b) {
    if (Errc e = alloc_.mark_bad(b); e != Errc::ok) return Error(e, "memory_failure: bad block");
  }
  // PG_hwpoison on every failed page's folio: faults on it now consume poison.
  DevPagemap& pg = pagemap();
  if (pg.state() != DevPagemap::State::dead) {
    const Pfn base = pg.range(0).start;
    for (std::uint64_t b = first; b < last; ++b) {
      if (PageArray* a = pg.array_for(base + b)) {
        a->flags(a->head_of(a->index_of(base + b))).fetch_or(kPagePoisoned);
      }
    }
  }
  // No rmap: ask every file (a shared block has no single owner, I12), as XFS's notify_failure
  // walks the reverse map to every owner.
  std::uint64_t owners = 0;
  for (const auto& inode : inodes()) {
    const std::size_t before = inode->memory_failures().size();
    inode->memory_failure(first, last, mf_flags);
    owners += inode->memory_failures().size() - before;
  }
  return owners;
}

// ---- inode references and eviction
// ---------------------------------------------------------------

void DaxFs::put_open(Inode& inode) noexcept {
  {
    std::lock_guard<std::mutex> lock(inode.mu_);
    if (inode.opens_ > 0) --inode.opens_;
  }
  maybe_evict(inode, /*defer=*/false);
}

void DaxFs::maybe_evict(Inode& inode, bool defer) noexcept {
  {
    std::lock_guard<std::mutex> lock(inode.mu_);
    if (inode.state_ != Inode::State::live || inode.nlink_ != 0 || inode.opens_ != 0 ||
        inode.eviction_queued_) {
      return;
    }
    // nr_vmas takes the i_mmap lock, which ranks after Inode::mu (docs/fsdax.md).
    if (inode.nr_vmas() != 0) return;
    if (defer) {
      inode.eviction_queued_ = true;
    } else {
      inode.state_ = Inode::State::evicting;
    }
  }
  if (defer) {
    queue_eviction(inode.shared_from_this());
    return;
  }
  inode.evict();
  forget(inode);
}

void DaxFs::queue_eviction(std::shared_ptr<Inode> inode) {
  {
    std::lock_guard<std::mutex> lock(evict_mu_);
    evict_queue_.push_back(std::move(inode));
    ++evicting_;
  }
  evict_cv_.notify_all();
}

void DaxFs::eviction_worker() {
  std::unique_lock<std::mutex> lock(evict_mu_);
  for (;;) {
    evict_cv_.wait(lock, [&] { return stop_worker_ || !evict_queue_.empty(); });
    if (evict_queue_.empty()) return;  // stopping, nothing left
    std::shared_ptr<Inode> inode = std::move(evict_queue_.front());
    evict_queue_.pop_front();
    lock.unlock();
    bool run = false;
    {
      std::lock_guard<std::mutex> il(inode->mu_);
      inode->eviction_queued_ = false;
      // Re-check: the inode may have been opened or mapped again meanwhile (not unlinked ones:
      // they cannot be opened), or evicted by unmount.
      if (inode->state_ == Inode::State::live && inode->nlink_ == 0 && inode->opens_ == 0 &&
          inode->nr_vmas() == 0) {
        inode->state_ = Inode::State::evicting;
        run = true;
      }
    }
    if (run) {
      inode->evict();
      forget(*inode);
    }
    inode.reset();
    lock.lock();
    --evicting_;
    evict_cv_.notify_all();
  }
}

void DaxFs::flush_evictions() {
  std::unique_lock<std::mutex> lock(evict_mu_);
  evict_cv_.wait(lock, [&] { return evicting_ == 0; });
}

void DaxFs::forget(Inode& inode) {
  std::lock_guard<std::mutex> lock(mu_);
  inodes_.erase(inode.ino());
}

}  // namespace pgmap::fs

namespace pgmap::fs {

// ---- reflink (§3.10, I12)
// ------------------------------------------------------------------------

Errc DaxFs::reflink(Inode& src, Inode& dst) {
  if (&src == &dst) return Errc::invalid_argument;
  if (&src.fs() != this || &dst.fs() != this) return Errc::not_supported;  // EXDEV
  if (shut_down()) return Errc::dead;
  // Both invalidate locks, in inode-number order.
  Inode& a = src.ino() < dst.ino() ? src : dst;
  Inode& b = src.ino() < dst.ino() ? dst : src;
  std::unique_lock<std::shared_mutex> la(a.invalidate_lock_);
  std::unique_lock<std::shared_mutex> lb(b.invalidate_lock_);
  if (src.check_usable() != Errc::ok || dst.check_usable() != Errc::ok) return Errc::dead;
  constexpr std::uint64_t kAll = ~std::uint64_t{0};
  // Both layouts are broken: src's folios become shared (their association changes), dst loses
  // its content. Waiting drops one lock: the two-inode case waits on each with only its own
  // lock held, then starts over, so nothing can slip in between.
  for (;;) {
    std::unique_lock<std::shared_mutex>& ls = &src == &a ? la : lb;
    std::unique_lock<std::shared_mutex>& ld = &dst == &a ? la : lb;
    BreakOptions nowait;
    nowait.nowait = true;
    Status s1 = src.break_layout_locked(ls, 0, kAll, nowait, false);
    Status s2 = s1 ? dst.break_layout_locked(ld, 0, kAll, nowait, false) : s1;
    if (s1 && s2) break;
    if (s1.code() != Errc::busy && !s1) return s1.code();
    if (s2.code() != Errc::busy && !s2) return s2.code();
    // Something is busy: wait for it with the other inode unlocked, then retry both.
    Inode& busy = s1 ? dst : src;
    std::unique_lock<std::shared_mutex>& lbusy = s1 ? ld : ls;
    std::unique_lock<std::shared_mutex>& lother = s1 ? ls : ld;
    lother.unlock();
    Status w = busy.break_layout_locked(lbusy, 0, kAll, BreakOptions{}, false);
    lbusy.unlock();
    la.lock();
    lb.lock();
    if (!w) return w.code();
    if (src.check_usable() != Errc::ok || dst.check_usable() != Errc::ok) return Errc::dead;
  }
  src.delete_entries(0, kAll);
  dst.delete_entries(0, kAll);
  std::scoped_lock lock(a.mu_, b.mu_);
  dst.free_pages_locked(0, kAll);
  for (const auto& [page, block] : src.blocks_) {
    if (Errc e = alloc_.share(block); e != Errc::ok) return e;  // cannot fail: src holds it
    dst.blocks_[page] = block;
  }
  dst.size_ = src.size_;
  return Errc::ok;
}

// ---- removal under a mounted filesystem (§3.14)
// ---------------------------------------------------

Errc DaxFs::pre_remove() noexcept {
  shutdown_.store(true, std::memory_order_seq_cst);
  std::vector<std::shared_ptr<Inode>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [ino, inode] : inodes_)
      all.push_back(inode);
  }
  constexpr std::uint64_t kAll = ~std::uint64_t{0};
  for (const auto& inode : all) {
    std::unique_lock<std::shared_mutex> inv(inode->invalidate_lock_);
    // Every user mapping goes (their next access faults: SIGBUS, shut down); then wait, bounded,
    // for the pins, and drop the entries so the pagemap can be torn down.
    (void)inode->unmap_mapping_range(0, 0);
    BreakOptions o;
    o.timeout = opts_.pre_remove_wait;
    Status s = inode->break_layout_locked(inv, 0, kAll, o, false);
    if (!s) {
      std::fprintf(stderr, "pgmap fs: %s pre-remove: %s\n", opts_.name.c_str(),
                   s.to_string().c_str());
      continue;  // its entries stay until unmount
    }
    inode->delete_entries(0, kAll);
  }
  return Errc::ok;
}

}  // namespace pgmap::fs
