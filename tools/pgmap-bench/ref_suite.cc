// Suite `ref`: the reference-count primitives the strategies are built from, and the
// alternatives DESIGN.md §5 compares them with. Every case is one get+put pair per op on ONE
// object; with 2 threads both threads hammer that same object, which is the point: PercpuRef
// counts in per-CPU counters (per-thread slots in its fallback), the others share one cache line.
//
//   percpu_live    PercpuRef get+put in percpu (live) mode
//   percpu_atomic  the same after switch_to_atomic() (what every op costs after kill)
//   shared_atomic  std::atomic<int64_t> fetch_add(1) + fetch_sub(1)
//   shared_ptr     copy + destroy of one std::shared_ptr
//   urcu_ref       liburcu urcu_ref_get + urcu_ref_put
//   relaxed_floor  the floor of a per-CPU/per-thread count: two relaxed load+store increments
//                  (+1, -1) of a counter private to the thread (each thread its own line)
//   lock_pair      the floor of an atomic count: lock add + lock sub on a counter private to the
//                  thread (no sharing: what one uncontended refcount get+put costs at least)
//   rseq_floor     (only when PercpuRef uses rseq) the floor of the rseq technique: per get and
//                  per put one critical section (arm rseq_cs, read cpu_id, add to that CPU's
//                  counter) without PercpuRef's word load and flag test
//   kill_confirm   latency of PercpuRef::kill() (fold + confirm + initial put) while another
//                  thread keeps doing get/put on a different live PercpuRef
//   barrier_floor  the floor of kill_confirm: the process-wide barrier that kill's fold issues
//                  (membarrier PRIVATE_EXPEDITED_RSEQ for rseq, PercpuRef's heavy barrier for
//                  per-thread), called on its own, timed alternately with the kills under the
//                  same active reader
//
// Every loop has the same shape: the object's address is copied into a local before the loop,
// so it stays in a register, then each op is the pair followed by clobber_memory(). (The loops
// used to reach some objects through the lambda's captures; clobber_memory() then forced a
// reload of the capture on every op, and inside PercpuRef the rseq asm's memory clobber forced
// another before the put: two extra loads, each on the address path of the next section, which
// is 0.6-0.8 ns of the 2.6 ns percpu_live measured, while relaxed_floor and lock_pair had their
// counter in a register. Now every case pays the same loop.)
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sysinfo.h>
#include <urcu/ref.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench.h"
#include "compare.h"
#include "core/heavy_barrier.h"
#include "pgmap/core/percpu_ref.h"
#include "timing.h"

// Every measured loop starts on a 64-byte boundary. The op cache of this Zen 3 works in 64-byte
// windows; the same relaxed_floor loop measured 0.88 ns per pair when its 30 bytes sat inside one
// window and 1.5 ns when a rebuild moved it across a boundary, which swung the floor ratios by
// 1.7x for no change in the code measured. Aligning every case's loop the same way removes code
// placement from the comparison.
#pragma GCC optimize("align-loops=64")

