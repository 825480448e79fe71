#!/usr/bin/env bash
# The GPU check, in two halves because the GPU machine has no Rust toolchain and no network:
#
#   scripts/gpu-check.sh prepare   # here: builds the CUDA test binary and the GPU benchmark
#                                  # into target/gpu-check/ (debug info stripped)
#   scripts/gpu-check.sh run       # on the GPU machine (with target/gpu-check carried there)
#
# `run` puts the machine's own libnvrtc, libcublas and libcublasLt (from its CUDA or PyTorch
# install) on the loader's path, prints the device, and runs the CUDA tests: every kernel
# compiles for sm_80/sm_90 and for the device; the kernels with a CPU reference run on the GPU
# and are compared; and a model loaded on cuda:0 is compared with the CPU model (logits,
# log-probs, greedy tokens, sampling, gradients with and without checkpointing, value/score
# heads and the entropy term, LoRA, bf16 storage, SFT trainer steps with AdamW on the device,
# accumulation, checkpoint and resume). Then it
# times rlx on the GPU (tests/examples/gpu_bench.rs: a SmolLM2-135M-shaped Llama with random
# f32 weights: decode tok/s at batch 1 and 32, prefill of 512 tokens, log-probs of 8 × 256,
# one SFT training step on 4 × 256) and the same model in the machine's PyTorch
# (benches/gpu_torch.py, f32 and bf16; training f32), checks rlx's logits and first training
# loss against PyTorch's, and prints the ratio table. Every step has a time limit (120 + 150 +
# 180 s); the whole run stays under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    cargo test --release -p rlx-tests --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
            m["target"]["name"] == "cuda":
        print(m["executable"])' > /tmp/rlx-gpu-check-exe
    cargo build --release -p rlx-tests --example gpu_bench
    mkdir -p target/gpu-check
    # Without debug info: the carried tree has a size limit.
    objcopy --strip-debug "$(cat /tmp/rlx-gpu-check-exe)" target/gpu-check/cuda-tests
    objcopy --strip-debug "${CARGO_TARGET_DIR:-target}/release/examples/gpu_bench" \
        target/gpu-check/gpu-bench
    ls -l target/gpu-check
    echo "built target/gpu-check/{cuda-tests,gpu-bench}; carry target/gpu-check to the GPU machine"
    ;;
run)
    exe=target/gpu-check/cuda-tests
    bench=target/gpu-check/gpu-bench
    [ -x "$exe" ] || { echo "no $exe: run 'scripts/gpu-check.sh prepare' first" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
    # libnvrtc and libcublas: the CUDA toolkit's, else a Python install's (PyTorch ships both).
    find_lib() {
        python3 - "$1" <<'PY' 2>/dev/null || true
import glob, os, site, sys
name = sys.argv[1]
roots = site.getsitepackages() + [site.getusersitepackages(), "/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "**", name + ".so*"), recursive=True)):
        if "builtins" not in f and ".alt." not in f:
            print(os.path.dirname(f)); sys.exit(0)
PY
    }
    # rlx looks for libX.so, .so.12 and older names; a CUDA 13 install has .so.13 only, so
    # offer it under the plain name too (the API rlx calls is the same).
    alias_dir=$(mktemp -d)
    for name in libnvrtc libcublas libcublasLt; do
        lib=$(find_lib "$name")
        echo "$name from: ${lib:-the default loader path}"
        if [ -n "$lib" ]; then
            real=$(ls "$lib"/"$name".so* | grep -v -e builtins -e '\.alt\.' | head -1)
            ln -sf "$real" "$alias_dir/$name.so"
            export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            ls "$lib" | grep -i "$name" || true
        fi
    done
    export LD_LIBRARY_PATH="$alias_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export RLX_FIXTURES="$PWD/tests/fixtures" RLX_REQUIRE_NVRTC=1
    status=0
    timeout 120 "$exe" --test-threads=1 --nocapture || status=$?
    echo
    if [ -x "$bench" ]; then
        out=$(mktemp -d)
        if timeout 150 "$bench" "$out" cuda:0; then
            timeout 180 python3 benches/gpu_torch.py "$out" || status=$?
        else
            status=1
            echo "gpu-bench failed; no timings"
        fi
        rm -rf "$out"
    else
        echo "no $bench: timings skipped"
    fi
    exit $status
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
