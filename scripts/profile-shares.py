#!/usr/bin/env python3
"""Classify the samples of `make profile` (scripts/profile.sh) and print, per workload and
strategy, the share spent in liveness work versus the rest, as a markdown table; also writes
OUT/shares.json.

Usage: scripts/profile-shares.py OUT_DIR   (reads OUT_DIR/<workload>-<strategy>.txt, the output of
       perf report --no-children --sort sym -F overhead,sym)

Categories (by demangled symbol name, first match wins):
  percpu_ref    PercpuRef and its heavy barrier (membarrier)
  rcu           RCU read sections and grace periods (pgmap::rcu, liburcu)
  strategy      the strategies' hooks and what only they do: pagemap lookup for liveness
                (get_dev_pagemap, PagemapRegistry::lookup), tryget_live, allocations (alloc_event),
                the sweep scan, the DAX device's liveness check, src/memory/strategy/*
  wait_table    the hashed wait table (waits and wakes of teardown)
  harness       pgmap-bench itself: the timed loops, the in-run floors (lock_pair,
                floor_batched), calibration. Excluded from the denominator.
  rest          everything else: page metadata, page tables, GUP, faults, the kernel, libc.
Limit: perf attributes inlined code to the function it was inlined into. PercpuRef's get/put
fast path and the strategies' inline checks are inlined into DevPagemap::get_folio / put_folio
and friends, so their cost counts as `rest`; the liveness shares are a lower bound.
"""
import json
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "out/profile"
CATEGORIES = [
    ("percpu_ref", re.compile(r"PercpuRef|heavy_barrier|membarrier")),
    ("rcu", re.compile(r"pgmap::rcu::|\burcu_|rcu_read|synchronize_rcu|ReadSection|call_rcu")),
    ("strategy", re.compile(r"[Ss]trategy|get_dev_pagemap|PagemapRegistry::lookup|tryget_live|"
                            r"Allocation|DevPagemap::sweep|DevPagemap::request|DaxDevice::alive|"
                            r"pagemap_ref|PagemapRef")),
    ("wait_table", re.compile(r"WaitTable")),
    ("harness", re.compile(r"pgmap::bench::|CLI::|nlohmann")),
]
LIVENESS = ("percpu_ref", "rcu", "strategy", "wait_table")
WORKLOADS = ("hotpath", "fault", "gup")
STRATEGIES = ("none", "per_lookup", "transition", "sweep", "alloc_event")
line_re = re.compile(r"^\s*([0-9.]+)%\s+(?:\[[^\]]+\]\s+)?(.*)$")


def classify(sym):
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
        for line in open(path, errors="replace"):
            m = line_re.match(line)
            if not m:
                continue
            pct, sym = float(m.group(1)), m.group(2).strip()
            cat = classify(sym)
            shares[cat] += pct
            if cat in LIVENESS:
                top[sym] = top.get(sym, 0) + pct
        work = sum(v for k, v in shares.items() if k != "harness")
        rel = {k: (100 * v / work if work else 0) for k, v in shares.items() if k != "harness"}
        results[f"{w}/{s}"] = {
            "workload": w, "strategy": s, "harness_pct_of_all": shares["harness"],
            "pct_of_workload": rel,
            "liveness_pct": sum(rel[c] for c in LIVENESS),
            "top_liveness_symbols": sorted(top.items(), key=lambda kv: -kv[1])[:3],
        }

json.dump(results, open(os.path.join(out, "shares.json"), "w"), indent=2)
print("| workload | strategy | liveness | percpu_ref | rcu | strategy hooks | wait table | rest |"
      " top liveness symbols (share of all samples) |")
print("|---|---|---|---|---|---|---|---|---|")
for key, r in results.items():
    p = r["pct_of_workload"]
    tops = "; ".join(f"{sym[:60]} {pct:.1f} %" for sym, pct in r["top_liveness_symbols"]) or "-"
    print(f"| {r['workload']} | {r['strategy']} | **{r['liveness_pct']:.1f} %** | "
          f"{p['percpu_ref']:.1f} % | {p['rcu']:.1f} % | {p['strategy']:.1f} % | "
          f"{p['wait_table']:.1f} % | {p['rest']:.1f} % | {tops} |")
print("\nShares of the workload's samples (pgmap-bench's own loops and in-run floors excluded); "
      "inlined fast paths count where they were inlined (a lower bound for liveness).")
