#include "mm/translation_users.h"

#include <mutex>
#include <thread>

namespace pgmap::mm {

void flush_translations() noexcept {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const std::uint64_t old = detail::g_translation_epoch.fetch_add(1, std::memory_order_relaxed);
  sanitizer::full_fence();  // after the zap
  std::atomic<std::uint64_t>& users = detail::g_translation_users[old & 1].count;
  while (users.load(std::memory_order_acquire) != 0)
    std::this_thread::yield();
}

}  // namespace pgmap::mm
