#!/usr/bin/env bash
# EdgeFusion's quantizers against llama.cpp's (SmolLM2-135M unless --model): per held-out text,
# one table of method, bits per weight, file size, perplexity (each engine's own perplexity tool,
# same windows), ΔPPL against the unquantized model, and pp512 / tg128 tokens/s.
#
#   scripts/quant-vs-llamacpp.sh [--model FILE.gguf] [--chunks 10] [--ctx 512] [--threads 2]
#       [--calib-tokens 16384] [--reps 2] [--no-bench] [--charts runs/quant-curve]
#       [--sizes "3.1 3.5 4.0 4.5 5.0 5.5"] [--types "IQ3_XXS Q3_K_S ..."]
#
# --no-bench skips the speed runs (e.g. a second context length over the same files);
# --sizes and --types measure a subset of EFQ's sizes and llama.cpp's types.
# LLAMACPP_BIN=DIR uses llama.cpp tools already built there instead of scripts/setup-llamacpp.sh.
#
# EdgeFusion: efq at 3.1, 3.5, 4.0, 4.5, 5.0 and 5.5 bpw, and rtn 3-bit (the baseline),
# calibrated on the State of the Union text. Charts: ΔPPL against linear bpw, one PNG per text.
# llama.cpp: IQ3_XXS, Q3_K_S, Q3_K_M, IQ4_XS, Q4_0, Q4_K_S, Q4_K_M, Q5_K_M, each with an
# importance matrix from the same calibration text.
# Texts: Moby-Dick, and the Wikipedia passages of BoolQ's validation set (from the task files).
# "Unquantized" is the file the model ships as (SmolLM2: Q4_1; no full-precision model exists in
# the registries); every quantization starts from it. Files go to assets/quant/ (git-ignored), named
# after the model file, and are reused by later runs.
set -euo pipefail
caller=$PWD
# A path given relative to where the script was called from.
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }
cd "$(dirname "$0")/.."

assets=${EDGEFUSION_ASSETS:-assets}
chunks=10 ctx=512 threads=2 calib_tokens=16384 reps=2 charts=runs/quant-curve bench=1
sizes="3.1 3.5 4.0 4.5 5.0 5.5" types="IQ3_XXS Q3_K_S Q3_K_M IQ4_XS Q4_0 Q4_K_S Q4_K_M Q5_K_M"
base="$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) base=$(from_caller "$2"); shift 2 ;;
    --no-bench) bench=0; shift ;;
    --sizes) sizes=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --calib-tokens) calib_tokens=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --charts) charts=$(from_caller "$2"); shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "quant-vs-llamacpp: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

