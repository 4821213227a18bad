#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. fetch the assets the tests read (default model, texts, tokenizer test vectors),
#   2. formatting and lints,
#   3. every test with the SIMD kernels the machine has,
#   4. every test again with SIMD disabled (scalar reference paths), and on AVX-512 machines
#      the runtime's tests with the AVX2 kernels (EDGEFUSION_ISA=avx2), whose arithmetic
#      follows llama.cpp's AVX2 build to the bit,
#   5. `edgefusion serve` on the default model driven by the official `openai` Python client
#      and its chat page by headless Chromium (scripts/test-serve-clients.sh: pip installs
#      openai, jsonschema and selenium into .venv-serve-tests, apt-get chromium when missing;
#      EDGEFUSION_SKIP_SERVE_CLIENTS=1 skips, EDGEFUSION_SKIP_BROWSER=1 skips the browser),
#   6. the kernel tests for aarch64 (NEON) under qemu, when the cross tools are installable.
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

if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "== runtime tests (EDGEFUSION_ISA=avx2: the AVX2 kernels, bit-exact against llama.cpp)"
  EDGEFUSION_ISA=avx2 cargo test -p edgefusion-runtime
fi

if [[ "${EDGEFUSION_SKIP_SERVE_CLIENTS:-0}" != 1 ]]; then
  echo "== edgefusion serve: the openai Python client and the chat page in Chromium"
  # The test profile (opt-level 2) reuses what the tests above compiled.
  cargo build --profile test -p edgefusion-cli
  scripts/test-serve-clients.sh --bin target/debug/edgefusion
fi

if [[ "${EDGEFUSION_SKIP_AARCH64:-0}" != 1 ]]; then
  echo "== kernel tests on aarch64 (NEON) under qemu"
  scripts/test-aarch64.sh
fi
