#!/usr/bin/env bash
# Runs the tests that Miri can run (nightly component `miri`; installed when missing):
#
#   scripts/miri.sh [io] [kernels]          (both by default)
#
# io: the tests of edgefusion-io (GGUF and safetensors readers, writer, durable renames);
#     under Miri the files are read into memory instead of mapped (src/mapped.rs).
# kernels: the scalar kernels' tests: the 32-wide formats, the k-quants, the EFQ blob parser
#     and the packing of interleaved rows (Miri has no SIMD detection: scalar twins only).
# Under Miri the proptests run 8 cases and the truncation tests every 7th cut (cfg!(miri)),
# and the one timing test is ignored: Miri is ~1000x slower than native code.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,13p' "$0"; exit 0 ;; esac
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(io kernels)
cargo +nightly miri --version >/dev/null 2>&1 || rustup component add --toolchain nightly miri rust-src
# Tests create and read files: isolation off.
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"
for part in "${parts[@]}"; do
  case "$part" in
    io) cargo +nightly miri test -p edgefusion-io --tests ;;
    # The products of whole matrices (efq::tests::matmul_*, the SIMD comparisons) take hours
    # under Miri; the block formats, their quantizers and the EFQ parser run in minutes.
    kernels) cargo +nightly miri test -p edgefusion-kernels --lib -- formats:: kquants:: pack:: ggml_type:: \
        efq::tests::blob_round_trips efq::tests::hostile_blobs_never_panic efq::tests::invalid_parts ;;
    *) echo "miri: unknown part $part (io, kernels)" >&2; exit 2 ;;
  esac
done
