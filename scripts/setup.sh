#!/usr/bin/env bash
# Fresh-machine set-up: builds the `rlx` command (release), builds and installs the Python
# package (`import rlx`) into the current Python, and fetches the default model.
# Needs a Rust toolchain and Python 3 with pip. For the C/C++ library: scripts/install_c.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p rlx-cli
python3 -m pip install --quiet --root-user-action=ignore maturin numpy
# --no-build-isolation: use the maturin just installed (no isolated build environment to fetch).
python3 -m pip install --quiet --no-build-isolation --root-user-action=ignore ./python
./scripts/fetch_model.sh
echo "ready: target/release/rlx, the Python package rlx (default model in models/)"
