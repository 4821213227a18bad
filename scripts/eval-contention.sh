#!/usr/bin/env bash
# How long `edgefusion evaluate` takes on HellaSwag with and without one busy process beside
# it (a phone's UI, a laptop's browser), in alternating runs, and the ratio of the medians.
#
#   scripts/eval-contention.sh [--limit N] [--rounds 2] [--model FILE] [-- EXTRA evaluate ARGS]
#
# Without --limit the full validation set runs (10,042 items, ~24 min quiet at 2 threads on
# 2 cores). Each run uses the default thread count and no result cache.
set -euo pipefail
cd "$(dirname "$0")/.."

limit="" rounds=2 model="${EDGEFUSION_ASSETS:-assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --limit) limit=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "eval-contention: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -f "$model" ]] || { echo "eval-contention: $model missing (scripts/fetch-assets.sh --model)" >&2; exit 1; }
cargo build --release -q -p edgefusion-cli
ef=target/release/edgefusion
args=(evaluate -m "$model" --tasks hellaswag --tasks-dir "${EDGEFUSION_ASSETS:-assets}/tasks" --no-cache)
[[ ${#extra[@]} -eq 0 ]] || args+=("${extra[@]}")
[[ -n "$limit" ]] && args+=(--limit "$limit")

busy_pid=""
stop_busy() { [[ -z "$busy_pid" ]] || { kill "$busy_pid" 2>/dev/null || true; wait "$busy_pid" 2>/dev/null || true; busy_pid=""; }; }
out=$(mktemp)
trap 'stop_busy; rm -f "$out"' EXIT
echo "load: $(uptime)" >&2
quiet=() busy=()
for r in $(seq 1 "$rounds"); do
  for load in quiet busy; do
    [[ $load == busy ]] && { python3 -c 'while True: pass' & busy_pid=$!; sleep 1; }
    start=$(date +%s.%N)
    "$ef" "${args[@]}" > "$out" 2>&1 || { cat "$out" >&2; exit 1; }
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    stop_busy
    acc=$(grep -m1 -i "hellaswag" "$out" | tr -s ' ' || true)
    echo "[round $r $load] ${secs} s   $acc" >&2
    if [[ $load == quiet ]]; then quiet+=("$secs"); else busy+=("$secs"); fi
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mq=$(median "${quiet[@]}") mb=$(median "${busy[@]}")
printf '| HellaSwag items | quiet s (median) | 1 busy process s (median) | busy ÷ quiet |\n|---|---:|---:|---:|\n'
printf '| %s | %.1f | %.1f | %.2f |\n' "${limit:-all}" "$mq" "$mb" "$(echo "$mb / $mq" | bc -l)"
