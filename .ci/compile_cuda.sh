#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc alone (no GPU, no CUDA build of torch needed):
# the kernels include only CUDA headers, so this catches compile errors and warnings on any machine with nvcc.
# Usage: .ci/compile_cuda.sh [arch ...]   (default: 80 90). Exits non-zero on any failure.
# A quick standalone check; CI runs .ci/build_cuda_ext.sh instead, which builds and links the real extension.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "compile_cuda: nvcc not found (set NVCC)" >&2; exit 2; }
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
[ ${#srcs[@]} -gt 0 ] || { echo "compile_cuda: no csrc/cuda/*.cu" >&2; exit 1; }
status=0
for arch in "${archs[@]}"; do
  for src in "${srcs[@]}"; do
    obj="$out/$(basename "$src" .cu).sm_$arch.o"
    if "$NVCC" -c "$src" -o "$obj" -std=c++17 -O3 --use_fast_math -Icsrc \
        -gencode "arch=compute_$arch,code=sm_$arch" -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror; then
      echo "ok   sm_$arch $src"
    else
      echo "FAIL sm_$arch $src" >&2
      status=1
    fi
  done
done

# Syntax-check the torch binding against whatever torch headers are installed (a CPU build lacks one generated
# CUDA header, stubbed below). Skip with SHVIT_CHECK_BINDINGS=0.
if [ "${SHVIT_CHECK_BINDINGS:-1}" = 1 ]; then
  if tinc=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__) + '/include')" 2>/dev/null) &&
     pinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])") && command -v g++ >/dev/null; then
    cinc=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
    [ -f "$cinc/cuda_runtime.h" ] || cinc=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include
    [ -f "$cinc/cuda_runtime.h" ] || cinc=${CUDA_HOME:-/usr/local/cuda}/include
    mkdir -p "$out/stub/c10/cuda/impl"
    [ -f "$tinc/c10/cuda/impl/cuda_cmake_macros.h" ] || : >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    if g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_C_cuda -Icsrc \
        -isystem "$tinc" -isystem "$tinc/torch/csrc/api/include" -isystem "$out/stub" -isystem "$pinc" \
        -isystem "$cinc" csrc/cuda/bindings.cpp; then
      echo "ok   g++ -fsyntax-only csrc/cuda/bindings.cpp"
    else
      echo "FAIL g++ -fsyntax-only csrc/cuda/bindings.cpp" >&2
      status=1
    fi
  else
    echo "skip bindings.cpp syntax check (no torch headers or g++)"
  fi
fi
exit $status
