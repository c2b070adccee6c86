// rseq_percpu_add: add a value to the calling CPU's counter of a PercpuRef, inside one
// restartable sequence (rseq) critical section. Private to PercpuRef (namespace detail); it sits
// under include/ only because PercpuRef's fast path is inline in its public header, so every
// translation unit that calls get()/put() needs this code. Do not use it elsewhere. (It also
// holds rseq_floor_add, the same section without the word, which only the benchmarks use.)
//
// ---- What the critical section does ------------------------------------------------------------
//
// Inputs: the ref's word (counter address of CPU 0 | ATOMIC | DEAD | PER_THREAD in the low three
// bits) and a delta. In order:
//
//   0: rseq->rseq_cs = &descriptor            (arms the section; outside it)
//   1: cpu  = rseq->cpu_id                    (start_ip)
//      word = *ref_word
//      if (word & 7) leave, returning false   (not percpu-by-CPU: the caller takes another path)
//      [debug builds only: spin g_rseq_widen_spins times, to widen the window for stress tests]
//      *(word + (cpu << kCpuShift)) += delta  (the commit: one non-locked add to memory; a
//                                              constant delta is the add's immediate)
//   2: return true                            (post_commit_ip)
//
// If the thread is preempted, migrated or signalled, or the process issues
// membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ), while its instruction pointer is in [1, 2),
// the kernel does not resume it there but at the abort handler, which starts over at 0 (the kernel
// clears rseq_cs when it aborts, so the handler re-arms it). The commit is a single instruction,
// so it either happened entirely, on the CPU whose id was read, or not at all. That is what makes
// PercpuRef's kill exact: kill stores ATOMIC|DEAD into the word and then issues the rseq
// membarrier; every section that read the old word before that store has either committed (and
// its add is visible to the fold) or is aborted and re-reads the word, sees ATOMIC and leaves.
//
// ---- Descriptor, abort handler, signature ------------------------------------------------------
//
// Each inlined copy emits its own 32-byte aligned `struct rseq_cs` descriptor (version 0, flags 0
// = restart on preemption, signal and migration; start_ip, post_commit_offset, abort_ip) into the
// __rseq_cs data section, and its abort handler into the __rseq_failure text section, preceded by
// the 4-byte signature RSEQ_SIG from <sys/rseq.h>: the kernel refuses to jump to an abort_ip that
// is not preceded by the signature the thread registered with, and the registration is glibc's
// (glibc >= 2.35 registers every thread it creates and exports __rseq_offset, the offset of the
// area from the thread pointer, so the area is %fs:__rseq_offset). Labels are numeric, so the
// compiler may duplicate or inline the asm freely. Both sections are opened with the `?` flag,
// which puts them in the section group of the code around them: when that code is an inline
// function emitted by several translation units (a COMDAT group), the linker discards each
// duplicate's descriptor and handler with it (without the flag the kept __rseq_cs pointed into
// the discarded copy and the link failed; percpu_ref_test links two such units). No system call
// is made inside the section.
//
// x86-64 only. Not compiled under ThreadSanitizer (TSan cannot see the asm's memory accesses, so
// it would report the fold's reads as races): there PercpuRef uses its per-thread implementation.
// Threads must be created through glibc (pthread_create, std::thread) so that rseq is registered.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "pgmap/core/sanitizer.h"

// PGMAP_PERCPU_NO_RSEQ (a -D for every translation unit) leaves the rseq path out: a build for
// machines known to lack rseq then runs the per-thread fast path inline, without the failed rseq
// attempt and the out-of-line jumps it costs there (docs/percpu-ref.md, "Cost").
#if defined(__x86_64__) && defined(__linux__) && !defined(PGMAP_HAVE_TSAN) && \
    !defined(PGMAP_PERCPU_NO_RSEQ) && defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#if defined(RSEQ_SIG) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 35)
#define PGMAP_PERCPU_RSEQ_INLINE 1
#endif
#endif
#endif
#endif
#ifndef PGMAP_PERCPU_RSEQ_INLINE
#define PGMAP_PERCPU_RSEQ_INLINE 0
#endif

