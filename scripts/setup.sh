#!/usr/bin/env bash
# Fresh-machine set-up: builds the `rlx` command (release build).
# Needs a Rust toolchain; crates come from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p rlx-cli
echo "built: target/release/rlx"
