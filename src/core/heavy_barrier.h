// Process-wide memory barrier (private to core): after heavy_barrier() returns, every thread of
// the process has executed a full memory barrier since the call began, so their earlier stores
// are visible to the caller and their later loads see the caller's earlier stores. This is what
// lets the per-thread implementation of PercpuRef use plain stores in its readers (asymmetric
// fences, as in liburcu-memb and folly; the rseq implementation uses its own barrier, core/rseq.h).
//
// Implementation: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) (Linux >= 4.14, IPIs only the CPUs
// running this process; 1.6-5 us measured here). Fallback when membarrier is unavailable or
// PGMAP_HEAVY_BARRIER=mprotect is set: change the protection of a private, touched page, which
// makes the kernel shoot down its TLB entry on every CPU that runs this process (folly's trick).
#pragma once

namespace pgmap::detail {

enum class HeavyBarrierKind { membarrier, mprotect };

void heavy_barrier() noexcept;
HeavyBarrierKind heavy_barrier_kind() noexcept;
const char* heavy_barrier_name() noexcept;

}  // namespace pgmap::detail
