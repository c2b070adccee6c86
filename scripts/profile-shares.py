#!/usr/bin/env python3
"""Classify the samples of `make profile` (scripts/profile.sh) and print, per workload and
strategy, the share spent in liveness work versus the rest, as a markdown table; also writes
OUT/shares.json.

Usage: scripts/profile-shares.py OUT_DIR   (reads OUT_DIR/<workload>-<strategy>.txt, the output of
       perf report --no-children --sort sym,srcfile -F overhead,sym,srcfile -t TAB)

Each sample is classified by the innermost source file of its address first (so PercpuRef's
fast path inlined into DevPagemap::get_folio counts as percpu_ref, from percpu_ref.h), then, for
files that say nothing (std headers such as atomic_base.h, or no debug info), by the demangled
name of the function it ran in. Categories (first match wins):
  percpu_ref    PercpuRef and its heavy barrier (membarrier)
  rcu           RCU read sections and grace periods (pgmap::rcu, liburcu)
  strategy      the strategies' hooks and what only they do: pagemap lookup for liveness
                (get_dev_pagemap, PagemapRegistry::lookup), tryget_live, allocations (alloc_event),
                the sweep scan, the DAX device's liveness check, the four strategy files
                (src/memory/strategy/{per_lookup,transition,sweep,alloc_event}.h; the refcount code
                every strategy shares, folio_refcount.h / strategy_ops.h / access.h, is rest), the fs
                entry's pagemap references (src/fs/entry_refs.*)
  wait_table    the hashed wait table (waits and wakes of teardown)
  harness       pgmap-bench itself: the timed loops, the in-run floors (lock_pair,
                floor_batched), calibration. Excluded from the denominator.
  rest          everything else: page metadata, page tables, GUP, faults, the kernel, libc.
Limits: a std::atomic operation inlined from a pgmap header reports atomic_base.h, so it is
classified by its function (DevPagemap::get_folio: rest) even when it is PercpuRef's atomic; the
strategies' checks written inside dev_pagemap.cc count as rest. The liveness shares are a lower
bound, and cpu-clock sampling (no hardware counters here) has skid of a few instructions.
"""
import json
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "out/profile"
FILES = [
    ("harness", re.compile(r"^(main|timing|compare|report|machine|ref_suite|hotpath_suite|"
                           r"removal_suite|dax_suites|fsdax_suite|gup_floor)\.(cc|h)$")),
    ("percpu_ref", re.compile(r"^(percpu_ref|heavy_barrier|rseq)")),
    ("rcu", re.compile(r"^(rcu|urcu)")),
    ("strategy", re.compile(r"^(per_lookup|transition|sweep|alloc_event)\.h$|pagemap_registry|"
                            r"pagemap_ref|entry_refs")),
    ("wait_table", re.compile(r"^wait_table")),
]
CATEGORIES = [
    ("harness", re.compile(r"pgmap::bench::|CLI::|nlohmann")),
    ("percpu_ref", re.compile(r"PercpuRef|heavy_barrier|membarrier")),
    ("rcu", re.compile(r"pgmap::rcu::|\burcu_|rcu_read|synchronize_rcu|ReadSection|call_rcu")),
    ("strategy", re.compile(r"get_dev_pagemap|PagemapRegistry::lookup|tryget_live|"
                            r"Allocation|DevPagemap::sweep|DevPagemap::request|DaxDevice::alive|"
                            r"pagemap_ref|PagemapRef|entry_refs|EntryRefs")),
    ("wait_table", re.compile(r"WaitTable")),
]
LIVENESS = ("percpu_ref", "rcu", "strategy", "wait_table")
WORKLOADS = ("hotpath", "fault", "gup", "fsdax")
STRATEGIES = ("none", "per_lookup", "transition", "sweep", "alloc_event")
sym_re = re.compile(r"^\s*(?:\[[^\]]+\]\s+)?(.*?)\s*$")


def classify(sym, srcfile):
    for name, rx in FILES:
        if srcfile and rx.search(srcfile):
            return name
    for name, rx in CATEGORIES:
        if rx.search(sym):
            return name
    return "rest"


results = {}
for w in WORKLOADS:
    for s in STRATEGIES:
        path = os.path.join(out, f"{w}-{s}.txt")
        if not os.path.exists(path):
            continue
        shares = {c: 0.0 for c, _ in CATEGORIES}
        shares["rest"] = 0.0
        top = {}
        rest = {}
        for line in open(path, errors="replace"):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not fields[0].strip().endswith("%"):
                continue
            pct = float(fields[0].strip().rstrip("%"))
            sym = sym_re.match(fields[1]).group(1)
            srcfile = fields[2].strip() if len(fields) > 2 else ""
            cat = classify(sym, srcfile)
            shares[cat] += pct
            key = f"{sym} ({srcfile})" if srcfile else sym
            if cat in LIVENESS:
                top[key] = top.get(key, 0) + pct
            elif cat == "rest":
                rest[sym] = rest.get(sym, 0) + pct
        work = sum(v for k, v in shares.items() if k != "harness")
        rel = {k: (100 * v / work if work else 0) for k, v in shares.items() if k != "harness"}
        results[f"{w}/{s}"] = {
            "workload": w, "strategy": s, "harness_pct_of_all": shares["harness"],
            "pct_of_workload": rel,
            "liveness_pct": sum(rel[c] for c in LIVENESS),
            "top_liveness_symbols": sorted(top.items(), key=lambda kv: -kv[1])[:3],
            "top_rest_symbols": sorted(rest.items(), key=lambda kv: -kv[1])[:2],
        }

json.dump(results, open(os.path.join(out, "shares.json"), "w"), indent=2)
print("| workload | strategy | liveness | percpu_ref | rcu | strategy hooks | wait table | rest |"
      " top liveness (% of all samples) | top rest |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key, r in results.items():
    p = r["pct_of_workload"]
    tops = "; ".join(f"{sym[:70]} {pct:.1f} %" for sym, pct in r["top_liveness_symbols"]) or "-"
    rest_top = "; ".join(f"{sym[:50]} {pct:.1f} %" for sym, pct in r["top_rest_symbols"]) or "-"
    print(f"| {r['workload']} | {r['strategy']} | **{r['liveness_pct']:.1f} %** | "
          f"{p['percpu_ref']:.1f} % | {p['rcu']:.1f} % | {p['strategy']:.1f} % | "
          f"{p['wait_table']:.1f} % | {p['rest']:.1f} % | {tops} | {rest_top} |")
print("\nShares of the workload's samples (pgmap-bench's own loops and in-run floors excluded); "
      "inlined code counts by its innermost source file (see the script's header for the limits).")
