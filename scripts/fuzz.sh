#!/usr/bin/env bash
# Fuzz EdgeFusion's readers with cargo-fuzz (libFuzzer, nightly toolchain):
#
#   scripts/fuzz.sh [--time SECONDS] [TARGET ...]
#
# Targets: gguf train_config tokenizer_json chat_template hf_folder efq_blob task_jsonl
# (what each does with its input: fuzz/src/entries.rs).
#
# Each target runs --time seconds (default 60) from a corpus in fuzz/corpus/<target>/ seeded
# with the repository's fixtures, with 512 MB RSS and malloc limits (an allocation out of
# proportion to a small input is a bug). A crash lands in fuzz/artifacts/<target>/: fix it,
# then copy the input to fuzz/regressions/<target>/ so that `cargo test` replays it on stable
# (crates/edgefusion-cli/tests/fuzz_regressions.rs). libFuzzer's whole output goes to
# fuzz/logs/<target>.log; the last coverage line and the run count are printed. Installs
# cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60 targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --time) secs=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    gguf|train_config|tokenizer_json|chat_template|hf_folder|efq_blob|task_jsonl) targets+=("$1"); shift ;;
    *) echo "fuzz: unknown target or option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(gguf train_config tokenizer_json chat_template hf_folder efq_blob task_jsonl)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Seeds built in memory by the regression test (Hugging Face folders made from the GGUF
# fixtures, EFQ blobs, task lines) land in fuzz/corpus/<target>/.
mkdir -p fuzz/logs
EDGEFUSION_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test -q -p edgefusion-cli \
  --test fuzz_regressions > fuzz/logs/seeds.log 2>&1 ||
  { cat fuzz/logs/seeds.log >&2; echo "fuzz: the seeds' regression test failed" >&2; exit 1; }

for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus"
  case "$t" in
    gguf) cp -n tests/fixtures/*.gguf "$corpus/" ;;
    train_config) cp -n configs/*.yaml "$corpus/" ;;
    tokenizer_json) [[ -f assets/models/tokenizer.json ]] && cp -n assets/models/tokenizer.json "$corpus/" || true ;;
    chat_template) printf '%s' "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" > "$corpus/chatml" ;;
  esac
  cp -n fuzz/regressions/"$t"/* "$corpus/" 2>/dev/null || true
  mkdir -p fuzz/logs
  log="fuzz/logs/$t.log"
  echo "== fuzz $t for ${secs}s (log: $log)" >&2
  status=0
  cargo +nightly fuzz run "$t" "$corpus" -- -max_total_time="$secs" -print_final_stats=1 \
    -rss_limit_mb=512 -malloc_limit_mb=512 -max_len=1048576 -timeout=10 > "$log" 2>&1 || status=$?
  # The last coverage line, the run count and any crash.
  grep -E '^#[0-9]+' "$log" | tail -n 1 || true
  grep -E '^Done |^stat::number_of_executed_units|^stat::peak_rss_mb|SUMMARY|artifact_prefix|Test unit written' "$log" || true
  [[ $status -eq 0 ]] || { echo "fuzz: $t stopped with status $status: see $log and fuzz/artifacts/$t/" >&2; exit "$status"; }
done
