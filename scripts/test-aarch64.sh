#!/usr/bin/env bash
# Builds the kernel tests for aarch64 and runs them under qemu, so the NEON kernels are held
# against their scalar twins too. Installs what it needs (rustup target, Debian's
# gcc-aarch64-linux-gnu and qemu-user) on first use; if those cannot be installed here, says so
# loudly and exits 0 (the x86 suite still ran).
set -euo pipefail
cd "$(dirname "$0")/.."

skip() { echo "SKIPPED aarch64 kernel tests: $*" >&2; exit 0; }

if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 || skip "rustup target add aarch64-unknown-linux-gnu failed"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; } >/dev/null 2>&1 \
    || skip "apt-get install gcc-aarch64-linux-gnu qemu-user failed"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_AARCH64:-target-aarch64}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test -p edgefusion-kernels --target aarch64-unknown-linux-gnu
