#!/usr/bin/env bash
# Decode and prefill speed while other programs compete for the CPUs, as on a phone or a
# laptop: for each competing load, edgefusion (and llama.cpp, and optionally an older
# edgefusion binary) take turns at each thread count, and the table gives the median
# tokens/s, the worst repetition against the median, and the ratios.
#
#   scripts/bench-contention.sh [--loads "none busy1 busy2 bursty"] [--threads 1,2,default]
#       [--rounds 2] [--reps 3] [-p 512] [-n 128] [--model FILE] [--baseline OLD_BINARY]
#       [--no-llamacpp]
#
# Loads: none; busy1 / busy2: one / two processes spinning without pause; bursty: one process
# that spins 5 ms and sleeps 5 ms. `default` runs each engine without a thread count.
# The last column counts edgefusion's runs whose layers settled on fewer threads than asked
# (runtime/src/tuner.rs). llama.cpp is used when scripts/setup-llamacpp.sh has built it
# (~30 min the first time); --baseline A/B-tests another edgefusion binary (e.g. one built
# before a change).
set -euo pipefail
cd "$(dirname "$0")/.."

loads="none busy1 busy2 bursty" threads=1,2,default rounds=2 reps=3 pp=512 tg=128
model="${EDGEFUSION_ASSETS:-assets}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
baseline="" llamacpp=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --loads) loads=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    -p) pp=$2; shift 2 ;;
    -n) tg=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --baseline) baseline=$2; shift 2 ;;
    --no-llamacpp) llamacpp=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench-contention: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for l in $loads; do
  case "$l" in none|busy1|busy2|bursty) ;; *) echo "bench-contention: unknown load '$l' (none, busy1, busy2, bursty)" >&2; exit 2 ;; esac
done
[[ -f "$model" ]] || { echo "bench-contention: $model missing (scripts/fetch-assets.sh --model)" >&2; exit 1; }
if [[ -n "$baseline" && ! -x "$baseline" ]]; then
  echo "bench-contention: --baseline $baseline is not an executable" >&2; exit 1
fi
lbench=.venv-llamacpp/llama.cpp-build/bin/llama-bench
if [[ $llamacpp == 1 && ! -x "$lbench" ]]; then
  echo "bench-contention: $lbench not built (scripts/setup-llamacpp.sh); edgefusion only" >&2
  llamacpp=0
fi
cargo build --release -q -p edgefusion-cli
ef=target/release/edgefusion

out=$(mktemp -d)
load_pids=()
stop_load() {
  for p in "${load_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${load_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  load_pids=()
}
trap 'stop_load; rm -rf "$out"' EXIT
start_load() {
  case "$1" in
    none) ;;
    busy1|busy2)
      for _ in $(seq 1 "${1#busy}"); do
        python3 -c 'while True: pass' & load_pids+=($!)
      done ;;
    bursty)
      python3 -c '
import time
while True:
    end = time.perf_counter() + 0.005
    while time.perf_counter() < end: pass
    time.sleep(0.005)' & load_pids+=($!) ;;
  esac
  sleep 1
}

engines="ef"
[[ -n "$baseline" ]] && engines="$engines base"
[[ $llamacpp == 1 ]] && engines="$engines llama"
echo "load: $(uptime)" >&2
for load in $loads; do
  start_load "$load"
  for r in $(seq 1 "$rounds"); do
    for t in ${threads//,/ }; do
      targ=(); [[ $t != default ]] && targ=(-t "$t")
      for e in $engines; do
        echo "[$load round $r/$rounds threads $t] $e" >&2
        f="$out/$load.$t.$e.$r.json"
        case "$e" in
          ef) "$ef" bench -m "$model" -p "$pp" -n "$tg" "${targ[@]}" -r "$reps" -o json > "$f" 2> "$f.err" || { cat "$f.err" >&2; exit 1; } ;;
          base) "$baseline" bench -m "$model" -p "$pp" -n "$tg" "${targ[@]}" -r "$reps" -o json > "$f" ;;
          llama) "$lbench" -m "$model" -p "$pp" -n "$tg" "${targ[@]}" -r "$reps" -o json > "$f" 2>/dev/null ;;
        esac
      done
    done
  done
  stop_load
done

python3 - "$out" "$engines" <<'PY'
import json, sys, glob, os, re, statistics
out, engines = sys.argv[1], sys.argv[2].split()
# edgefusion runs whose layers settled on fewer threads than asked, per (load, threads, test).
settled, ef_runs = {}, {}
names = {"ef": "edgefusion", "base": "baseline", "llama": "llama.cpp"}
rows = {}
for path in glob.glob(os.path.join(out, "*.json")):
    load, threads, engine, _ = os.path.basename(path).split(".")[:4]
    for r in json.load(open(path)):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] > 0 else f"tg{r['n_gen']}"
        rows.setdefault((load, threads, test, engine), []).extend(r["samples_ts"])
        if engine == "ef":
            ef_runs[(load, threads, test)] = ef_runs.get((load, threads, test), 0) + 1
    if engine == "ef" and os.path.exists(path + ".err"):
        for m in re.finditer(r"^(\w+) at \d+ threads: the layers settled on", open(path + ".err").read(), re.M):
            key = (load, threads, m.group(1))
            settled[key] = settled.get(key, 0) + 1
order = {"none": 0, "busy1": 1, "busy2": 2, "bursty": 3}
keys = sorted({k[:3] for k in rows}, key=lambda k: (order[k[0]], k[2], k[1]))
head = " | ".join(f"{names[e]} t/s (worst/median)" for e in engines)
ratios = " | ".join(f"edgefusion ÷ {names[e]}" for e in engines if e != "ef")
print(f"| load | threads | test | {head} | {ratios} | edgefusion ÷ its -t 1 | edgefusion runs on fewer threads |")
print("|" + "---|" * (5 + 2 * len(engines) - 1))
for load, threads, test in keys:
    med = {e: statistics.median(rows[(load, threads, test, e)]) for e in engines if (load, threads, test, e) in rows}
    worst = {e: min(rows[(load, threads, test, e)]) / med[e] for e in med}
    cells = " | ".join(f"{med[e]:.1f} ({worst[e]:.2f})" if e in med else "—" for e in engines)
    rat = " | ".join(f"{med['ef'] / med[e]:.2f}" if e in med and "ef" in med else "—" for e in engines if e != "ef")
    one = rows.get((load, "1", test, "ef"))
    own = f"{med['ef'] / statistics.median(one):.2f}" if one and "ef" in med else "—"
    fewer = f"{settled.get((load, threads, test), 0)}/{ef_runs.get((load, threads, test), 0)}"
    print(f"| {load} | {threads} | {test} | {cells} | {rat} | {own} | {fewer} |")
PY
