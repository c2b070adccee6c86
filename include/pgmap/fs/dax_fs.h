// DaxFs: a small DAX filesystem mounted on a DaxDevice (the fsdax side of ext4/xfs -o dax). Its
// point is page lifetime, not durability: metadata lives in memory; file data lives in device
// blocks that are read, written, mapped and pinned directly (no page cache).
//
// ---- Objects -----------------------------------------------------------------------------------
//
//   DaxFs    the superblock: a flat namespace (name -> inode), the block allocator (4 KiB blocks,
//            2 MiB-aligned extents on request), a pagemap of its own for the shared zero pages
//            (one 4 KiB zero page, one 2 MiB zero folio), the DaxDevice holder registration.
//   Inode    a file (inode.h): size, block map, entry map, MappingOwner for mmap.
//   File     an open-file handle (RAII): keeps its inode open.
//
// ---- Inode lifetime (I8, bug 5.3)
// ----------------------------------------------------------------
//
// An inode counts its links (0 or 1: unlink drops it), its open Files and its mappings (the VMAs
// linked in its i_mmap, MappingOwner::nr_vmas). When all three reach zero it is evicted: its
// layout is broken for the whole file with an UNINTERRUPTIBLE wait for every page to be idle (no
// mapping, reference or pin; bounded-wait reports name the holders every `evict_report_every`),
// all entries are deleted, and only then are its blocks freed. Eviction runs on the thread that
// dropped the last open or link; when the last mapping goes (munmap, address-space exit, with
// mmap_lock held) it is queued to the filesystem's eviction worker instead, which
// flush_evictions() waits for. A later operation on an evicted inode fails with Errc::dead.
//
// ---- Shut down (removal under a mounted filesystem, §3.14, bug 5.9) -----------------------------
//
// The DaxFs registers as the DaxDevice's holder. kill_dax notifies it with kMfMemPreRemove: the
// filesystem shuts down (every later operation fails with Errc::dead, the EIO of a shut-down
// filesystem; every fault raises SIGBUS), zaps every user mapping of every file (mapping users
// get SIGBUS on their next access), breaks every file's layout (waiting, bounded by
// `pre_remove_wait`, for pins), and deletes the entries, so the pagemap can be torn down after
// kill_dax returns. unmount() afterwards evicts what is left and releases the zero pages; it
// never touches the dead device's pages.
//
// Thread safety: everything is thread-safe. Lock order (docs/fsdax.md):
//   AddressSpace mmap_lock -> Inode invalidate_lock -> entry lock (bit) -> Inode mu ->
//   DaxFs mu -> BlockAllocator mu -> EntryMap mu -> i_mmap lock -> wait-table buckets.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "pgmap/core/diagnostics.h"
#include "pgmap/core/error.h"
#include "pgmap/dax/dax_device.h"
#include "pgmap/fs/block_allocator.h"
#include "pgmap/memory/dev_pagemap.h"

namespace pgmap::fs {

class Inode;
class DaxFs;

struct MountOptions {
  std::string name;  // for messages; defaults to the device's name
  // Eviction reports the holders of the pages it waits for this often (it never gives up).
  std::chrono::milliseconds evict_report_every{5000};
  // Called with each report (default: printed on stderr).
  std::function<void(const Inode&, const HolderReport&)> on_evict_report;
  // How long the pre-remove notification waits for pinned pages before it gives up on them
  // (their entries then stay until unmount).
  std::chrono::milliseconds pre_remove_wait{10000};
};

// An open file (RAII). Empty when default-constructed or moved from. A File and every mapping
// made from it (mapping()) keep their DaxFs object alive (shared ownership): dropping the last
// outside reference to a DaxFs while Files are open or mapped defers its destruction (and the
// unmount it does) to the last of them.
class File {
 public:
  File() = default;
  File(File&& o) noexcept;
  File& operator=(File&& o) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() { close(); }

  // Closes now (evicts the inode if this was its last reference).
  void close() noexcept;
  explicit operator bool() const noexcept { return inode_ != nullptr; }
  Inode& inode() const noexcept { return *inode_; }
  // The MappingOwner to mmap (keeps the inode object and its filesystem alive, not open).
  std::shared_ptr<Inode> mapping() const;

 private:
  friend class DaxFs;
  File(std::shared_ptr<DaxFs> fs, std::shared_ptr<Inode> inode) noexcept
      : fs_(std::move(fs)), inode_(std::move(inode)) {}
  std::shared_ptr<DaxFs> fs_;  // declared first: released after the inode reference
  std::shared_ptr<Inode> inode_;
};

// statfs-like figures of a DaxFs (DaxFs::stats()).
struct FsStats {
  std::uint64_t blocks = 0;          // 4 KiB blocks of the device
  std::uint64_t free_blocks = 0;     // in the free pool (never a bad one)
  std::uint64_t bad_blocks = 0;      // hit by a memory failure: never allocated again
  std::uint64_t retired_blocks = 0;  // bad ones no file holds any more (out of the pool)
};

class DaxFs : public std::enable_shared_from_this<DaxFs> {
 public:
  // Mounts a filesystem on `dax` (fs_dax_get_by_bdev: registers as its holder). The device's
  // pagemap must be FS_DAX with base order 0. Errors: Errc::invalid_argument (null device, wrong
  // pagemap type or order), Errc::dead (device not alive), Errc::busy (the device has a holder:
  // already mounted), Errc::no_memory (zero pages).
  static Result<std::shared_ptr<DaxFs>> mount(std::shared_ptr<dax::DaxDevice> dax,
                                              MountOptions opts = {});
  // Unmounts (if not done): see unmount().
  ~DaxFs();
  DaxFs(const DaxFs&) = delete;
  DaxFs& operator=(const DaxFs&) = delete;

