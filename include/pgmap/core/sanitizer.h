// Sanitizer awareness in one place (after mimalloc's track.h): poison/unpoison revoked memory so
// that a use after revoke is an AddressSanitizer report in tests instead of silent corruption,
// and tell whether we run under a sanitizer. Everything is a no-op in ordinary builds.
#pragma once

#include <atomic>
#include <cstddef>

#if defined(PGMAP_ASAN) || defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define PGMAP_HAVE_ASAN 1
#endif
#if defined(PGMAP_TSAN) || defined(__SANITIZE_THREAD__)
#define PGMAP_HAVE_TSAN 1
#endif

namespace pgmap::sanitizer {

inline constexpr bool kAddress =
#ifdef PGMAP_HAVE_ASAN
    true;
#else
    false;
#endif

inline constexpr bool kThread =
#ifdef PGMAP_HAVE_TSAN
    true;
#else
    false;
#endif

// Marks [p, p+n) as not addressable: any later load or store there is reported by ASan.
inline void poison(const void* p, std::size_t n) noexcept {
#ifdef PGMAP_HAVE_ASAN
  ASAN_POISON_MEMORY_REGION(p, n);
#else
  (void)p;
  (void)n;
#endif
}

inline void unpoison(const void* p, std::size_t n) noexcept {
#ifdef PGMAP_HAVE_ASAN
  ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
  (void)p;
  (void)n;
#endif
}

// True when ASan considers [p, p+n) poisoned somewhere (always false without ASan).
inline bool is_poisoned(const void* p, std::size_t n) noexcept {
#ifdef PGMAP_HAVE_ASAN
  return __asan_region_is_poisoned(const_cast<void*>(p), n) != nullptr;
#else
  (void)p;
  (void)n;
  return false;
#endif
}

// A sequentially consistent full fence. ThreadSanitizer does not model std::atomic_thread_fence
// (GCC rejects it under -fsanitize=thread), so TSan builds use a seq_cst read-modify-write of a
// shared dummy instead: a full barrier on x86 and an ordering point TSan understands.
inline void full_fence() noexcept {
#ifdef PGMAP_HAVE_TSAN
  static std::atomic<unsigned> dummy{0};
  dummy.fetch_add(0, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace pgmap::sanitizer