namespace pgmap::bench {
namespace {

// Keeps a shared object alone on its cache lines (and off the adjacent-line prefetch pair), so
// the 2-thread figures are contention on that object only.
template <typename T>
struct alignas(128) Isolated {
  template <typename... Args>
  explicit Isolated(Args&&... args) : value(std::forward<Args>(args)...) {}
  T value;  // value-initialised (zero) when constructed without arguments
};

void urcu_noop_release(urcu_ref*) {}

Row ref_row(const std::string& name, unsigned threads, std::vector<double> ns) {
  Row row;
  row.suite = "ref";
  row.name = name;
  row.threads = threads;
  row.metric = Metric::ns_per_op;
  row.summary = summarize(std::move(ns));
  return row;
}

std::string label_of(const std::string& name, unsigned threads) {
  return fmt::format("ref {} threads={}", name, threads);
}

// rseq_floor's per-CPU counters: one block of 1 << kCpuShift bytes per possible CPU, like
// PercpuRef's, so both address their counter the same way.
struct RseqFloorCounters {
  RseqFloorCounters() {
    bytes = static_cast<std::size_t>(get_nprocs_conf()) << detail::kCpuShift;
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    cpu0 = mem == MAP_FAILED ? nullptr : static_cast<std::atomic<std::uint64_t>*>(mem);
  }
  ~RseqFloorCounters() {
    if (cpu0 != nullptr) munmap(cpu0, bytes);
  }
  RseqFloorCounters(const RseqFloorCounters&) = delete;
  RseqFloorCounters& operator=(const RseqFloorCounters&) = delete;
  // The sum over all CPUs (zero after balanced use).
  std::uint64_t sum() const {
    std::uint64_t s = 0;
    for (std::size_t off = 0; cpu0 != nullptr && off < bytes;
         off += std::size_t{1} << detail::kCpuShift)
      s += reinterpret_cast<const std::atomic<std::uint64_t>*>(reinterpret_cast<const char*>(cpu0) +
                                                               off)
               ->load();
    return s;
  }
  std::atomic<std::uint64_t>* cpu0 = nullptr;
  std::size_t bytes = 0;
};

struct RefObjects {
  explicit RefObjects(unsigned most_threads)
      : live([] {}), atomic([] {}), relaxed(most_threads), locked(most_threads) {}
  Isolated<PercpuRef> live;
  Isolated<PercpuRef> atomic;
  Isolated<std::atomic<std::int64_t>> shared;
  std::shared_ptr<Isolated<int>> shared_ptr = std::make_shared<Isolated<int>>();
  Isolated<urcu_ref> urcu;
  std::vector<Isolated<std::atomic<std::int64_t>>> relaxed;  // one per thread
  std::vector<Isolated<std::atomic<std::int64_t>>> locked;   // one per thread
  RseqFloorCounters rseq_floor;
};

ThreadBody body_of(RefObjects& o, const std::string& name) {
  if (name == "percpu_live" || name == "percpu_atomic") {
    PercpuRef* ref = name == "percpu_live" ? &o.live.value : &o.atomic.value;
    return [ref](unsigned, std::uint64_t ops) {
      PercpuRef* r = ref;  // a local: stays in a register (see "Every loop" above)
      for (std::uint64_t i = 0; i < ops; ++i) {
        (void)r->get();  // a live (or atomic-mode, not dead) ref: get and put cannot fail
        (void)r->put();
        clobber_memory();
      }
    };
  }
  if (name == "shared_atomic") {
    std::atomic<std::int64_t>* shared = &o.shared.value;
    return [shared](unsigned, std::uint64_t ops) {
      std::atomic<std::int64_t>* c = shared;
      for (std::uint64_t i = 0; i < ops; ++i) {
        c->fetch_add(1);
        c->fetch_sub(1);
        clobber_memory();
      }
    };
  }
  if (name == "shared_ptr") {
    const std::shared_ptr<Isolated<int>>* shared = &o.shared_ptr;
    return [shared](unsigned, std::uint64_t ops) {
      const std::shared_ptr<Isolated<int>>* s = shared;
      for (std::uint64_t i = 0; i < ops; ++i) {
        std::shared_ptr<Isolated<int>> copy(*s);
        asm volatile("" : : "r"(copy.get()) : "memory");
      }
    };
  }
  if (name == "urcu_ref") {
    urcu_ref* ref = &o.urcu.value;
    return [ref](unsigned, std::uint64_t ops) {
      urcu_ref* r = ref;
      for (std::uint64_t i = 0; i < ops; ++i) {
        urcu_ref_get(r);
        urcu_ref_put(r, urcu_noop_release);
        clobber_memory();
      }
    };
  }
#if PGMAP_PERCPU_RSEQ_INLINE
  if (name == "rseq_floor") {
    std::atomic<std::uint64_t>* counters = o.rseq_floor.cpu0;
    return [counters](unsigned, std::uint64_t ops) {
      std::atomic<std::uint64_t>* cpu0 = counters;
      for (std::uint64_t i = 0; i < ops; ++i) {
        detail::rseq_floor_add(cpu0, 1);
        detail::rseq_floor_add(cpu0, -1);
        clobber_memory();
      }
    };
  }
#endif
  if (name == "relaxed_floor") {
    return [&o](unsigned t, std::uint64_t ops) {
      std::atomic<std::int64_t>& c = o.relaxed[t].value;
      for (std::uint64_t i = 0; i < ops; ++i) {
        c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        clobber_memory();
        c.store(c.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
        clobber_memory();
      }
    };
  }
  // lock_pair
  return [&o](unsigned t, std::uint64_t ops) {
    std::atomic<std::int64_t>& c = o.locked[t].value;
    for (std::uint64_t i = 0; i < ops; ++i) {
      c.fetch_add(1);
      c.fetch_sub(1);
      clobber_memory();
    }
  };
}

constexpr const char* kRefCases[] = {"percpu_live", "percpu_atomic", "shared_atomic", "shared_ptr",
                                     "urcu_ref",    "relaxed_floor", "lock_pair",     "rseq_floor"};

bool rseq_floor_usable(const RefObjects& o) {
  return PGMAP_PERCPU_RSEQ_INLINE && PercpuRef::implementation() == "rseq" &&
         o.rseq_floor.cpu0 != nullptr;
}

Result<std::vector<Row>> run_ref_comparison(const Config& cfg) {
  const unsigned most_threads = *std::max_element(cfg.threads.begin(), cfg.threads.end());
  auto objects = std::make_unique<RefObjects>(most_threads);
  RefObjects& o = *objects;
  if (o.atomic.value.switch_to_atomic() != Errc::ok) {
    return Error(Errc::invalid_argument, "PercpuRef::switch_to_atomic failed");
  }
  if (!o.live.value.is_percpu()) {
    return Error(Errc::no_memory, "PercpuRef has no percpu slot: cannot run live mode");
  }
  urcu_ref_init(&o.urcu.value);

  Comparison c;
  c.name = "ref";
  for (unsigned threads : cfg.threads) {
    for (const char* name : kRefCases) {
      if (std::string_view(name) == "rseq_floor" && !rseq_floor_usable(o)) continue;
      Member m;
      m.row.suite = "ref";
      m.row.name = name;
      m.row.threads = threads;
      m.variant = loop_variant(label_of(name, threads), {threads, 1, cfg.min_rep_seconds},
                               body_of(o, name));
      c.members.push_back(std::move(m));
    }
  }
  const unsigned first = cfg.threads.front();
  for (Member& m : c.members) {
    const std::string& name = m.row.name;
    const unsigned t = m.row.threads;
    if (t != 1) m.baseline = find_member(c, name, "-", 1);
    if (name == "percpu_live" || name == "rseq_floor") {
      m.floor = find_member(c, "relaxed_floor", "-", t);
    } else if (name != "relaxed_floor" && name != "lock_pair") {
      m.floor = find_member(c, "lock_pair", "-", t);
    }
  }
  c.stability_floor = find_member(c, "relaxed_floor", "-", first);
  c.slice_seconds = kSliceSeconds;
  std::vector<Row> rows = run_comparison(cfg, c);

  // Every get was matched by a put: the kill must find exactly the initial reference.
  for (PercpuRef* r : {&o.live.value, &o.atomic.value}) {
    if (Errc e = r->kill(); e != Errc::ok || !r->is_zero()) {
      return Error(e == Errc::ok ? Errc::busy : e, "ref: PercpuRef unbalanced after the run");
    }
  }
  if (o.rseq_floor.sum() != 0) return Error(Errc::busy, "rseq_floor: counters do not sum to zero");
  if (o.shared.value.load() != 0) return Error(Errc::busy, "shared_atomic: count is not zero");
  if (o.shared_ptr.use_count() != 1) return Error(Errc::busy, "shared_ptr: use count is not 1");
  if (o.urcu.value.refcount != 1) return Error(Errc::busy, "urcu_ref: count is not 1");
  for (unsigned t = 0; t < most_threads; ++t) {
    if (o.relaxed[t].value.load() != 0 || o.locked[t].value.load() != 0) {
      return Error(Errc::busy, "relaxed_floor/lock_pair: count is not zero");
    }
  }
  return rows;
}

// kill_confirm. The reader runs on the second usable CPU, the killer on the first. A kill
// counts only if the reader made progress while it ran: when the reader is off its CPU (another
// process took it), the process-wide barrier has nobody to interrupt, which is not the case being
// measured. Such kills are retried, up to kMaxAttempts per wanted kill, and reported as
// "kills_discarded". A repetition keeps the median of up to cfg.kills_per_rep counted kills of
// fresh refs (each used once in percpu mode by the killer, so the fold has a slot to collect);
// the row is the median over the repetitions that counted any. If the reader never ran during a
// kill (a machine busy with other work), every kill is kept and "reader_ran" is false.
// Likewise a kill during which the killer itself was preempted (its involuntary context-switch
// count moved) measures the scheduler's time slice, not the kill (on a loaded machine such kills
// took 10-20 ms and made whole repetitions' medians read 12 ms): it is discarded too and
// reported as "kills_preempted".
constexpr std::uint64_t kReaderBatch = 64;  // reader ops between two progress marks (< 1 us)
constexpr std::uint64_t kMaxAttempts = 20;

// barrier_floor is timed in the same loop: every attempt times one kill and one bare barrier, in
// an order that alternates from attempt to attempt, and a barrier counts under the same rules as
// a kill (the reader ran through it, the killer was not preempted). kill_confirm's floor_ratio is
// the median over the repetitions of (median counted kill / median counted barrier) of that
// repetition: what a kill costs beyond the one system call it cannot avoid. On a KVM guest that
// call is an inter-processor interrupt to the reader's vCPU and back, whose cost is the host's.
struct KillTimes {
  std::vector<double> counted;  // per-repetition medians of the kills the reader ran through
  std::vector<double> all;      // per-repetition medians of the first kills, counted or not
  std::vector<double> barrier_counted;  // the same for the bare barriers
  std::vector<double> barrier_all;
  std::vector<double> ratios;   // per repetition: counted kill median / counted barrier median
  std::uint64_t discarded = 0;  // kills: the reader did not run (or the killer was preempted)
  std::uint64_t preempted = 0;  // of those, the killer was preempted
  std::uint64_t barrier_discarded = 0;  // the same for the barriers
  std::uint64_t barrier_preempted = 0;
  std::uint64_t failures = 0;
};

// The calling thread's involuntary context switches so far (0 if unknown).
long involuntary_switches() noexcept {
  rusage ru{};
  if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0;
  return ru.ru_nivcsw;
}

// Runs on the killer thread while `progress` is advanced by the reader.
KillTimes time_kills(const Config& cfg, const std::atomic<std::uint64_t>& progress) {
  KillTimes out;
  std::vector<double> counted;
  std::vector<double> all;
  std::vector<double> barrier_counted;
  std::vector<double> barrier_all;
  // Times `op` once; appends to `kept` when it counts (else to the discard tallies), to `first`
  // while it has room.
  auto timed = [&](auto&& op, std::vector<double>& kept, std::vector<double>& first,
                   std::uint64_t& discarded, std::uint64_t& preempted_count) {
    const long switches = involuntary_switches();
    const std::uint64_t before = progress.load(std::memory_order_relaxed);
    const auto t0 = SteadyClock::now();
    op();
    const double ns = seconds_since(t0) * 1e9;
    const bool reader_ran = progress.load(std::memory_order_relaxed) != before;
    const bool preempted = involuntary_switches() != switches;
    if (first.size() < cfg.kills_per_rep) first.push_back(ns);
    if (reader_ran && !preempted) {
      kept.push_back(ns);
      return;
    }
    ++discarded;
    if (preempted) ++preempted_count;
  };
  for (unsigned rep = 0; rep < cfg.reps; ++rep) {
    counted.clear();
    all.clear();
    barrier_counted.clear();
    barrier_all.clear();
    for (std::uint64_t attempt = 0;
         (counted.size() < cfg.kills_per_rep || barrier_counted.size() < cfg.kills_per_rep) &&
         attempt < kMaxAttempts * cfg.kills_per_rep;
         ++attempt) {
      PercpuRef victim([] {});
      (void)victim.get();
      (void)victim.put();
      Errc e = Errc::ok;
      auto kill = [&] { e = victim.kill(); };
      const bool kill_first = attempt % 2 == 0;
      if (kill_first) timed(kill, counted, all, out.discarded, out.preempted);
      timed(PercpuRef::kill_barrier, barrier_counted, barrier_all, out.barrier_discarded,
            out.barrier_preempted);
      if (!kill_first) timed(kill, counted, all, out.discarded, out.preempted);
      if (e != Errc::ok || !victim.is_zero()) ++out.failures;
    }
    if (!counted.empty()) out.counted.push_back(summarize(counted).median);
    out.all.push_back(summarize(all).median);
    if (!barrier_counted.empty()) out.barrier_counted.push_back(summarize(barrier_counted).median);
    out.barrier_all.push_back(summarize(barrier_all).median);
    if (!counted.empty() && !barrier_counted.empty())
      out.ratios.push_back(out.counted.back() / out.barrier_counted.back());
  }
  return out;
}

Result<std::vector<Row>> run_kill_confirm(const Config& cfg) {
  Isolated<std::atomic<bool>> stop;
  Isolated<std::atomic<std::uint64_t>> progress;
  Isolated<PercpuRef> reader_ref([] {});
  PercpuRef& rr = reader_ref.value;
  std::thread reader([&] {
    pin_to_cpu_index(1);
    PercpuRef* r = &rr;  // in a register, like the loops of the comparison
    std::uint64_t batches = 0;
    while (!stop.value.load(std::memory_order_relaxed)) {
      for (std::uint64_t i = 0; i < kReaderBatch; ++i) {
        (void)r->get();
        (void)r->put();
        clobber_memory();
      }
      progress.value.store(++batches, std::memory_order_relaxed);
    }
  });
  KillTimes times;
  std::thread killer([&] {
    pin_to_cpu_index(0);
    while (progress.value.load(std::memory_order_relaxed) == 0)
      std::this_thread::yield();
    times = time_kills(cfg, progress.value);
  });
  killer.join();
  stop.value.store(true, std::memory_order_relaxed);
  reader.join();
  if (rr.kill() != Errc::ok || !rr.is_zero()) {
    return Error(Errc::busy, "kill_confirm: reader's ref unbalanced after the run");
  }
  if (times.failures != 0) {
    return Error(Errc::busy, fmt::format("kill_confirm: {} kills failed", times.failures));
  }
  // Counted figures only when both the kills and the barriers have some (the floor ratio needs
  // both); otherwise every first attempt of each is kept and reader_ran is false.
  const bool reader_ran = !times.ratios.empty();
  Row row =
      ref_row("kill_confirm", 1, reader_ran ? std::move(times.counted) : std::move(times.all));
  row.extra["kills_per_rep"] = cfg.kills_per_rep;
  row.extra["kills_discarded"] = reader_ran ? times.discarded : 0;
  row.extra["kills_preempted"] = reader_ran ? times.preempted : 0;
  row.extra["reader_threads"] = 1;
  row.extra["reader_ran"] = reader_ran;
  if (reader_ran) {
    const Summary ratio = summarize(times.ratios);
    row.extra["floor_ratio"] = ratio.median;
    row.extra["floor_ratio_min"] = ratio.min;
    row.extra["floor_ratio_max"] = ratio.max;
  }
  row.note = reader_ran ? fmt::format(
                              "1 active reader, {} kills/rep, {} discarded ({} preempted), "
                              "floor: barrier_floor",
                              cfg.kills_per_rep, times.discarded, times.preempted)
                        : "reader never ran during a kill: busy machine";
  Row floor = ref_row("barrier_floor", 1,
                      reader_ran ? std::move(times.barrier_counted) : std::move(times.barrier_all));
  floor.extra["barriers_per_rep"] = cfg.kills_per_rep;
  floor.extra["barriers_discarded"] = reader_ran ? times.barrier_discarded : 0;
  floor.extra["barriers_preempted"] = reader_ran ? times.barrier_preempted : 0;
  floor.extra["reader_threads"] = 1;
  floor.extra["reader_ran"] = reader_ran;
  floor.extra["barrier"] = PercpuRef::implementation() == "rseq"
                               ? "membarrier PRIVATE_EXPEDITED_RSEQ"
                               : detail::heavy_barrier_name();
  floor.note =
      fmt::format("kill_confirm's floor: the barrier alone ({}), timed alternately with the kills",
                  floor.extra["barrier"].get<std::string>());
  std::vector<Row> rows;
  rows.push_back(std::move(row));
  rows.push_back(std::move(floor));
  return rows;
}

}  // namespace

std::vector<Case> ref_cases(const Config& cfg) {
  std::vector<Case> cases;
  Case ref;
  ref.label = fmt::format("ref: {} cases x threads {} interleaved", std::size(kRefCases),
                          fmt::join(cfg.threads, ","));
  ref.run_rows = [&cfg] { return run_ref_comparison(cfg); };
  cases.push_back(std::move(ref));
  Case kill;
  kill.label = "ref kill_confirm and barrier_floor with 1 active reader";
  kill.run_rows = [&cfg] { return run_kill_confirm(cfg); };
  cases.push_back(std::move(kill));
  return cases;
}

}  // namespace pgmap::bench
