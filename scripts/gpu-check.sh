#!/usr/bin/env bash
# The GPU check, in two halves because the GPU machine has no Rust toolchain and no network:
#
#   scripts/gpu-check.sh prepare   # here: builds the CUDA test binary into target/gpu-check/
#   scripts/gpu-check.sh run       # on the GPU machine (with target/gpu-check carried there)
#
# `run` puts the machine's own libnvrtc (from its PyTorch/CUDA install) on the loader's path,
# prints the device, and runs the CUDA tests: every kernel compiles for sm_80/sm_90 and for the
# device, and the kernels that have a CPU reference (RMSNorm, SwiGLU, RoPE, AdamW, log-softmax
# gather, prefill attention) are run on the GPU and compared. It finishes in well under a
# minute.
#
# Not checked yet, because it does not exist: a model on the GPU (cuBLAS products and the
# backend that launches these kernels), so there is no decode/prefill/log-prob/training timing
# against PyTorch to print; `run` says so at the end.
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
    mkdir -p target/gpu-check
    # Without debug info: the carried tree has a size limit.
    objcopy --strip-debug "$(cat /tmp/rlx-gpu-check-exe)" target/gpu-check/cuda-tests
    echo "built target/gpu-check/cuda-tests; carry target/gpu-check to the GPU machine"
    ;;
run)
    exe=target/gpu-check/cuda-tests
    [ -x "$exe" ] || { echo "no $exe: run 'scripts/gpu-check.sh prepare' first" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
    # libnvrtc: the CUDA toolkit's, else a Python install's (PyTorch ships one).
    lib=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages(), "/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "**", "libnvrtc.so*"), recursive=True)):
        if "builtins" not in f and ".alt." not in f:
            print(os.path.dirname(f)); sys.exit(0)
PY
)
    if [ -n "$lib" ]; then
        # rlx looks for libnvrtc.so, .so.12 and older names; a CUDA 13 install has .so.13
        # only, so offer it under the plain name too (the API rlx calls is the same).
        alias_dir=$(mktemp -d)
        real=$(ls "$lib"/libnvrtc.so* | grep -v -e builtins -e '\.alt\.' | head -1)
        ln -s "$real" "$alias_dir/libnvrtc.so"
        export LD_LIBRARY_PATH="$alias_dir:$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    echo "libnvrtc from: ${lib:-the default loader path}"
    ls "$lib" 2>/dev/null | grep -i nvrtc || true
    export RLX_FIXTURES="$PWD/tests/fixtures" RLX_REQUIRE_NVRTC=1
    "$exe" --test-threads=1 --nocapture
    echo
    echo "model-level GPU timings (decode, prefill, log-probs, training vs PyTorch): not built yet"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
