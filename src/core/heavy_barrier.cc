#include "core/heavy_barrier.h"
#include "pgmap/core/sanitizer.h"

#include <linux/membarrier.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace pgmap::detail {
namespace {

struct State {
  HeavyBarrierKind kind = HeavyBarrierKind::mprotect;
  std::mutex mprotect_mu;
  void* page = nullptr;

  State() {
    const char* force = std::getenv("PGMAP_HEAVY_BARRIER");
    bool want_mprotect = force != nullptr && std::strcmp(force, "mprotect") == 0;
    if (!want_mprotect) {
      long supported = syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
      if (supported > 0 && (supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 &&
          syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0) {
        kind = HeavyBarrierKind::membarrier;
        return;
      }
    }
    page = mmap(nullptr, static_cast<size_t>(sysconf(_SC_PAGESIZE)), PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) {
      std::fprintf(stderr, "pgmap: no membarrier and mmap failed: cannot build a heavy barrier\n");
      std::abort();
    }
  }

  void run() noexcept {
    if (kind == HeavyBarrierKind::membarrier) {
      if (syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0) return;
      std::fprintf(stderr, "pgmap: membarrier failed after registration\n");
      std::abort();
    }
    std::lock_guard<std::mutex> lock(mprotect_mu);
    auto size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    // Touch the page so it is mapped (and cached in TLBs), then downgrade and restore it.
    static_cast<std::atomic<int>*>(page)->fetch_add(1, std::memory_order_seq_cst);
    if (mprotect(page, size, PROT_READ) != 0 || mprotect(page, size, PROT_READ | PROT_WRITE) != 0) {
      std::fprintf(stderr, "pgmap: mprotect barrier failed\n");
      std::abort();
    }
  }
};

State& state() {
  static State s;
  return s;
}

}  // namespace

void heavy_barrier() noexcept {
  sanitizer::full_fence();
  state().run();
  sanitizer::full_fence();
}

HeavyBarrierKind heavy_barrier_kind() noexcept {
  return state().kind;
}

const char* heavy_barrier_name() noexcept {
  return heavy_barrier_kind() == HeavyBarrierKind::membarrier ? "membarrier" : "mprotect";
}

}  // namespace pgmap::detail
