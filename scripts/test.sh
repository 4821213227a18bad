#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. fetch the assets the tests read (default model, texts, tokenizer test vectors),
#   2. formatting and lints,
#   3. every test with the SIMD kernels the machine has,
#   4. every test again with SIMD disabled (scalar reference paths),
#   5. the kernel tests for aarch64 (NEON) under qemu, when the cross tools are installable.
set -euo pipefail
cd "$(dirname "$0")/.."

export EDGEFUSION_REQUIRE_ASSETS=1   # tests that need fetched assets fail instead of skipping
scripts/fetch-assets.sh --model --text --vocab --tasks

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests (SIMD as detected)"
cargo test --workspace

echo "== tests (EDGEFUSION_NO_SIMD=1: scalar kernels)"
EDGEFUSION_NO_SIMD=1 cargo test --workspace

if [[ "${EDGEFUSION_SKIP_AARCH64:-0}" != 1 ]]; then
  echo "== kernel tests on aarch64 (NEON) under qemu"
  scripts/test-aarch64.sh
fi
