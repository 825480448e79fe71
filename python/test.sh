#!/usr/bin/env bash
# Builds the rlx Python package from this checkout (maturin, release profile), installs it into
# the current Python, and runs its pytest suite. Offline: --no-build-isolation uses the maturin
# already installed instead of fetching one into an isolated build environment.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --no-build-isolation --root-user-action=ignore ./python
# From the repository root, so the source folder python/rlx (without the compiled module)
# cannot shadow the installed package.
python3 -m pytest python/tests -q "$@"
