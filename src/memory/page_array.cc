#include "pgmap/memory/page_array.h"

#include <sys/mman.h>

#include <atomic>
#include <new>
#include <thread>
#include <type_traits>

#include "pgmap/core/sanitizer.h"
#include "pgmap/core/yield_point.h"

#if defined(__SSE2__) && !defined(PGMAP_HAVE_TSAN)
#include <emmintrin.h>
#define PGMAP_VECTOR_SCAN 1
#else
#define PGMAP_VECTOR_SCAN 0
#endif

namespace pgmap {
namespace {

// Maps `len` bytes of zeroed, lazily committed memory. With `huge`, transparent huge pages where
// the kernel allows: the hot array is read whole by every removal sweep, and with huge pages that
// read of an untouched 1 GiB array is 512 faults on the huge zero page instead of 262144, and a
// densely used array costs 512 TLB entries. The cold arrays are touched sparsely by upper layers,
// so they keep base pages: a touched entry commits 4 KiB of each, not 2 MiB.
void* map_zeroed(std::size_t len, bool huge) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) return nullptr;
  // Advice only: without it the array works the same on base pages.
  if (huge && len >= kPmdSize) (void)madvise(p, len, MADV_HUGEPAGE);
  return p;
}

// Returns the memory of [p, p + len) to the system and leaves the range mapped, reading zero: a
// fresh anonymous mapping replaces the old one in one step, so a concurrent access touches either
// the old pages or the new ones and never faults. O(resident pages), independent of `len`.
void discard(void* p, std::size_t len) noexcept {
  if (p == nullptr || len == 0) return;
  void* q = mmap(p, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (q != MAP_FAILED) return;
  // mmap can only fail here for lack of memory for the new mapping's bookkeeping; dropping the
  // pages in place gives the same result (zero-filled on the next access) without a new mapping.
  // If even that failed the old contents would stay, which is still safe to access.
  (void)madvise(p, len, MADV_DONTNEED);  // nothing more to do if it fails: see above
}

// Views fresh zero-filled anonymous memory as an array of atomics holding zero, without writing
// to it (see create()).
template <typename T>
std::atomic<T>* zeroed_atomics(void* p) noexcept {
  static_assert(sizeof(std::atomic<T>) == sizeof(T) && alignof(std::atomic<T>) == alignof(T));
  static_assert(std::atomic<T>::is_always_lock_free);
  static_assert(std::is_trivially_destructible_v<std::atomic<T>>);
  return std::launder(static_cast<std::atomic<T>*>(p));
}

}  // namespace

PageArray::PageArray(PfnRange range, unsigned base_order, std::uint64_t entries)
    : range_(range), base_order_(base_order), entries_(entries), cold_(new Cold{}) {}

Result<std::unique_ptr<PageArray>> PageArray::create(PfnRange range, unsigned base_order) {
  if (base_order != 0 && base_order != kPmdOrder && base_order != kPudOrder) {
    return Error(Errc::invalid_argument,
                 "page array base order must be 0, 9 or 18, got " + std::to_string(base_order));
  }
  std::uint64_t unit = order_pages(base_order);
  if (range.count == 0 || !is_aligned(range.start, unit) || !is_aligned(range.count, unit)) {
    return Error(Errc::unaligned, "page array range must be non-empty and aligned to " +
                                      std::to_string(unit) + " pages");
  }
  std::uint64_t n = range.count >> base_order;
  std::unique_ptr<PageArray> a(new PageArray(range, base_order, n));
  const std::size_t sizes[7] = {
      n * sizeof(std::atomic<std::uint32_t>), n * sizeof(std::atomic<std::int32_t>),
      n * sizeof(std::atomic<std::uint32_t>), n * sizeof(std::atomic<std::uint8_t>),
      n * sizeof(std::atomic<std::uint8_t>),  n * sizeof(std::atomic<const void*>),
      n * sizeof(std::atomic<std::uint64_t>)};
  for (int i = 0; i < 7; ++i) {
    void* p = map_zeroed(sizes[i], /*huge=*/i == 0);
    if (p == nullptr) {
      return Error(Errc::no_memory, "cannot map " + std::to_string(sizes[i]) +
                                        " bytes of page metadata");  // ~PageArray unmaps the rest
    }
    a->regions_[i] = {p, sizes[i]};
  }
  // Zeroed memory is a valid representation of each atomic (zero / null). They are not
  // constructed: array new of std::atomic value-initialises in C++20, i.e. writes every element,
  // which would commit all seven arrays (7.5 GiB for 1 TiB of 4 KiB pages) instead of leaving the
  // cold ones untouched until an upper layer uses them.
  a->ref_ = zeroed_atomics<std::uint32_t>(a->regions_[0].base);
  a->cold_->mapcount = zeroed_atomics<std::int32_t>(a->regions_[1].base);
  a->cold_->pincount = zeroed_atomics<std::uint32_t>(a->regions_[2].base);
  a->cold_->order = zeroed_atomics<std::uint8_t>(a->regions_[3].base);
  a->order_ = a->cold_->order;
  a->cold_->flags = zeroed_atomics<std::uint8_t>(a->regions_[4].base);
  a->flags_ = a->cold_->flags;
  a->cold_->mapping = zeroed_atomics<const void*>(a->regions_[5].base);
  a->cold_->index_or_share = zeroed_atomics<std::uint64_t>(a->regions_[6].base);
  // Nothing is written: an all-zero entry is a free base folio (see the header), so the
  // metadata commits memory only where an upper layer touches it.
  return a;
}

