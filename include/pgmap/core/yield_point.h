// Named yield points: places in the library where a concurrent teardown can interleave with the
// operation in progress (between an owner's fault and the reference being taken, between kill
// and confirm, between a sweep scan and a folio get, ...). Race-widening stress runs install a
// hook that sleeps, spins or yields at them, seeded, so rare interleavings happen often.
//
// Compiled in only when PGMAP_YIELD_POINTS is defined (the debug, asan and tsan presets); in
// release builds PGMAP_YIELD_POINT(name) expands to nothing and costs nothing.
//
// Contract: a yield point may be reached with any lock held and inside any read section, so the
// hook must not take pgmap locks, enter RCU, or call back into the library; it may sleep only
// briefly (it runs inside RCU read sections that grace periods wait for). Hooks are process-wide;
// set_yield_hook is not synchronized with running operations beyond the atomic pointer swap.
//
// Usage:
//   PGMAP_YIELD_POINT("fault.after_owner");
//   pgmap::set_yield_hook([](const char* name) { if (rng() % 8 == 0) std::this_thread::yield(); });
#pragma once

#include <atomic>

namespace pgmap {

using YieldHook = void (*)(const char* name) noexcept;

namespace detail {
inline std::atomic<YieldHook> g_yield_hook{nullptr};
}  // namespace detail

// Installs (or, with nullptr, removes) the process-wide hook; returns the previous one.
inline YieldHook set_yield_hook(YieldHook hook) noexcept {
  return detail::g_yield_hook.exchange(hook, std::memory_order_acq_rel);
}

// Whether this build has yield points compiled in.
inline constexpr bool kYieldPointsEnabled =
#ifdef PGMAP_YIELD_POINTS
    true;
#else
    false;
#endif

inline void yield_point(const char* name) noexcept {
  if (YieldHook h = detail::g_yield_hook.load(std::memory_order_acquire)) h(name);
}

}  // namespace pgmap

#ifdef PGMAP_YIELD_POINTS
#define PGMAP_YIELD_POINT(name) ::pgmap::yield_point(name)
#else
#define PGMAP_YIELD_POINT(name) \
  do {                          \
  } while (false)
#endif
