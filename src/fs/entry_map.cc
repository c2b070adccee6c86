#include "pgmap/fs/entry_map.h"

#include <cstdio>

#include "pgmap/core/wait_table.h"
#include "pgmap/core/yield_point.h"

namespace pgmap::fs {
namespace {

// The fsdax entry wait table, separate from the global one (as fs/dax.c keeps its own).
WaitTable& entry_wait_table() {
  static WaitTable table;
  return table;
}

constexpr std::uint64_t kPmdPages = order_pages(kPmdOrder);

}  // namespace

EntryMap::Map::const_iterator EntryMap::covering(std::uint64_t index) const {
  auto it = entries_.upper_bound(index);
  if (it == entries_.begin()) return entries_.end();
  --it;
  const Entry e = Entry::from_raw(it->second);
  if (it->first == index || (e.pmd() && index - it->first < kPmdPages)) return it;
  return entries_.end();
}

const void* EntryMap::key(std::uint64_t index) const noexcept {
  // Keyed by (map, 2 MiB-aligned index): a PTE and a PMD waiter of one range share a bucket. The
  // key is only hashed, never dereferenced.
  const auto base = reinterpret_cast<std::uintptr_t>(this);
  return reinterpret_cast<const void*>(base + (index / kPmdPages) * 64);
}

void EntryMap::wake(std::uint64_t index) noexcept {
  entry_wait_table().wake(key(index));
}

void EntryMap::wait_unlocked(std::uint64_t index) {
  WaitOptions w;
  const auto t0 = Clock::now();
  w.progress_every = std::chrono::duration_cast<std::chrono::milliseconds>(kReportEvery);
  w.progress = [&] {
    std::fprintf(stderr, "pgmap fs: still waiting after %.0f s for the entry lock at index %llu\n",
                 std::chrono::duration<double>(Clock::now() - t0).count(),
                 static_cast<unsigned long long>(index));
  };
  waiting_.fetch_add(1, std::memory_order_acq_rel);
  // No deadline: entry locks are held for bounded work; the report above says if one is not.
  (void)entry_wait_table().wait(
      key(index),
      [&] {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = covering(index);
        return it == entries_.end() || !Entry::from_raw(it->second).locked();
      },
      w);
  waiting_.fetch_sub(1, std::memory_order_acq_rel);
}

std::optional<EntryMap::Slot> EntryMap::peek(std::uint64_t index) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = covering(index);
  if (it == entries_.end()) return std::nullopt;
  return Slot{it->first, Entry::from_raw(it->second)};
}

Result<EntryMap::Slot> EntryMap::grab(std::uint64_t index, unsigned order,
                                      const std::function<void(std::uint64_t)>& downgrade) {
  if (order != 0 && order != kPmdOrder) {
    return Error(Errc::invalid_argument, "EntryMap::grab: order must be 0 or 9");
  }
  const std::uint64_t want = order == 0 ? index : align_down(index, kPmdPages);
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = covering(want);
    if (order == kPmdOrder && it == entries_.end()) {
      // Any PTE entry inside the 2 MiB range blocks a PMD entry (I6): fall back.
      auto in = entries_.lower_bound(want);
      if (in != entries_.end() && in->first < want + kPmdPages) {
        return Error(Errc::busy, "PTE entries inside the PMD range");
      }
    }
    if (it == entries_.end()) {
      entries_.emplace(want, Entry::empty(order).locked_copy().raw());
      return Slot{want, Entry::empty(order)};
    }
    const std::uint64_t at = it->first;
    const Entry e = Entry::from_raw(it->second);
    if (e.locked()) {
      lock.unlock();
      PGMAP_YIELD_POINT("fs.entry_wait");
      wait_unlocked(at);
      continue;  // look again: the entry may be gone or different now
    }
    if (order == kPmdOrder && !e.pmd()) {
      return Error(Errc::busy, "a PTE entry at the PMD index");
    }
    if (order == 0 && e.pmd() && !e.is_block()) {
      // Downgrade a PMD zero/empty entry: lock it, let the caller unmap it, replace it.
      entries_[at] = e.locked_copy().raw();
      lock.unlock();
      if (downgrade) downgrade(at);
      lock.lock();
      entries_.erase(at);
      entries_.emplace(index, Entry::empty(0).locked_copy().raw());
      lock.unlock();
      wake(at);
      return Slot{index, Entry::empty(0)};
    }
    entries_[at] = e.locked_copy().raw();
    return Slot{at, e};
  }
}

std::optional<EntryMap::Slot> EntryMap::lock_next(std::uint64_t from, std::uint64_t to) {
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = entries_.lower_bound(from);
    if (it == entries_.end() || it->first >= to) return std::nullopt;
    const std::uint64_t at = it->first;
    const Entry e = Entry::from_raw(it->second);
    if (e.locked()) {
      // Wait here and look at this place again (bug 5.5: never advance past a locked entry).
      lock.unlock();
      PGMAP_YIELD_POINT("fs.scan_wait");
      wait_unlocked(at);
      from = at;
      continue;
    }
    it->second = e.locked_copy().raw();
    return Slot{at, e};
  }
}

void EntryMap::unlock(std::uint64_t index, Entry value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    entries_[index] = value.unlocked_copy().raw();
  }
  wake(index);
}

void EntryMap::unlock(std::uint64_t index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(index);
    if (it != entries_.end()) it->second = Entry::from_raw(it->second).unlocked_copy().raw();
  }
  wake(index);
}

void EntryMap::erase(std::uint64_t index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(index);
  }
  wake(index);
}

std::size_t EntryMap::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

std::uint64_t EntryMap::nr_pages() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::uint64_t n = 0;
  for (const auto& [index, raw] : entries_) {
    const Entry e = Entry::from_raw(raw);
    if (!e.empty()) n += e.pages();
  }
  return n;
}

std::vector<EntryMap::Slot> EntryMap::snapshot(std::uint64_t from, std::uint64_t to) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Slot> out;
  for (auto it = entries_.lower_bound(from); it != entries_.end() && it->first < to; ++it) {
    out.push_back(Slot{it->first, Entry::from_raw(it->second)});
  }
  return out;
}

}  // namespace pgmap::fs
