#!/usr/bin/env bash
# Perplexity tables of a finished `edgefusion train` run (issue 4's acceptance):
#   1. the dense base, the run's hybrids at SSM shares 0.33 / 0.5 / the target / 1.0
#      (all hardened from the last router checkpoint), stage 2's distillation-only hybrid
#      and the quantized hybrid;
#   2. PPL against training tokens: every kept router checkpoint hardened at the target;
#   3. the cost of each layer alone: the dense model with only that layer on SSM (the last
#      checkpoint's trained SSM), beside the router's gate and route for it.
# Evaluation text: Moby-Dick (never the training or calibration text), ctx 512.
#
# Usage: scripts/hybrid-report.sh [CONFIG] [RUN_DIR] [CHUNKS]
#   defaults: configs/smollm2_135m.yaml runs/smollm2 10
# Writes RUN_DIR/report/*.gguf (hardened hybrids) and prints markdown.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-configs/smollm2_135m.yaml}
RUN=${2:-runs/smollm2}
CHUNKS=${3:-10}
TEXT=assets/text/moby-dick.txt
THREADS=${THREADS:-$(nproc)}
BIN=target/release/edgefusion
[ -x "$BIN" ] || cargo build --release -q -p edgefusion-cli
[ -f "$TEXT" ] || { echo "missing $TEXT: scripts/fetch-assets.sh --text" >&2; exit 1; }
[ -d "$RUN/checkpoints" ] || { echo "$RUN/checkpoints: no router checkpoints (train first)" >&2; exit 1; }

BASE=$(sed -n 's/^ *base: *\([^ #]*\).*/\1/p' "$CONFIG" | head -1)
TARGET=$(sed -n 's/^ *target_ssm_fraction: *\([0-9.]*\).*/\1/p' "$CONFIG" | head -1)
SEQ=$(sed -n 's/^ *seq_len: *\([0-9]*\).*/\1/p' "$CONFIG" | head -1)
BATCH=$(sed -n 's/^ *batch_size: *\([0-9]*\).*/\1/p' "$CONFIG" | head -1)
OUT="$RUN/report"
mkdir -p "$OUT"

ppl() {
    "$BIN" perplexity -m "$1" -f "$TEXT" -c 512 --chunks "$CHUNKS" -t "$THREADS" 2>/dev/null |
        sed -n 's/.*PPL = \([0-9.]*\).*/\1/p'
}
harden() { # step share output [layers] -> "n_ssm layers"
    local args=(--config "$CONFIG" --output-dir "$RUN" -o "$3")
    [ -n "$1" ] && args+=(--step "$1")
    [ -n "$2" ] && args+=(--ssm-fraction "$2")
    [ -n "${4:-}" ] && args+=(--ssm-layers "$4")
    "$BIN" harden "${args[@]}" | sed -n 's/^step [0-9]*: \([0-9]*\) of \([0-9]*\) layers on SSM.*/\1 of \2/p'
}

echo "## Perplexity on $TEXT (ctx 512, $CHUNKS chunks, $THREADS threads)"
echo
echo "| model | SSM layers | PPL |"
echo "|---|---:|---:|"
DENSE_PPL=$(ppl "$BASE")
echo "| dense ($(basename "$BASE")) | 0 | $DENSE_PPL |"
for share in 0.33 0.5 "$TARGET" 1.0; do
    f="$OUT/share_$share.gguf"
    layers=$(harden "" "$share" "$f")
    echo "| hybrid, last checkpoint hardened at share $share | $layers | $(ppl "$f") |"
done
if [ -f "$RUN/hybrid_distill.gguf" ]; then
    echo "| stage 2 only, layers by distillation error | $TARGET share | $(ppl "$RUN/hybrid_distill.gguf") |"
fi
if [ -f "$RUN/checkpoint_final/model.gguf" ]; then
    echo "| checkpoint_final (train's own hardening) | $TARGET share | $(ppl "$RUN/checkpoint_final/model.gguf") |"
fi
if [ -f "$RUN/checkpoint_quantized/model.gguf" ]; then
    echo "| checkpoint_quantized (EFQ) | $TARGET share | $(ppl "$RUN/checkpoint_quantized/model.gguf") |"
fi
echo
echo "## PPL against router training tokens (each kept checkpoint hardened at share $TARGET)"
echo
echo "| router step | training tokens | SSM layers | PPL |"
echo "|---:|---:|---:|---:|"
for dir in "$RUN"/checkpoints/step_*; do
    step=$((10#${dir##*_}))
    f="$OUT/step_$step.gguf"
    layers=$(harden "$step" "" "$f")
    echo "| $step | $((step * SEQ * BATCH)) | $layers | $(ppl "$f") |"
done
echo
echo "## The cost of each layer alone (dense with only that layer on SSM, last checkpoint)"
echo
echo "| layer | router gate | router route | PPL | vs dense |"
echo "|---:|---:|---|---:|---:|"
"$BIN" analyze-router --checkpoint "$RUN" --config "$CONFIG" |
    awk '$1 ~ /^[0-9]+$/ && ($3 == "ssm" || $3 == "attention") { print $1, $2, $3 }' |
    while read -r layer gate route; do
        f="$OUT/layer_$layer.gguf"
        harden "" "" "$f" "$layer" >/dev/null
        p=$(ppl "$f")
        echo "| $layer | $gate | $route | $p | $(awk -v p="$p" -v d="$DENSE_PPL" 'BEGIN { printf "%+.1f%%", 100 * (p / d - 1) }') |"
        rm -f "$f"
    done