namespace pgmap::detail {

// The per-CPU counter blocks are kCpuStride bytes apart: CPU c's counter of a ref is at the
// ref's CPU-0 address + (c << kCpuShift).
inline constexpr unsigned kCpuShift = 17;

#ifdef PGMAP_YIELD_POINTS
// Test-only: pause instructions executed inside every critical section (0 = none).
inline std::atomic<std::uint32_t> g_rseq_widen_spins{0};
#endif

#if PGMAP_PERCPU_RSEQ_INLINE

// Adds `delta` to this CPU's counter and returns true, or returns false, having changed nothing,
// when the word has a flag set (not percpu-by-CPU).
[[gnu::always_inline]] inline bool rseq_percpu_add(const std::atomic<std::uintptr_t>* word,
                                                   std::int64_t delta) noexcept {
  std::uintptr_t w;
  std::uint64_t cpu;
#ifdef PGMAP_YIELD_POINTS
  std::uint32_t spins = g_rseq_widen_spins.load(std::memory_order_relaxed);
  std::uint32_t left;
#define PGMAP_RSEQ_WIDEN       \
  "movl %[spins], %[left]\n\t" \
  "testl %[left], %[left]\n\t" \
  "jz 7f\n\t"                  \
  "6:\n\t"                     \
  "pause\n\t"                  \
  "decl %[left]\n\t"           \
  "jnz 6b\n\t"                 \
  "7:\n\t"
#define PGMAP_RSEQ_WIDEN_OUT , [left] "=&r"(left)
#define PGMAP_RSEQ_WIDEN_IN , [spins] "r"(spins)
#else
#define PGMAP_RSEQ_WIDEN ""
#define PGMAP_RSEQ_WIDEN_OUT
#define PGMAP_RSEQ_WIDEN_IN
#endif
  // asm goto (volatile spelled out: GCC 12 drops an output-carrying asm goto whose outputs are
  // unused): leaving for the caller's slow path is a jump straight out of the section (which is
  // allowed: the kernel only looks at sections the instruction pointer is inside).
  asm volatile goto(
      ".pushsection __rseq_cs, \"aw?\"\n\t"
      ".balign 32\n\t"
      "3:\n\t"
      ".long 0, 0\n\t"
      ".quad 1f, 2f - 1f, 4f\n\t"
      ".popsection\n\t"
      "0:\n\t"
      "leaq 3b(%%rip), %[w]\n\t"
      "movq %[w], %%fs:%c[cs_off](%[area])\n\t"
      "1:\n\t"
      "movl %%fs:%c[cpu_off](%[area]), %k[cpu]\n\t"
      "movq %[word], %[w]\n\t"
      "testb $7, %b[w]\n\t"
      "jnz %l[flagged]\n\t"
      "shlq %[shift], %[cpu]\n\t" PGMAP_RSEQ_WIDEN
      "addq %[delta], (%[w], %[cpu])\n\t"
      "2:\n\t"
      ".pushsection __rseq_failure, \"ax?\"\n\t"
      ".long %c[sig]\n\t"
      "4:\n\t"
      "jmp 0b\n\t"
      ".popsection\n\t"
      : [w] "=&r"(w), [cpu] "=&r"(cpu)PGMAP_RSEQ_WIDEN_OUT
      : [word] "m"(*word), [delta] "er"(delta), [area] "r"(__rseq_offset),
        [cs_off] "i"(offsetof(struct rseq, rseq_cs)), [cpu_off] "i"(offsetof(struct rseq, cpu_id)),
        [shift] "J"(kCpuShift), [sig] "i"(RSEQ_SIG)PGMAP_RSEQ_WIDEN_IN
      : "memory", "cc"
      : flagged);
#undef PGMAP_RSEQ_WIDEN
#undef PGMAP_RSEQ_WIDEN_OUT
#undef PGMAP_RSEQ_WIDEN_IN
  return true;
flagged:
  return false;
}

// The floor of the technique, for benchmarks only (BM_RseqFloor, pgmap-bench's ref/rseq_floor):
// the same section without the word: arm, read cpu_id, add `delta` to *(cpu0 + (cpu <<
// kCpuShift)). It has no mode to test, so nothing can switch it off; PercpuRef never uses it.
// `cpu0` must be followed by one kCpuStride block per possible CPU.
[[gnu::always_inline]] inline void rseq_floor_add(std::atomic<std::uint64_t>* cpu0,
                                                  std::int64_t delta) noexcept {
  std::uintptr_t cs;
  std::uint64_t cpu;
  asm volatile(
      ".pushsection __rseq_cs, \"aw?\"\n\t"
      ".balign 32\n\t"
      "3:\n\t"
      ".long 0, 0\n\t"
      ".quad 1f, 2f - 1f, 4f\n\t"
      ".popsection\n\t"
      "0:\n\t"
      "leaq 3b(%%rip), %[cs]\n\t"
      "movq %[cs], %%fs:%c[cs_off](%[area])\n\t"
      "1:\n\t"
      "movl %%fs:%c[cpu_off](%[area]), %k[cpu]\n\t"
      "shlq %[shift], %[cpu]\n\t"
      "addq %[delta], (%[base], %[cpu])\n\t"
      "2:\n\t"
      ".pushsection __rseq_failure, \"ax?\"\n\t"
      ".long %c[sig]\n\t"
      "4:\n\t"
      "jmp 0b\n\t"
      ".popsection\n\t"
      : [cs] "=&r"(cs), [cpu] "=&r"(cpu)
      : [base] "r"(cpu0), [delta] "er"(delta), [area] "r"(__rseq_offset),
        [cs_off] "i"(offsetof(struct rseq, rseq_cs)), [cpu_off] "i"(offsetof(struct rseq, cpu_id)),
        [shift] "J"(kCpuShift), [sig] "i"(RSEQ_SIG)
      : "memory", "cc");
}

#endif  // PGMAP_PERCPU_RSEQ_INLINE

}  // namespace pgmap::detail