calib="$assets/text/sotu.txt"
if [[ ! -f "$base" && "$base" == "$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  scripts/fetch-assets.sh --model
fi
[[ -f "$base" ]] || { echo "quant-vs-llamacpp: $base: no such model file (Gemma 3 270M: scripts/fetch-assets.sh --gemma3)" >&2; exit 1; }
tag=$(basename "$base" .gguf)
[[ -f "$calib" && -f "$assets/text/moby-dick.txt" ]] || scripts/fetch-assets.sh --text
[[ -f "$assets/tasks/boolq_validation.jsonl" ]] || scripts/fetch-assets.sh --tasks
wiki="$assets/text/boolq-passages.txt"
if [[ ! -f "$wiki" ]]; then
  # Each distinct passage once, in file order, separated by blank lines.
  python3 - "$assets/tasks/boolq_validation.jsonl" "$wiki.tmp" <<'PY'
import json, sys
seen, out = set(), []
for line in open(sys.argv[1], encoding="utf-8"):
    p = json.loads(line)["passage"].strip()
    if p and p not in seen:
        seen.add(p); out.append(p)
open(sys.argv[2], "w", encoding="utf-8").write("\n\n".join(out) + "\n")
PY
  mv "$wiki.tmp" "$wiki"
fi
texts=("moby-dick:$assets/text/moby-dick.txt" "wiki:$wiki")
if [[ -n "${LLAMACPP_BIN:-}" ]]; then
  bin=$LLAMACPP_BIN
else
  scripts/setup-llamacpp.sh >&2
  bin=.venv-llamacpp/llama.cpp-build/bin
fi
for tool in llama-bench llama-quantize llama-imatrix llama-perplexity; do
  [[ -x "$bin/$tool" ]] || { echo "quant-vs-llamacpp: $bin/$tool missing; run scripts/setup-llamacpp.sh or set LLAMACPP_BIN" >&2; exit 1; }
done
cargo build --release -q -p edgefusion-cli
ef=target/release/edgefusion
q="$assets/quant"
mkdir -p "$q"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# --- EdgeFusion files
declare -A ef_args=([rtn-3]="--method rtn --bits 3")
ef_methods=()
for size in $sizes; do
  ef_args[efq-$size]="--method efq --bpw $size"
  ef_methods+=("efq-$size")
done
ef_methods+=(rtn-3)
read -r -a llama_types <<< "$types"
for name in "${ef_methods[@]}"; do
  file="$q/$tag.$name.gguf"
  if [[ ! -f "$file" ]]; then
    echo "[edgefusion quantize $name]" >&2
    # shellcheck disable=SC2086
    "$ef" quantize -m "$base" -o "$file" ${ef_args[$name]} --calib "$calib" --calib-tokens "$calib_tokens" -t "$threads" >&2
  fi
done

# --- llama.cpp files (the importance matrix reads the same calibration text)
imatrix="$q/$tag.imatrix.sotu.dat"
if [[ ! -f "$imatrix" ]]; then
  echo "[llama-imatrix]" >&2
  "$bin/llama-imatrix" -m "$base" -f "$calib" -o "$imatrix" -c 512 --chunks $(( calib_tokens / 512 )) -t "$threads" >/dev/null 2>&1
fi
for type in "${llama_types[@]}"; do
  file="$q/$tag.$type.gguf"
  if [[ ! -f "$file" ]]; then
    echo "[llama-quantize $type]" >&2
    "$bin/llama-quantize" --allow-requantize --imatrix "$imatrix" "$base" "$file.tmp" "$type" "$threads" >/dev/null 2>&1
    mv "$file.tmp" "$file"
  fi
done

# --- perplexity and speed
ppl() { grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*' | sed 's/Final estimate: PPL = //'; }
for entry in "${texts[@]}"; do
  text=${entry%%:*} path=${entry#*:}
  echo "[perplexity on $text: base]" >&2
  "$ef" perplexity -m "$base" -f "$path" -c "$ctx" --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-$text-ef-base"
  "$bin/llama-perplexity" -m "$base" -f "$path" -c "$ctx" --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-$text-llama-base"
  for name in "${ef_methods[@]}"; do
    echo "[perplexity on $text: $name]" >&2
    "$ef" perplexity -m "$q/$tag.$name.gguf" -f "$path" -c "$ctx" --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-$text-ef-$name"
  done
  for type in "${llama_types[@]}"; do
    echo "[perplexity on $text: $type]" >&2
    "$bin/llama-perplexity" -m "$q/$tag.$type.gguf" -f "$path" -c "$ctx" --chunks "$chunks" -t "$threads" 2>&1 | ppl > "$out/ppl-$text-llama-$type"
  done
done
# Speed (unless --no-bench; the table then shows 0).
for name in "${ef_methods[@]}"; do
  if (( bench )); then
    echo "[bench: $name]" >&2
    "$ef" bench -m "$q/$tag.$name.gguf" -p 512 -n 128 -t "$threads" -r "$reps" -o json > "$out/bench-ef-$name.json"
  else
    echo "[]" > "$out/bench-ef-$name.json"
  fi
done
for type in "${llama_types[@]}"; do
  if (( bench )); then
    echo "[bench: $type]" >&2
    "$bin/llama-bench" -m "$q/$tag.$type.gguf" -p 512 -n 128 -t "$threads" -r "$reps" -o json > "$out/bench-llama-$type.json" 2>/dev/null
  else
    echo "[]" > "$out/bench-llama-$type.json"
  fi
done

"$ef" inspect "$base" | awk '/^params/ {print $2}' > "$out/params-millions"
# Weights of the layers' linear matrices (attention and feed-forward), from the source's roles.
"$ef" inspect "$base" | awk '$1 ~ /^(attn_[qkvo]|attn_output|ffn_gate|ffn_up|ffn_down)$/ {n += $2} END {print n}' > "$out/layer-weights"
python3 - "$out" "$q" "$ctx" "$chunks" "${ef_methods[*]}" "${llama_types[*]}" "$tag" <<'PY'
import json, os, struct, sys
out, q, ctx, chunks = sys.argv[1:5]
ef_methods, llama_types, tag = sys.argv[5].split(), sys.argv[6].split(), sys.argv[7]
params = float(open(os.path.join(out, "params-millions")).read().split()[0]) * 1e6

def linear_bpw(path, layer_weights):
    # Bits per weight of the layers' matrices (blk.*), read from the GGUF header alone (an
    # independent parse): a tensor's bytes run from its offset to the next tensor's.
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # the header (a 262K vocabulary takes 6 MiB)
    pos = 0
    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]
    def string():
        nonlocal pos
        n = take("Q"); s = data[pos:pos + n]; pos += n
        return s.decode()
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def value(t):
        nonlocal pos
        if t == 8: return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        pos += sizes[t]
    assert data[:4] == b"GGUF", path
    pos = 8
    n_tensors, n_kv = take("Q"), take("Q")
    align = 32
    for _ in range(n_kv):
        key = string(); t = take("I")
        start = pos; v = value(t)
        if key == "general.alignment": align = struct.unpack_from("<I", data, start)[0]
    infos = []
    for _ in range(n_tensors):
        name = string(); nd = take("I")
        dims = [take("Q") for _ in range(nd)]
        take("I"); infos.append((take("Q"), name))
    data_start = (pos + align - 1) // align * align
    infos.sort()
    end = os.path.getsize(path) - data_start
    total = 0
    for i, (off, name) in enumerate(infos):
        nxt = infos[i + 1][0] if i + 1 < len(infos) else end
        if name.startswith("blk.") and not name.endswith("norm.weight"):
            total += nxt - off
    return total * 8 / layer_weights


def ppl(name):
    text = open(os.path.join(out, name)).read().split()
    return float(text[0]), float(text[2])
def speed(name):
    rows = json.load(open(os.path.join(out, name)))
    return {("pp" if r["n_prompt"] > 0 else "tg"): r["avg_ts"] for r in rows}
layer_weights = int(open(os.path.join(out, "layer-weights")).read())
rows = [("edgefusion", n, f"{tag}.{n}.gguf", "ef", n) for n in ef_methods]
rows += [("llama.cpp", t, f"{tag}.{t}.gguf", "llama", t) for t in llama_types]
rows = [(e, m, f, k, n, linear_bpw(os.path.join(q, f), layer_weights)) for e, m, f, k, n in rows]
rows.sort(key=lambda r: r[5])
for text in ("moby-dick", "wiki"):
    print(f"### {text}, ctx {ctx}, {chunks} chunks")
    print()
    print("| engine | method | file bpw | linear bpw | MiB | PPL | ΔPPL | pp512 t/s | tg128 t/s |")
    print("| ------ | ------ | -------: | ---------: | --: | --: | ---: | --------: | --------: |")
    for engine, method, file, key, name, lbpw in rows:
        size = os.path.getsize(os.path.join(q, file))
        value, err = ppl(f"ppl-{text}-{key}-{name}")
        s = speed(f"bench-{key}-{name}.json")
        base = ppl(f"ppl-{text}-{key}-base")[0]
        print(f"| {engine} | {method} | {size * 8 / params:.3f} | {lbpw:.3f} | {size / 2**20:.1f} | {value:.2f} ± {err:.2f} | {value - base:+.2f} | {s.get('pp', 0):.1f} | {s.get('tg', 0):.1f} |")
        # The chart's points: the calibrated methods (rtn is off its scale); the y axis is
        # logarithmic, so a ΔPPL at or below 0.01 is drawn at 0.01.
        if not method.startswith("rtn"):
            with open(os.path.join(out, f"curve-{text}.tsv"), "a") as tsv:
                tsv.write(f"{engine}\t{method}\t{lbpw:.3f}\t{max(value - base, 0.01):.3f}\n")
    print()
    print(f"unquantized ({tag}): edgefusion PPL {ppl(f'ppl-{text}-ef-base')[0]:.2f}, llama.cpp PPL {ppl(f'ppl-{text}-llama-base')[0]:.2f}")
    print()
PY
mkdir -p "$charts"
for text in moby-dick wiki; do
  "$ef" chart "$out/curve-$text.tsv" -o "$charts/$text.png" --log-y \
    --title "$tag on $text (ctx $ctx, $chunks chunks): ΔPPL against bits per weight" \
    --x-label "bits per weight of the layers' linear matrices" --y-label "ΔPPL (log; ≤ 0.01 drawn at 0.01)" >&2
done
echo "charts: $charts/moby-dick.png $charts/wiki.png" >&2
