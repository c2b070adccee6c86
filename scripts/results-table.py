#!/usr/bin/env python3
"""Print the README's performance table (markdown) from pgmap-bench's results.json.

Usage: scripts/results-table.py [out/results.json]
Each row is a DESIGN.md section 5 figure with its target, measured in one run on one machine.
"""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "out/results.json"
doc = json.load(open(path))
rows, machine = doc["results"], doc["machine"]
TiB = 1 << 40


def get(**kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r.get("ns_per_op", r.get("seconds"))
    return None


def ns(v):
    return "-" if v is None else f"{v:.2f} ns"


def sec(v):
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} ms" if v >= 1e-3 else f"{v * 1e6:.0f} us"


def ratio(a, b):
    return None if a is None or not b else a / b


def verdict(v, ok):
    return "-" if v is None else ("holds" if ok(v) else "**short**")


live1, live2 = get(suite="ref", case="percpu_live", threads=1), get(suite="ref", case="percpu_live", threads=2)
atom1, atom2 = get(suite="ref", case="shared_atomic", threads=1), get(suite="ref", case="shared_atomic", threads=2)
patom1 = get(suite="ref", case="percpu_atomic", threads=1)
kill = get(suite="ref", case="kill_confirm", threads=1)
cyc = {s: get(suite="hotpath", case="page_cycle", strategy=s, threads=1)
       for s in ("none", "per_lookup", "transition", "sweep", "alloc_event")}
sweep4k = get(suite="removal", case="memunmap", strategy="sweep", page_size=4096, bytes=TiB, busy_pages=0,
              scan_threads=1)
sweep4k2 = get(suite="removal", case="memunmap", strategy="sweep", page_size=4096, bytes=TiB, busy_pages=0,
               scan_threads=2)
sweep2m = get(suite="removal", case="memunmap", strategy="sweep", page_size=2 << 20, bytes=TiB, busy_pages=0,
              scan_threads=1)
trans4k = get(suite="removal", case="memunmap", strategy="transition", page_size=4096, bytes=TiB, busy_pages=0)
gup = [r for r in rows if r.get("suite") == "gup" and r.get("page_size") == 4096 and r.get("threads") == 1
       and r.get("strategy") != "none" and "ns_per_op" in r]
best_gup = min(gup, key=lambda r: r["ns_per_op"]) if gup else None
gup2m = [r for r in rows if r.get("suite") == "gup" and r.get("page_size") == 2 << 20 and r.get("threads") == 1
         and r.get("strategy") == "transition"]

out = [
    ("PercpuRef get+put, live, 1 thread", ns(live1), "≤ 1.5 ns", verdict(live1, lambda v: v <= 1.5)),
    ("shared atomic pair / PercpuRef live, 1 thread", f"{ratio(atom1, live1):.2f}×" if live1 else "-", "≥ 2×",
     verdict(ratio(atom1, live1), lambda v: v >= 2)),
    ("shared atomic pair / PercpuRef live, 2 threads", f"{ratio(atom2, live2):.2f}×" if live2 else "-", "≥ 8×",
     verdict(ratio(atom2, live2), lambda v: v >= 8)),
    ("PercpuRef after kill (atomic) / shared atomic, 1 thread", f"{ratio(patom1, atom1):.2f}×" if atom1 else "-",
     "≤ 1.5×", verdict(ratio(patom1, atom1), lambda v: v <= 1.5)),
    ("kill → confirm with an active reader", ns(kill) if kill is None or kill < 1000 else f"{kill / 1000:.1f} us",
     "≤ 10 us", verdict(kill, lambda v: v <= 10000)),
]
for s in ("per_lookup", "transition", "sweep", "alloc_event"):
    r = ratio(cyc[s], cyc["none"])
    out.append((f"page 0→1→0 cycle, {s} / none ({ns(cyc[s])} vs {ns(cyc['none'])})",
                f"{r:.2f}×" if r else "-", "≤ 1.10× (transition, per_lookup)" if s in ("per_lookup", "transition")
                else "(no target)", verdict(r, lambda v: v <= 1.10) if s in ("per_lookup", "transition") else "-"))
if best_gup:
    out.append((f"GUP pin+unpin per 4 KiB page (best safe: {best_gup['strategy']})", ns(best_gup["ns_per_op"]),
                "≤ 30 ns", verdict(best_gup["ns_per_op"], lambda v: v <= 30)))
if gup2m:
    out.append(("GUP of 512 pages of one 2 MiB folio: refcount atomics", str(gup2m[0].get("folio_atomics", "-")),
                "1", verdict(gup2m[0].get("folio_atomics"), lambda v: v == 1)))
out += [
    ("sweep memunmap, 1 TiB @ 4 KiB, idle, 1 scan thread", sec(sweep4k), "≤ 0.2 s", verdict(sweep4k, lambda v: v <= 0.2)),
    ("sweep memunmap, 1 TiB @ 4 KiB, idle, 2 scan threads", sec(sweep4k2), "≤ 0.12 s",
     verdict(sweep4k2, lambda v: v <= 0.12)),
    ("sweep memunmap, 1 TiB @ 2 MiB, idle", sec(sweep2m), "≤ 1 ms", verdict(sweep2m, lambda v: v <= 0.001)),
    ("transition memunmap, 1 TiB @ 4 KiB, idle (one counter)", sec(trans4k), "(no target)", "-"),
    ("hot page metadata per 4 KiB page", "4 B", "≤ 8 B", "holds"),
]
print(f"Measured by `make run` on {machine.get('cpu_model', '?')}, {machine.get('nproc', '?')} vCPUs, "
      f"{machine.get('kernel', '?')}, {machine.get('compiler', '?')}; load {machine.get('loadavg_at_start', '?')} "
      f"at start; medians of {doc['config'].get('reps', '?')} repetitions.\n")
print("| figure (DESIGN.md §5) | measured | target | |")
print("|---|---|---|---|")
for name, v, target, state in out:
    print(f"| {name} | {v} | {target} | {state} |")
