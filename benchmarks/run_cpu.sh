#!/usr/bin/env bash
# The CPU result set in benchmarks/results/: paper suite for S1 (224 px) and S4 (256 px), batch 16, fp32 and
# bf16, 1 and 2 threads, then the default op-microbenchmark grid, then the rendered table and plots.
# Time: roughly 3-6 min per paper run on a quiet 2-core machine (the default peers include torch.compile,
# about 1 min per compile at 224 px); the op grid takes a few minutes. Extra arguments go to every paper run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
for model in shvit_s1 shvit_s4; do
  for dtype in fp32 bf16; do
    for threads in 1 2; do
      "$PY" -m benchmarks.paper_protocol --model "$model" --batch-size 16 --device cpu --dtype "$dtype" \
        --threads "$threads" --warmup 1 --window 0.5 --rounds 5 "$@"
    done
  done
done
"$PY" -m pytest benchmarks/ --benchmark-only -q --shvit-threads 1 --shvit-time 0.3 \
  --benchmark-json benchmarks/results/ops_cpu_fp32.json
"$PY" benchmarks/render.py