PageArray::~PageArray() {
  for (Region& r : regions_) {
    if (r.base == nullptr) continue;
    sanitizer::unpoison(r.base, r.len);
    munmap(r.base, r.len);
  }
}

std::uint64_t PageArray::reserved_bytes() const noexcept {
  std::uint64_t total = 0;
  for (const Region& r : regions_)
    total += r.len;
  return total;
}

Errc PageArray::set_folio_order(std::uint64_t head, unsigned order) noexcept {
  if (order < base_order_ || order > kPudOrder) return Errc::invalid_argument;
  if (head >= entries_) return Errc::out_of_range;
  // A split covers the whole folio headed at `head` (a tail entry is an unaligned head).
  std::uint64_t span =
      order == base_order_ ? folio_entries(head) : std::uint64_t{1} << (order - base_order_);
  if (head + span > entries_) return Errc::out_of_range;
  if (!is_aligned(head, span)) return Errc::unaligned;
  // The old folios overlapping the new span must lie inside it and be idle.
  std::uint64_t old_head = head_of(head);
  std::uint64_t last = head + span - 1;
  std::uint64_t old_end = head_of(last) + folio_entries(last);
  if (old_head < head || old_end > head + span) return Errc::busy;  // straddles a larger folio
  for (std::uint64_t e = head; e < head + span; ++e) {
    if (ref_[e].load(std::memory_order_acquire) != 0 ||
        cold_->mapcount[e].load(std::memory_order_acquire) != 0 ||
        cold_->pincount[e].load(std::memory_order_acquire) != 0) {
      return Errc::busy;
    }
  }
  auto rel = static_cast<std::uint8_t>(order - base_order_);
  // Before the first order store: whoever sees a non-zero order also sees the flag.
  if (order != base_order_) large_folios_.store(true, std::memory_order_seq_cst);
  for (std::uint64_t e = head; e < head + span; ++e) {
    cold_->order[e].store(order == base_order_ ? 0 : rel, std::memory_order_release);
  }
  return Errc::ok;
}

Errc PageArray::split_idle(std::uint64_t head, std::uint32_t head_ref) noexcept {
  const std::uint64_t span = folio_entries(head);
  if (span == 1) return Errc::ok;
  for (std::uint64_t e = head; e < head + span; ++e) {
    if (ref_[e].load(std::memory_order_seq_cst) != (e == head ? head_ref : 0) ||
        cold_->mapcount[e].load(std::memory_order_seq_cst) != 0 ||
        cold_->pincount[e].load(std::memory_order_seq_cst) != 0) {
      return Errc::busy;
    }
  }
  // Every page becomes a base folio of its own with nothing left of the large one (bug 5.8): the
  // tails' fields are cleared where anything was left, the head's order goes last.
  for (std::uint64_t e = head + span - 1; e > head; --e) {
    if (cold_->mapping[e].load(std::memory_order_relaxed) != nullptr)
      cold_->mapping[e].store(nullptr, std::memory_order_relaxed);
    if (cold_->index_or_share[e].load(std::memory_order_relaxed) != 0)
      cold_->index_or_share[e].store(0, std::memory_order_relaxed);
    cold_->order[e].store(0, std::memory_order_release);
  }
  cold_->order[head].store(0, std::memory_order_release);
  return Errc::ok;
}

Errc PageArray::owe_split(std::uint64_t head) noexcept {
  if (head >= entries_ || !is_head(head)) return Errc::invalid_argument;
  flags_[head].fetch_or(kPageSplitOwed, std::memory_order_seq_cst);
  PGMAP_YIELD_POINT("memory.split_owed");  // a last put may come now and pay it
  return settle_split(head, 0, base_order_);
}

