#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the main job: the fused model against the reference on this device.
# The paper suite (--suite paper) also needs the bench extras (ONNX Runtime, matplotlib), installed for it.
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --suite"*) export SHVIT_SETUP_EXTRAS=${SHVIT_SETUP_EXTRAS:-test,bench} ;;
esac
bash tools/setup.sh
exec "${PYTHON:-python3}" -m shvit bench "$@"
