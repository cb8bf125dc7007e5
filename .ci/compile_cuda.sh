#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with nvcc alone (no GPU, no CUDA build of torch needed):
# the kernels include only CUDA headers, so this catches compile errors and warnings on any machine with nvcc.
# Usage: .ci/compile_cuda.sh [arch ...]   (default: 80 90). Exits non-zero on any failure.
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
exit $status
