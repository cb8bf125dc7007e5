#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite on whatever device is here. The suite also checks the
# Triton kernels in Triton's CPU interpreter and the ONNX Runtime peer, so it installs Triton and the bench extras
# even on a CPU-only machine (SHVIT_WITH_TRITON=0 / SHVIT_SETUP_EXTRAS=test to leave them out: those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
export SHVIT_WITH_TRITON=${SHVIT_WITH_TRITON:-1} SHVIT_SETUP_EXTRAS=${SHVIT_SETUP_EXTRAS:-test,bench}
bash tools/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
