#!/usr/bin/env bash
# The one-call GPU check (see tools/gpu_check.py): bash tools/gpu_check.sh [--dry-run] [--budget SECONDS].
# Results go to $OUT when set, else benchmarks/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
