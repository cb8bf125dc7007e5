#!/usr/bin/env bash
# Builds the CUDA binding shvit_kernels._C_cuda for real on a machine without a GPU, against a CUDA build of torch
# in a venv of its own, with the kernels' warnings as errors (sm_80 and sm_90), then loads it and checks that every
# op the cuda backend registers is bound and takes the op schema's arguments (.ci/check_cuda_binding.py).
#
# The venv (torch ${SHVIT_CUDA_TORCH_VERSION}, ~5 GB of nvidia wheels) lives outside the checkout and is reused by
# later runs: ${SHVIT_CUDA_VENV:-$HOME/.cache/shvit-ci/venv-cuda-torch<version>}. The build goes to a temporary
# folder, so the checkout gets no .so that the CPU torch of the test suite could not load.
# Env: CUDA_HOME (default /usr/local/cuda; must be the toolkit itself, not a folder holding an nvcc wrapper),
# MAX_JOBS (default: all cores), SHVIT_REQUIRE_CUDA_BUILD=1 (fail instead of skipping when there is no toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${SHVIT_CUDA_TORCH_VERSION:-2.14.1}
VENV=${SHVIT_CUDA_VENV:-$HOME/.cache/shvit-ci/venv-cuda-torch$TORCH_VERSION}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
t0=$SECONDS

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "build_cuda_ext: no CUDA toolkit at CUDA_HOME=$CUDA_HOME: the CUDA binding is not built in this run" >&2
  [ "${SHVIT_REQUIRE_CUDA_BUILD:-0}" = 1 ] && exit 1
  exit 0
fi

# Create or reuse the venv; a lock keeps concurrent CI runs from building it twice.
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys, torch, setuptools, ninja  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
EOF
}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if venv_ok; then
  echo "build_cuda_ext: reusing $VENV"
else
  echo "build_cuda_ext: creating $VENV (torch==$TORCH_VERSION with CUDA)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja >"$VENV.pip.log" 2>&1 ||
    { cat "$VENV.pip.log" >&2; echo "FAIL build_cuda_ext: pip install into $VENV" >&2; exit 1; }
  venv_ok || { echo "build_cuda_ext: $VENV has no CUDA torch $TORCH_VERSION after install" >&2; exit 1; }
fi
flock -u 9
t_venv=$((SECONDS - t0))

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "build_cuda_ext: building shvit_kernels._C_cuda (CUDA_HOME=$CUDA_HOME, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
if ! SHVIT_CPU_CAPABILITIES="" SHVIT_CUDA_WERROR=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp" >"$out/build.log" 2>&1; then
  cat "$out/build.log" >&2
  echo "FAIL build_cuda_ext: setup.py build_ext of shvit_kernels._C_cuda" >&2
  exit 1
fi
t_build=$((SECONDS - t0 - t_venv))
so=$(find "$out/lib" -name '_C_cuda*.so' | head -n1)
[ -n "$so" ] || { cat "$out/build.log" >&2; echo "FAIL build_cuda_ext: no _C_cuda*.so was built" >&2; exit 1; }
if find "$out/lib" -name '_C_cpu_*.so' | grep -q .; then
  echo "build_cuda_ext: note: a CPU variant was built too (SHVIT_CPU_CAPABILITIES='' should build none)" >&2
fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -W ignore::RuntimeWarning .ci/check_cuda_binding.py "$so"
echo "build_cuda_ext: ok (venv ${t_venv}s, build ${t_build}s, total $((SECONDS - t0))s)"
