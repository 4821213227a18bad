#!/usr/bin/env bash
# The hybrid against the dense model as docs/HYBRID.md reports it: perplexity (Moby-Dick, ctx
# 512 and 2048), unquantized and EFQ, HellaSwag and ARC-Challenge (200 items), passkey (20),
# decode at 4096 positions (the two models taking turns). Run after
# `edgefusion train --config configs/smollm2_135m.yaml --output-dir runs/smollm2` (~25 min).
set -u
cd "$(dirname "$0")/.."
RUN=${1:-runs/smollm2}
E=./target/release/edgefusion
D=assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
H=$RUN/checkpoint_final/model.gguf
Q=$RUN/checkpoint_quantized/model.gguf
ppl() { echo "$1 ctx $2: $($E perplexity -m $1 -f assets/text/moby-dick.txt --ctx $2 --chunks $3 -t 2 2>&1 | grep 'Final estimate' | tail -1)"; }
uptime
mkdir -p runs
for f in $D $H $Q; do ppl $f 512 10; ppl $f 2048 5; done
[ -f runs/dense.efq.gguf ] || $E quantize -m $D -o runs/dense.efq.gguf -t 2 > runs/dense.efq.log 2>&1
ppl runs/dense.efq.gguf 512 10; ppl runs/dense.efq.gguf 2048 5
for f in $D $H; do echo "== eval $f"; $E evaluate -m $f --tasks hellaswag,arc_challenge --limit 200 -t 2 2>&1 | grep -E "hellaswag|arc_challenge" | tail -4; done
for f in $D $H; do echo "== passkey $f"; $E evaluate -m $f --tasks passkey --limit 20 -t 2 --no-cache 2>&1 | grep -E "^passkey" | tail -2; done
for r in 1 2; do for f in $D $H; do echo "== bench $f (round $r)"; $E bench -m $f -p 0 -n 32 --ctx 4096,8192 -t 2 -r 1 2>&1 | grep -E "tg|KV|state|MiB" | tail -6; done; done
for r in 1 2; do for f in runs/dense.efq.gguf $Q; do echo "== bench $f (round $r)"; $E bench -m $f -p 0 -n 32 --ctx 4096,8192 -t 2 -r 1 2>&1 | grep -E "tg" | tail -3; done; done
