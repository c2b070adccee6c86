// The rseq runtime behind PercpuRef's per-CPU implementation (private to core): decides once
// whether restartable sequences can be used in this process, owns the per-CPU counter blocks, and
// issues the rseq-aborting barrier. The critical section itself is in
// include/pgmap/core/detail/rseq_percpu.h.
//
// Usable when: the fast path was compiled in (x86-64, glibc >= 2.35, not ThreadSanitizer), glibc
// registered rseq for this thread (__rseq_size > 0 and a valid cpu_id), the kernel has
// MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ and registering for it succeeds, the possible-CPU count is
// known (/sys/devices/system/cpu/possible) and the counter blocks could be mapped.
//
// Layout: one block of kMaxPercpuRefs 8-byte counters per possible CPU, the blocks kCpuStride
// apart in one MAP_NORESERVE mapping (only touched pages cost memory). A ref owns one slot, the
// same index in every block, like the kernel's per-CPU allocator: a counter line is only ever
// written by its own CPU (and by a fold, which runs when no critical section can commit), so
// there is no false sharing between CPUs, and a ref costs 8 bytes per CPU rather than a cache line
// per CPU.
#pragma once

#include <atomic>
#include <cstdint>

namespace pgmap::detail::rseq {

// True if the per-CPU implementation can be used (computed once). `why` (optional) receives the
// reason when it cannot.
bool available(const char** why = nullptr) noexcept;

// CPU 0's counter of `slot`; CPU c's is at + (c << kCpuShift) bytes. Only when available().
std::atomic<std::uint64_t>* counter(std::uint32_t slot) noexcept;
unsigned possible_cpus() noexcept;

// After it returns, every rseq critical section of this process that was in flight when it was
// called has committed (visibly to the caller) or been aborted. Aborts the process if the
// registered membarrier fails (it cannot, once registration succeeded).
void barrier() noexcept;

// Sums the slot over all CPUs and, if `zero`, resets it (exact only when no section can commit,
// i.e. after the word went atomic and barrier() returned). Counters that are already zero are not
// written, so pages of CPUs that never ran a section stay untouched.
std::uint64_t collect(std::uint32_t slot, bool zero) noexcept;

}  // namespace pgmap::detail::rseq
