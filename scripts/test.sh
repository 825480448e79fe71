#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust workspace (unit, parity, agreement,
# bad-input, GGUF, CLI and C ABI tests), the Python package's pytest suite, the aarch64 (NEON)
# path under emulation (scripts/test-aarch64.sh), and the fuzzers
# (each target for RLX_FUZZ_SECONDS, 60 by default; RLX_FUZZ_SECONDS=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== tools (numpy, pytest, maturin; cmake for the C/C++ examples)"
python3 -m pip install --quiet --root-user-action=ignore numpy pytest maturin cmake

# torch + transformers for the live parity tests against transformers (python/tests/
# test_parity.py): PyPI's torch is the CUDA build, about 3 GB to fetch and 4 GB installed, a few
# minutes. RLX_TEST_TORCH=0 skips it; if the install fails, those tests are skipped with a message
# (the committed transformers outputs are checked either way).
if [ "${RLX_TEST_TORCH:-1}" = 1 ]; then
    python3 -m pip install --quiet --no-cache-dir --root-user-action=ignore torch transformers ||
        echo "torch/transformers could not be installed: the live parity tests will be skipped"
fi

# Ray for the distributed tests (python/tests/test_distributed.py: a local two-node cluster).
# RLX_TEST_RAY=0 skips it; without Ray those tests are skipped with a message.
if [ "${RLX_TEST_RAY:-1}" = 1 ]; then
    python3 -m pip install --quiet --no-cache-dir --root-user-action=ignore "ray>=2.9" ||
        echo "Ray could not be installed: the distributed tests will be skipped"
fi

# NVRTC without a GPU, so that every CUDA kernel is compiled (sm_80, sm_90) by the tests: the
# wheel's libnvrtc goes on the loader's path, and RLX_REQUIRE_NVRTC=1 makes its absence a
# failure instead of a skip. RLX_TEST_NVRTC=0 skips it.
if [ "${RLX_TEST_NVRTC:-1}" = 1 ]; then
    if [ ! -e target/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ]; then
        python3 -m pip install --quiet --no-cache-dir --no-deps --root-user-action=ignore \
            --target target/nvrtc "nvidia-cuda-nvrtc-cu12>=12.4,<13"
    fi
    export LD_LIBRARY_PATH="$PWD/target/nvrtc/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export RLX_REQUIRE_NVRTC=1
fi

echo "== default model (for the real-model parity tests)"
./scripts/fetch_model.sh || echo "default model unavailable: its tests will be skipped"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace

echo "== python package"
./python/test.sh

# The NEON path, cross-built and run under qemu (skipped with a message where the cross tools
# cannot be installed; RLX_TEST_AARCH64=require makes that a failure, =0 skips it).
if [ "${RLX_TEST_AARCH64:-1}" != 0 ]; then
    ./scripts/test-aarch64.sh
fi

# The core crate type-checked for a non-Linux target (Windows), so Linux-only calls stay fenced.
# RLX_TEST_WINDOWS_CHECK=0 skips it; without the Rust target it is skipped with a message.
if [ "${RLX_TEST_WINDOWS_CHECK:-1}" = 1 ]; then
    echo "== cargo check (core crate, x86_64-pc-windows-gnu)"
    if rustup target add x86_64-pc-windows-gnu >/dev/null 2>&1; then
        cargo check -p rlx --target x86_64-pc-windows-gnu
    else
        echo "skipped: the Rust target x86_64-pc-windows-gnu could not be installed"
    fi
fi

if [ "${RLX_FUZZ_SECONDS:-60}" != 0 ]; then
    echo "== fuzzing"
    ./scripts/fuzz.sh
fi
