#!/usr/bin/env bash
# Regenerates include/rlx.h from ffi/src with cbindgen (through the header test's bless mode).
set -euo pipefail
cd "$(dirname "$0")/.."
RLX_BLESS=1 cargo test -q -p rlx-ffi --test header
echo "wrote include/rlx.h"
