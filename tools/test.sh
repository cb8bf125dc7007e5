#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite on whatever device is here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
