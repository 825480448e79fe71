#!/usr/bin/env bash
# Runs the engine's aarch64 (NEON) path on an x86-64 machine: cross-builds the core crate's
# unit tests and the parity, agreement, gradient and GGUF tests for aarch64-unknown-linux-gnu
# and runs them under qemu user-mode emulation (correctness only: emulated timings mean nothing).
# Installs what it needs when it can (the Rust target through rustup; the cross linker, its C
# library and qemu through apt-get when running as root); otherwise it prints why and skips
# (exit 0) — or fails, with RLX_TEST_AARCH64=require.
# RLX_TEST_AARCH64_FULL=1 also runs the default-model tests (about 6 minutes under emulation).
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
    if [ "${RLX_TEST_AARCH64:-1}" = require ]; then
        echo "aarch64 tests could not run: $1" >&2
        exit 1
    fi
    echo "aarch64 tests skipped: $1"
    exit 0
}

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
have_tools() {
    command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64-static >/dev/null &&
        [ -e "$sysroot/lib/ld-linux-aarch64.so.1" ]
}

# (grep reads all of rustup's output: with -q it could exit early and fail the pipe.)
if ! rustup target list --installed 2>/dev/null | grep -x "$target" >/dev/null; then
    rustup target add "$target" >/dev/null 2>&1 || skip "the Rust target $target could not be installed"
fi
if ! have_tools && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Quiet on success, bounded in time; on failure the check below says what is missing.
    { timeout 300 apt-get update &&
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends \
            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static; } >/dev/null 2>&1 || true
fi
have_tools || skip "needs aarch64-linux-gnu-gcc, qemu-aarch64-static and an aarch64 C library in \
$sysroot (apt packages gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user-static)"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L $sysroot"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++

echo "== aarch64: cargo clippy (core crate)"
cargo clippy -p rlx --all-targets --target "$target" -- -D warnings

echo "== aarch64: core unit tests on NEON, then on the portable path"
cargo test -p rlx --lib --release --target "$target"
RLX_ISA=scalar cargo test -p rlx --lib --release --target "$target"

echo "== aarch64: parity, agreement, gradient and GGUF tests on NEON"
tests=(--test parity --test agreement --test gradients --test gguf)
if [ "${RLX_TEST_AARCH64_FULL:-0}" = 1 ]; then
    tests+=(--test default_model)
fi
cargo test -p rlx-tests --release --target "$target" "${tests[@]}"
