#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the main job: the fused model against the reference on this device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${PYTHON:-python3}" -m shvit bench "$@"
