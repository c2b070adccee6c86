#!/usr/bin/env bash
# Checks the Promela models of the teardown protocols with spin, exhaustively.
#
#   model/check.sh [-j N] [-k] [--table FILE]
#
# Every model must pass (no assertion violation, no invalid end state, and the liveness claim
# holds under weak fairness), and every mutant, design alternative and control must be refuted.
# Exit status 0 only if all runs gave the expected verdict. Prints one line per run with the
# states stored, memory and time pan reported; --table also writes them as a Markdown table.
# -j N runs N checks at a time (default: MODEL_JOBS or 2); -k keeps the work directory.
# Runs (name | model | spin -D options | mode | expected [| cc optimisation]):
#   mode safety: pan compiled with -DNOCLAIM (assertions + invalid end states), ./pan
#   mode live:   pan with the ltl claim `terminates` and -DNFAIR=3, ./pan -a -f (weak fairness)
#   mode unfair: the same claim without -f (a control: must find a cycle)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
jobs=${MODEL_JOBS:-2}
keep=0
table=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -j) jobs=$2; shift 2 ;;
    -k) keep=1; shift ;;
    --table) table=$2; shift 2 ;;
    *) echo "usage: $0 [-j N] [-k] [--table FILE]" >&2; exit 2 ;;
  esac
done

command -v spin >/dev/null || { echo "check.sh: spin not found (Debian package 'spin')" >&2; exit 2; }
CC=${CC:-cc}
command -v "$CC" >/dev/null || { echo "check.sh: no C compiler ($CC)" >&2; exit 2; }

runs=(
  # the models as specified: must pass
  "percpu_ref|percpu_ref||safety|pass"
  "percpu_ref.live|percpu_ref|SMALL|live|pass"
  "percpu_ref_atomic|percpu_ref|INIT_ATOMIC|safety|pass|-O0"
  "percpu_ref_atomic.live|percpu_ref|INIT_ATOMIC|live|pass|-O0"
  "percpu_ref_rseq|percpu_ref_rseq||safety|pass"
  "percpu_ref_rseq.live|percpu_ref_rseq|MIGRATIONS=1|live|pass"
  "percpu_ref_rseq.stray_put|percpu_ref_rseq|STRAY_PUT|safety|pass"
  "sweep|sweep||safety|pass|-O0"
  "sweep.live|sweep||live|pass|-O0"
  "sweep_lean|sweep|LEAN|safety|pass|-O0"
  "sweep_lean.live|sweep|LEAN|live|pass|-O0"
  # mutants: spin must refute each
  "percpu_ref/fold_before_barrier|percpu_ref|MUT_FOLD_BEFORE_BARRIER|safety|refute"
  "percpu_ref/no_barrier|percpu_ref|MUT_NO_BARRIER|safety|refute"
  "percpu_ref/check_before_flag|percpu_ref|MUT_CHECK_BEFORE_FLAG|safety|refute"
  "percpu_ref_atomic/no_live_check|percpu_ref|INIT_ATOMIC MUT_NO_LIVE_CHECK|safety|refute"
  "percpu_ref_rseq/plain_barrier|percpu_ref_rseq|MUT_PLAIN_BARRIER|safety|refute"
  "percpu_ref_rseq/fold_before_barrier|percpu_ref_rseq|MUT_FOLD_BEFORE_BARRIER|safety|refute"
  "percpu_ref_rseq/unbias_first|percpu_ref_rseq|STRAY_PUT MUT_UNBIAS_FIRST|safety|refute"
  "sweep/no_freeing|sweep|MUT_NO_FREEING|safety|refute"
  "sweep/check_before_add|sweep|MUT_CHECK_BEFORE_ADD|safety|refute"
  "sweep/backout_sub|sweep|MUT_BACKOUT_SUB|safety|refute"
  "sweep/no_poll|sweep|MUT_NO_POLL|safety|refute"
  "sweep/old_back_out|sweep|MUT_OLD_BACKOUT|safety|refute"
  "sweep/no_owed_mark|sweep|MUT_NO_OWED_MARK|safety|refute"
  "sweep_lean/killed_before_cas|sweep|LEAN MUT_LEAN_KILLED_BEFORE_CAS|safety|refute"
  "sweep_lean/no_poll_needed|sweep|LEAN MUT_NO_POLL|safety|pass"
  # design alternatives of the FREEING protocol
  "sweep/alt_wake_before_zero|sweep|ALT_WAKE_BEFORE_ZERO|safety|refute"
  "sweep/alt_blind_add|sweep|ALT_BLIND_ADD|safety|refute"
  # control: without fairness the spin on `active` may starve the store-buffer drain
  "percpu_ref.unfair|percpu_ref|SMALL|unfair|refute"
)

