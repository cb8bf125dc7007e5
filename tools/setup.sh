#!/usr/bin/env bash
# Install shvit-kernels for development: torch (pinned when none is installed), then the package with its
# C++ (and, on CUDA machines, CUDA) extensions built in place, plus test and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${SHVIT_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q --no-build-isolation -e ".[test,triton,bench]"
"$PY" -m shvit info