  // Requires no open File and no mapping of any file (Errc::busy otherwise, nothing changed);
  // evicts every inode (unlinked or not), waits for the eviction worker, releases the holder
  // registration and the zero pages. Errc::already_dead if already unmounted.
  Errc unmount();
  bool mounted() const;
  bool shut_down() const noexcept { return shutdown_.load(std::memory_order_acquire); }

  // ---- namespace ----
  // Errc::invalid_argument (empty name), Errc::overlap (EEXIST), Errc::dead (shut down or
  // unmounted).
  Result<File> create(std::string_view name);
  // Errc::not_found, Errc::dead.
  Result<File> open(std::string_view name);
  // Drops the link; the inode is evicted when it is also closed and unmapped. Errc::not_found,
  // Errc::dead.
  Errc unlink(std::string_view name);
  std::size_t nr_inodes() const;  // live (not yet evicted) inodes, linked or not

  // reflink (FICLONE): `dst` becomes a copy of `src` that shares all of src's blocks (share
  // counts, I12). Both layouts are broken first (dst's content is dropped as by truncate to 0).
  // Errors: Errc::invalid_argument (src is dst), Errc::not_supported (files of different
  // filesystems), Errc::dead (shut down, or an inode evicted), errors of break_layout.
  Errc reflink(Inode& src, Inode& dst);

  // Waits until every queued eviction has run.
  void flush_evictions();

  // A memory failure (media error) on device bytes [offset, offset + len), as notify_failure
  // delivers it: every block of the range is marked poisoned and bad in the allocator (never
  // handed out again: a free one leaves the pool now, a used one when its last file frees it;
  // FsStats::bad_blocks), and EVERY file mapping one of them
  // — each sharer of a reflinked block — records the failure (Inode::memory_failures) and has
  // the mappings of those pages zapped, so each mapping user gets SIGBUS BUS_MCEERR_AR at its
  // next access (faults on a poisoned block raise it). Returns the number of (file, page) owners
  // notified. Errc::out_of_range (offset past the device), Errc::dead (unmounted).
  Result<std::uint64_t> memory_failure(std::uint64_t offset, std::uint64_t len, int mf_flags);

  // Block figures (statfs). Thread-safe; a snapshot.
  FsStats stats() const;

  // The live (not yet evicted) inodes, for checkers and diagnostics.
  std::vector<std::shared_ptr<Inode>> inodes() const;

  // ---- device ----
  dax::DaxDevice& dax_device() const noexcept { return *dax_; }
  DevPagemap& pagemap() const noexcept { return dax_->pagemap(); }
  BlockAllocator& allocator() noexcept { return alloc_; }
  const BlockAllocator& allocator() const noexcept { return alloc_; }
  const MountOptions& options() const noexcept { return opts_; }
  const std::string& name() const noexcept { return opts_.name; }
  // The zero pages (4 KiB page, 2 MiB folio) mapped read-only over holes.
  Pfn zero_pfn(unsigned order) const noexcept;
  DevPagemap& zero_pagemap() const noexcept { return *zero_pgmap_; }

 private:
  friend class Inode;
  friend class File;
  DaxFs(std::shared_ptr<dax::DaxDevice> dax, MountOptions opts);
  Errc pre_remove() noexcept;  // the holder's kMfMemPreRemove
  // Inode reference changes (Inode::mu held by none of them).
  void put_open(Inode& inode) noexcept;
  void maybe_evict(Inode& inode, bool defer) noexcept;
  void queue_eviction(std::shared_ptr<Inode> inode);
  void eviction_worker();
  void forget(Inode& inode);  // eviction done: drop it from the inode table
  // Serializes association changes of one folio's metadata (mapping, index/share, order) between
  // the files that share it; striped by 2 MiB of pfns.
  std::mutex& folio_mu(Pfn pfn) noexcept { return folio_mu_[(pfn >> kPmdOrder) % kFolioLocks]; }
  static constexpr std::size_t kFolioLocks = 64;
  std::mutex folio_mu_[kFolioLocks];

  const std::shared_ptr<dax::DaxDevice> dax_;
  MountOptions opts_;
  BlockAllocator alloc_;
  std::shared_ptr<DevPagemap> zero_pgmap_;
  Pfn zero_pfn_ = 0;
  Pfn zero_pmd_pfn_ = 0;
  dax::HolderOps holder_ops_;
  std::atomic<bool> shutdown_{false};
  std::atomic<std::uint64_t> next_ino_{1};

  mutable std::mutex mu_;  // namespace, inode table, mounted_
  std::map<std::string, std::shared_ptr<Inode>, std::less<>> names_;
  std::map<std::uint64_t, std::shared_ptr<Inode>> inodes_;  // every live inode
  bool mounted_ = true;

  std::mutex evict_mu_;  // the eviction queue
  std::condition_variable evict_cv_;
  std::deque<std::shared_ptr<Inode>> evict_queue_;
  std::size_t evicting_ = 0;  // queued or running on the worker
  bool stop_worker_ = false;
  std::thread worker_;
};

}  // namespace pgmap::fs
