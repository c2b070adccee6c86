#include "core/rseq.h"

#include <linux/membarrier.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "pgmap/core/detail/rseq_percpu.h"
#include "pgmap/core/percpu_ref.h"

namespace pgmap::detail::rseq {
namespace {

constexpr std::size_t kCpuStride = std::size_t{1} << kCpuShift;
static_assert(kMaxPercpuRefs * sizeof(std::uint64_t) == kCpuStride,
              "one block of counters per CPU, kCpuStride apart");

// Highest possible CPU id + 1, from a list like "0-3,8-11"; 0 if unreadable.
[[maybe_unused]] unsigned read_possible_cpus() {
  std::FILE* f = std::fopen("/sys/devices/system/cpu/possible", "r");
  if (f == nullptr) return 0;
  char buf[256] = {};
  std::size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  unsigned long highest = 0;
  bool any = false;
  for (const char* p = buf; *p != '\0';) {
    if (*p < '0' || *p > '9') {
      ++p;
      continue;
    }
    char* end = nullptr;
    unsigned long v = std::strtoul(p, &end, 10);
    if (end == p) break;
    if (v > highest) highest = v;
    any = true;
    p = end;
  }
  if (!any || highest >= 65536) return 0;
  return static_cast<unsigned>(highest + 1);
}

struct Runtime {
  bool ok = false;
  const char* why =
      "not compiled in (needs x86-64, glibc >= 2.35, no ThreadSanitizer, no PGMAP_PERCPU_NO_RSEQ)";
  unsigned cpus = 0;
  std::atomic<std::uint64_t>* blocks = nullptr;

  Runtime() {
#if PGMAP_PERCPU_RSEQ_INLINE
    if (__rseq_size == 0) {
      why = "glibc did not register rseq (__rseq_size is 0)";
      return;
    }
    auto* area = reinterpret_cast<volatile struct ::rseq*>(
        static_cast<char*>(__builtin_thread_pointer()) + __rseq_offset);
    if (static_cast<std::int32_t>(area->cpu_id) < 0) {
      why = "rseq is not registered for this thread";
      return;
    }
    long cmds = syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    if (cmds < 0 || (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ) == 0) {
      why = "no MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ";
      return;
    }
    if (syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) != 0) {
      why = "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ failed";
      return;
    }
    cpus = read_possible_cpus();
    if (cpus == 0) {
      why = "cannot read /sys/devices/system/cpu/possible";
      return;
    }
    void* mem = mmap(nullptr, std::size_t{cpus} * kCpuStride, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      why = "cannot map the per-CPU counter blocks";
      return;
    }
    blocks = static_cast<std::atomic<std::uint64_t>*>(mem);  // zero-filled: every count is 0
    ok = true;
    why = nullptr;
#endif
  }
};

Runtime& runtime() {
  static Runtime* r = new Runtime;  // never destroyed: refs may be used after main returns
  return *r;
}

std::atomic<std::uint64_t>& at(std::uint32_t slot, unsigned cpu) {
  return runtime().blocks[std::size_t{cpu} * kMaxPercpuRefs + slot];
}

}  // namespace

bool available(const char** why) noexcept {
  const Runtime& r = runtime();
  if (why != nullptr) *why = r.why;
  return r.ok;
}

std::atomic<std::uint64_t>* counter(std::uint32_t slot) noexcept {
  return &at(slot, 0);
}

unsigned possible_cpus() noexcept {
  return runtime().cpus;
}

void barrier() noexcept {
  if (syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0) == 0) return;
  // Registration belongs to the mm; should it not be in force (this kernel carries it over fork,
  // percpu_ref_test KillWorksInAForkedChild), register again and retry.
  if (errno == EPERM &&
      syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) == 0 &&
      syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, 0, 0) == 0) {
    return;
  }
  std::fprintf(stderr, "pgmap: membarrier(PRIVATE_EXPEDITED_RSEQ) failed after registration\n");
  std::abort();
}

std::uint64_t collect(std::uint32_t slot, bool zero) noexcept {
  std::uint64_t sum = 0;
  for (unsigned cpu = 0; cpu < runtime().cpus; ++cpu) {
    std::atomic<std::uint64_t>& c = at(slot, cpu);
    std::uint64_t v = c.load(std::memory_order_relaxed);
    sum += v;
    if (zero && v != 0) c.store(0, std::memory_order_relaxed);  // untouched pages stay untouched
  }
  return sum;
}

}  // namespace pgmap::detail::rseq
