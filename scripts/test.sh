#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust workspace (unit, parity,
# agreement, bad-input, CLI and C ABI tests) and the Python package's pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace

echo "== python package"
./scripts/python_tests.sh
