#!/usr/bin/env bash
# `make profile`: where does the time of the page cycle, fault, GUP and fsdax workloads go, per
# liveness strategy? Records each workload under each strategy with perf (cpu-clock: this VM exposes no
# hardware counters), using pgmap-bench as the workload (`--suite X --strategy Y --threads 1`),
# then scripts/profile-shares.py classifies the samples (liveness work vs the rest) and prints a
# markdown table, also written to OUT/shares.md and OUT/shares.json. docs/profiles.md has a run.
#
# Usage: scripts/profile.sh [BUILD_DIR] [OUT_DIR]     (defaults build/release, out/profile)
# perf comes from Debian's linux-perf; when it is missing this installs it (root or sudo needed).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
out=${2:-out/profile}
bench="$build/tools/pgmap-bench/pgmap-bench"
[[ -x "$bench" ]] || { echo "profile: $bench not built (make build)" >&2; exit 1; }

if ! command -v perf >/dev/null 2>&1; then
  echo "profile: perf not found; installing linux-perf"
  SUDO=
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends linux-perf
fi

mkdir -p "$out"
strategies=(none per_lookup transition sweep alloc_event)
workloads=(hotpath fault gup fsdax)
reps=${PROFILE_REPS:-3}
for w in "${workloads[@]}"; do
  for s in "${strategies[@]}"; do
    data="$out/$w-$s.data"
    echo "profile: $w under $s"
    perf record -q -e cpu-clock -F 2000 -o "$data" -- \
      "$bench" --suite "$w" --strategy "$s" --threads 1 --reps "$reps" --no-plot \
      --out "$out/bench-$w-$s" >/dev/null 2>"$out/$w-$s.log"
    # Self time per (function, innermost source file): code inlined from percpu_ref.h or rcu.h
    # into DevPagemap::get_folio is attributed to its own header, not to get_folio.
    perf report -i "$data" --no-children --sort sym,srcfile --stdio -q --percent-limit 0.05 \
      -F overhead,sym,srcfile -t $'\t' 2>/dev/null >"$out/$w-$s.txt"
  done
done
python3 scripts/profile-shares.py "$out" | tee "$out/shares.md"
