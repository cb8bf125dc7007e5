#!/usr/bin/env bash
# The tests against timm's own SHViT (shvit.accelerate, features_only's feature_info, a timm distillation teacher)
# need timm, and timm needs torchvision, which has no build for the CPU torch 2.13.0 the main suite pins (installing
# it replaces that torch). They run here instead, in the CUDA-torch venv of .ci/build_cuda_ext.sh (torch 2.14.1
# runs on a CPU) with torchvision 0.29.1 (on this machine's disk) and timm added, and fail if timm does not import,
# so none of them can pass by skipping. The venv has no CPU build of the extension: the ops run their reference
# kernels there (the main suite checks every backend against those).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${SHVIT_CUDA_TORCH_VERSION:-2.14.1}
VENV=${SHVIT_CUDA_VENV:-$HOME/.cache/shvit-ci/venv-cuda-torch$TORCH_VERSION}
PY=$VENV/bin/python
[ -x "$PY" ] || { echo "timm_tests: no venv at $VENV (.ci/build_cuda_ext.sh makes it)" >&2; exit 1; }

exec 9>"$VENV.lock"
flock 9
if ! "$PY" -c "import timm.models.shvit, torchvision, pytest, tqdm, PIL" 2>/dev/null; then
  echo "timm_tests: adding torchvision, timm and pytest to $VENV"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==0.29.1" timm pytest tqdm Pillow >"$VENV.timm.log" 2>&1 ||
    { cat "$VENV.timm.log" >&2; echo "FAIL timm_tests: pip install" >&2; exit 1; }
fi
flock -u 9
"$PY" -c "import torch, timm; print(f'timm_tests: torch {torch.__version__}, timm {timm.__version__}')"

# A copy of the checkout's Python packages only: in-place builds of the extension for another torch stay out.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r shvit shvit_kernels tests pyproject.toml "$work/"
for spec in "${SHVIT_SPEC_DIR:-}" "$PWD/shared/spec" "$PWD/../shared/spec"; do  # the authors' reference logits
  if [ -n "$spec" ] && [ -f "$spec/shvit_s1_reference.pt" ]; then export SHVIT_SPEC_DIR=$(cd "$spec" && pwd); break; fi
done
find "$work" -name '_C_*.so' -delete
cd "$work"
SHVIT_REQUIRE_TIMM=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_accelerate.py tests/test_features.py tests/test_distill.py
