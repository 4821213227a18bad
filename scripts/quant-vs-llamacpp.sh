#!/usr/bin/env bash
# EdgeFusion's quantizers against llama.cpp's on SmolLM2-135M: one table of method, bits per
# weight, file size, perplexity on Moby-Dick (each engine's own perplexity tool, same windows),
# ΔPPL against the unquantized model, and pp512 / tg128 tokens/s.
#
#   scripts/quant-vs-llamacpp.sh [--chunks 10] [--threads 2] [--calib-tokens 16384] [--reps 2]
#
# EdgeFusion: efq at 3.1 bpw, gptq 4-bit, rtn 3-bit, calibrated on the State of the Union text.
# llama.cpp: IQ3_XXS with an importance matrix from the same calibration text, Q3_K_S, Q4_K_M.
# "Unquantized" is the Q4_1 file the model ships as (no full-precision SmolLM2 exists in the
# registries); every quantization starts from it. Files go to assets/quant/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

chunks=10 threads=2 calib_tokens=16384 reps=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --chunks) chunks=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --calib-tokens) calib_tokens=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "quant-vs-llamacpp: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

assets=${EDGEFUSION_ASSETS:-assets}
base="$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
calib="$assets/text/sotu.txt"
eval_text="$assets/text/moby-dick.txt"
[[ -f "$base" ]] || scripts/fetch-assets.sh --model
[[ -f "$calib" && -f "$eval_text" ]] || scripts/fetch-assets.sh --text
scripts/setup-llamacpp.sh >&2
bin=.venv-llamacpp/llama.cpp-build/bin
for tool in llama-bench llama-quantize llama-imatrix llama-perplexity; do
  [[ -x "$bin/$tool" ]] || { echo "quant-vs-llamacpp: $bin/$tool missing; run scripts/setup-llamacpp.sh" >&2; exit 1; }
done
cargo build --release -q -p edgefusion-cli
ef=target/release/edgefusion
q="$assets/quant"
mkdir -p "$q"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# --- EdgeFusion files
declare -A ef_args=(
  [efq-3.1]="--method efq --bpw 3.1"
  [gptq-4]="--method gptq --bits 4"
  [rtn-3]="--method rtn --bits 3"
)
for name in efq-3.1 gptq-4 rtn-3; do
  file="$q/smollm2.$name.gguf"
  if [[ ! -f "$file" ]]; then
    echo "[edgefusion quantize $name]" >&2
    # shellcheck disable=SC2086
    "$ef" quantize -m "$base" -o "$file" ${ef_args[$name]} --calib "$calib" --calib-tokens "$calib_tokens" -t "$threads" >&2
  fi
done

# --- llama.cpp files (the importance matrix reads the same calibration text)
imatrix="$q/imatrix.sotu.dat"
if [[ ! -f "$imatrix" ]]; then
  echo "[llama-imatrix]" >&2
  "$bin/llama-imatrix" -m "$base" -f "$calib" -o "$imatrix" -c 512 --chunks $(( calib_tokens / 512 )) -t "$threads" >/dev/null 2>&1
fi
for type in IQ3_XXS Q3_K_S Q4_K_M; do
  file="$q/smollm2.$type.gguf"
  if [[ ! -f "$file" ]]; then
    echo "[llama-quantize $type]" >&2
    "$bin/llama-quantize" --allow-requantize --imatrix "$imatrix" "$base" "$file.tmp" "$type" "$threads" >/dev/null 2>&1
    mv "$file.tmp" "$file"
  fi
done

# --- perplexity and speed
ppl() { grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*' | sed 's/Final estimate: PPL = //'; }
echo "[perplexity: base]" >&2
"$ef" perplexity -m "$base" -f "$eval_text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-ef-base"
"$bin/llama-perplexity" -m "$base" -f "$eval_text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-llama-base"
for name in efq-3.1 gptq-4 rtn-3; do
  file="$q/smollm2.$name.gguf"
  echo "[perplexity + bench: $name]" >&2
  "$ef" perplexity -m "$file" -f "$eval_text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-ef-$name"
  "$ef" bench -m "$file" -p 512 -n 128 -t "$threads" -r "$reps" -o json > "$out/bench-ef-$name.json"
done
for type in IQ3_XXS Q3_K_S Q4_K_M; do
  file="$q/smollm2.$type.gguf"
  echo "[perplexity + bench: $type]" >&2
  "$bin/llama-perplexity" -m "$file" -f "$eval_text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-llama-$type"
  "$bin/llama-bench" -m "$file" -p 512 -n 128 -t "$threads" -r "$reps" -o json > "$out/bench-llama-$type.json" 2>/dev/null
done

"$ef" inspect "$base" | awk '/^params/ {print $2}' > "$out/params-millions"
python3 - "$out" "$q" <<'PY'
import json, os, sys
out, q = sys.argv[1], sys.argv[2]
params = float(open(os.path.join(out, "params-millions")).read().split()[0]) * 1e6
def ppl(name):
    text = open(os.path.join(out, name)).read().split()
    return float(text[0]), float(text[2])
def speed(name):
    rows = json.load(open(os.path.join(out, name)))
    return {("pp" if r["n_prompt"] > 0 else "tg"): r["avg_ts"] for r in rows}
rows = [("edgefusion", n, f"smollm2.{n}.gguf", f"ppl-ef-{n}", f"bench-ef-{n}.json", "ppl-ef-base") for n in ("efq-3.1", "gptq-4", "rtn-3")]
rows += [("llama.cpp", t, f"smollm2.{t}.gguf", f"ppl-llama-{t}", f"bench-llama-{t}.json", "ppl-llama-base") for t in ("IQ3_XXS", "Q3_K_S", "Q4_K_M")]
print("| engine | method | file bpw | MiB | PPL (Moby-Dick) | ΔPPL | pp512 t/s | tg128 t/s |")
print("| ------ | ------ | -------: | --: | --------------: | ---: | --------: | --------: |")
for engine, method, file, p, b, base in rows:
    size = os.path.getsize(os.path.join(q, file))
    value, err = ppl(p)
    s = speed(b)
    print(f"| {engine} | {method} | {size * 8 / params:.3f} | {size / 2**20:.1f} | {value:.2f} ± {err:.2f} | {value - ppl(base)[0]:+.2f} | {s.get('pp', 0):.1f} | {s.get('tg', 0):.1f} |")
print()
print(f"unquantized (Q4_1): edgefusion PPL {ppl('ppl-ef-base')[0]:.2f}, llama.cpp PPL {ppl('ppl-llama-base')[0]:.2f}")
PY