work=$(mktemp -d "${TMPDIR:-/tmp}/pgmap-model.XXXXXX")
if [[ $keep -eq 0 ]]; then trap 'rm -rf "$work"' EXIT; else echo "check.sh: work directory $work"; fi

# one_run NAME MODEL DEFINES MODE EXPECT: leaves "$work/NAME.result" (one line).
one_run() {
  local name=$1 model=$2 defines=$3 mode=$4 expect=$5 optlevel=${6:-}
  local dir="$work/${name//\//_}"
  mkdir -p "$dir"
  cp "$here/$model.pml" "$dir/"
  local dargs=() d
  for d in $defines; do dargs+=("-D$d"); done
  local t0 t1
  t0=$(date +%s.%N)
  (
    cd "$dir"
    spin "${dargs[@]}" -a "$model.pml" >spin.out 2>&1 || { echo "spin failed" >>spin.out; exit 3; }
    # -O1: compiling pan.c at -O2 costs more than it saves on searches of this size.
    local opt=-O1 cflags=() pflags=(-m200000 -w21)
    # Small searches (and refuted runs, which stop at the first error) do not repay optimising.
    [[ $expect == refute ]] && opt=-O0 && pflags=(-m200000 -w18)
    [[ -n $optlevel ]] && opt=$optlevel
    case $mode in
      safety) cflags=(-DNOCLAIM) ;;
      live) cflags=(-DNFAIR=3); pflags+=(-a -f) ;;
      unfair) pflags+=(-a) ;;
    esac
    "$CC" "$opt" -w "${cflags[@]}" -o pan pan.c >cc.out 2>&1 || exit 3
    ./pan "${pflags[@]}" >pan.out 2>&1 || true
  ) || true
  t1=$(date +%s.%N)
  local out="$dir/pan.out" errors states mem search secs verdict ok
  if [[ ! -s $out ]]; then
    echo "$name|$mode|$expect|-|-|-|-|build failed|FAIL" >"$work/${name//\//_}.result"
    return
  fi
  errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$out" | tail -1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$out" | tail -1)
  mem=$(sed -n 's/^ *\([0-9.]*\)[[:space:]]*total actual memory usage.*/\1/p' "$out" | tail -1)
  search=$(sed -n 's/^pan: elapsed time \([0-9.e+-]*\) seconds.*/\1/p' "$out" | tail -1)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  verdict="passed"
  if [[ -z $errors ]]; then
    verdict="no verdict"
  elif [[ $errors -gt 0 ]]; then
    verdict=$(grep -m1 -E '^pan:[0-9]+:|^pan: ' "$out" | sed 's/^pan:[0-9]*: *//; s/ (at depth.*//')
    # '|' separates the fields of the result line (and the Markdown table's cells)
    verdict=${verdict//||/ or }
    verdict=${verdict//|/ or }
  fi
  ok=FAIL
  if grep -q "max search depth too small" "$out"; then
    verdict="search depth too small"
  elif [[ $expect == pass && $errors == 0 ]]; then
    ok=ok
  elif [[ $expect == refute && -n $errors && $errors -gt 0 ]]; then
    ok=ok
  fi
  echo "$name|$mode|$expect|${states:--}|${mem:--}|${search:--}|$secs|$verdict|$ok" >"$work/${name//\//_}.result"
}

start=$(date +%s)
running=0
for r in "${runs[@]}"; do
  IFS='|' read -r name model defines mode expect optlevel <<<"$r"
  one_run "$name" "$model" "$defines" "$mode" "$expect" "$optlevel" &
  running=$((running + 1))
  if [[ $running -ge $jobs ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

fail=0
lines=()
for r in "${runs[@]}"; do
  IFS='|' read -r name _ <<<"$r"
  line=$(cat "$work/${name//\//_}.result")
  lines+=("$line")
  IFS='|' read -r n mode expect states mem search secs verdict ok <<<"$line"
  printf '%-4s %-36s %-6s %-6s %9s states %8s MB search %5s s, all %5s s  %s\n' \
    "$ok" "$n" "$mode" "$expect" "$states" "$mem" "$search" "$secs" "$verdict"
  [[ $ok == ok ]] || fail=1
done
total=$(($(date +%s) - start))

if [[ -n $table ]]; then
  {
    echo "| run | mode | expected | states stored | memory (MB) | search (s) | with spin + cc (s) | verdict |"
    echo "|---|---|---|---|---|---|---|---|"
    for line in "${lines[@]}"; do
      IFS='|' read -r n mode expect states mem search secs verdict ok <<<"$line"
      echo "| \`$n\` | $mode | $expect | $states | $mem | $search | $secs | $verdict |"
    done
  } >"$table"
fi

if [[ $fail -ne 0 ]]; then
  echo "model check: FAILED (a model failed or a mutant passed) in ${total} s"
  exit 1
fi
echo "model check: ${#runs[@]} runs as expected (models pass, mutants refuted) in ${total} s"
