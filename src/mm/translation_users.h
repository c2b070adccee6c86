// The simulated CPUs' use of a page-table translation, and the TLB flush that waits for it.
//
// A process's load or store (AddressSpace::read / write) and a copy-on-write copy look an entry
// up and then touch the bytes it maps. On hardware, a zap returns only after the TLB flush, when
// no CPU can still load or store through the zapped entry, so a filesystem may free the blocks
// right after it. Here the look-up and the copy run inside a TranslationUse, and
// flush_translations() waits for every use that may have seen an entry zapped before the call.
//
// This is a domain of its own, not the global RCU: the global read sections include the device's
// read lock, inside which pre-remove takes inode locks, so a grace period waited for under an
// inode lock could wait for ever. A use blocks on nothing, so a flush may be waited for under any
// lock, inside a read section too.
//
// The scheme is two counters and an epoch: a use counts itself in the counter of the current
// epoch (reading the epoch again after its fence, and counting again if it moved); a flush
// advances the epoch, and after its fence waits for the previous epoch's counter to drain. With
// the two fences (the store-buffering pattern) either the flush sees the use counted and waits,
// or the use's look-up sees the zap. Flushes are serialized; each waits for the uses of the epoch
// it closes, and those of the epoch before were drained by the flush before it.
#pragma once

#include <atomic>
#include <cstdint>

#include "pgmap/core/sanitizer.h"

namespace pgmap::mm {

namespace detail {
struct alignas(64) TranslationUsers {
  std::atomic<std::uint64_t> count{0};
};
inline TranslationUsers g_translation_users[2];
inline std::atomic<std::uint64_t> g_translation_epoch{0};
}  // namespace detail

class TranslationUse {
 public:
  TranslationUse() noexcept {
    for (;;) {
      const std::uint64_t epoch = detail::g_translation_epoch.load(std::memory_order_relaxed);
      slot_ = epoch & 1;
      detail::g_translation_users[slot_].count.fetch_add(1, std::memory_order_relaxed);
      sanitizer::full_fence();  // before the look-up
      // Counted in the epoch that is still current: the next flush waits for us, and every
      // earlier one has its zap visible to our look-up. Otherwise count again.
      if (detail::g_translation_epoch.load(std::memory_order_relaxed) == epoch) return;
      detail::g_translation_users[slot_].count.fetch_sub(1, std::memory_order_relaxed);
    }
  }
  ~TranslationUse() {
    detail::g_translation_users[slot_].count.fetch_sub(1, std::memory_order_release);
  }
  TranslationUse(const TranslationUse&) = delete;
  TranslationUse& operator=(const TranslationUse&) = delete;

 private:
  std::uint64_t slot_ = 0;
};

// Waits for every TranslationUse that may have seen an entry zapped before the call. Never call it
// inside a TranslationUse (it would wait for itself).
void flush_translations() noexcept;

}  // namespace pgmap::mm