Errc PageArray::settle_split(std::uint64_t head, std::uint32_t head_ref,
                             unsigned keep_order) noexcept {
  if (head >= entries_) return Errc::invalid_argument;
  std::atomic<std::uint8_t>& f = flags_[head];
  for (unsigned spins = 0;; ++spins) {
    std::uint8_t old = f.load(std::memory_order_seq_cst);
    if ((old & kPageSplitOwed) == 0) return Errc::ok;
    if ((old & kPageSplitting) != 0) {
      if (spins >= 64) std::this_thread::yield();  // the settler may be preempted
      continue;
    }
    if (!f.compare_exchange_weak(old, static_cast<std::uint8_t>(old | kPageSplitting),
                                 std::memory_order_seq_cst, std::memory_order_relaxed)) {
      continue;
    }
    PGMAP_YIELD_POINT("memory.settle_split");  // others spin on kPageSplitting meanwhile
    const Errc e = order(head) == keep_order ? Errc::ok : split_idle(head, head_ref);
    const auto done =
        static_cast<std::uint8_t>(e == Errc::ok ? kPageSplitOwed | kPageSplitting : kPageSplitting);
    f.fetch_and(static_cast<std::uint8_t>(~done), std::memory_order_seq_cst);
    return e;
  }
}

std::uint64_t PageArray::find_busy(std::uint64_t from, std::uint64_t to) const noexcept {
  std::uint64_t e = from;
#if PGMAP_VECTOR_SCAN
  // The removal sweep reads the whole hot array (1 GiB for 1 TiB of 4 KiB pages), so it reads it
  // as the kernel would (READ_ONCE), 128 bytes per branch with SSE2: each 4-byte element of an
  // aligned 16-byte load is read atomically on x86, like a relaxed load, and the vector type may
  // alias anything. It is ordered after the caller's fence like any load. ThreadSanitizer builds
  // take the scalar atomic loads below, which it understands.
  while (e < to && (reinterpret_cast<std::uintptr_t>(&ref_[e]) & 15) != 0) {
    if (ref_[e].load(std::memory_order_relaxed) != 0) return e;
    ++e;
  }
  constexpr std::uint64_t kStep = 32;  // 8 vectors
  const __m128i zero = _mm_setzero_si128();
  for (; e + kStep <= to; e += kStep) {
    const auto* p = reinterpret_cast<const __m128i*>(&ref_[e]);
    __m128i a = _mm_or_si128(_mm_load_si128(p), _mm_load_si128(p + 1));
    __m128i b = _mm_or_si128(_mm_load_si128(p + 2), _mm_load_si128(p + 3));
    __m128i c = _mm_or_si128(_mm_load_si128(p + 4), _mm_load_si128(p + 5));
    __m128i d = _mm_or_si128(_mm_load_si128(p + 6), _mm_load_si128(p + 7));
    __m128i any = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
    if (_mm_movemask_epi8(_mm_cmpeq_epi32(any, zero)) != 0xFFFF) break;
  }
#else
  // Check 16 entries per step with one branch: the common case is a long run of idle entries.
  constexpr std::uint64_t kStep = 16;
  for (; e + kStep <= to; e += kStep) {
    std::uint32_t any = 0;
    for (std::uint64_t i = 0; i < kStep; ++i)
      any |= ref_[e + i].load(std::memory_order_relaxed);
    if (any != 0) break;
  }
#endif
  for (; e < to; ++e) {
    if (ref_[e].load(std::memory_order_relaxed) != 0) return e;
  }
  return to;
}

std::uint64_t PageArray::count_busy() const noexcept {
  std::uint64_t busy = 0;
  for (std::uint64_t e = find_busy(0, entries_); e < entries_; e = find_busy(e + 1, entries_)) {
    ++busy;
  }
  return busy;
}

void PageArray::retire(RetireMode mode) noexcept {
  if (retired_.exchange(true, std::memory_order_acq_rel)) return;
  if (mode == RetireMode::quarantine) {
    for (std::uint64_t e = 0; e < entries_; ++e) {
      ref_[e].store(kRetiredRef, std::memory_order_release);
    }
    return;  // stays readable (and unpoisoned) so that late accesses are detected by value
  }
  for (Region& r : regions_)
    discard(r.base, r.len);
  if constexpr (sanitizer::kAddress) {
    // The mapping stays; let ASan report any access to it.
    for (Region& r : regions_)
      sanitizer::poison(r.base, r.len);
  }
}

}  // namespace pgmap
