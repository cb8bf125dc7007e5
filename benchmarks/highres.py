"""High-resolution backbone benchmark: SHViT as a dense-task backbone at 512, 1024 and 2048 px.

    python benchmarks/highres.py                                     # S1, 512/1024/2048 px, batch 1 and 8, CPU fp32
    python benchmarks/highres.py --device cuda --dtype bf16 --model shvit_s4
    python benchmarks/highres.py --sizes 256 --batches 1 --reps 1    # a quick smoke run

Each row is the fused ``create_model(..., features_only=True)`` backbone (all three stage maps, inference,
channels_last) run two ways: ``fused`` on this project's kernels (automatic backend choice) and ``plain``,
the same weights with plain PyTorch ops (``benchmarks/plain.py``). Reported: forward time (median and min
over ``--reps`` after one warm-up call) and peak memory of the forward above what was allocated before it:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak resident set
(``ru_maxrss``) over its resident set just before the first forward. Every row runs in a fresh process so
that peaks do not carry over. The attention of the last two stages is quadratic in tokens: at 2048 px
stage 2 has 64x64 = 4096 tokens (a 4096 x 4096 score matrix per image), stage 3 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_row(model_name: str, size: int, batch: int, variant: str, device_name: str, dtype_name: str, reps: int, threads) -> dict:
    """One measurement in this process (the parent starts one process per row)."""
    import torch

    import shvit

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = getattr(torch, DTYPES[dtype_name])
    backbone = shvit.create_model(model_name, features_only=True).eval().fuse()
    if variant == "plain":
        sys.path.insert(0, str(REPO))
        from benchmarks.plain import to_plain

        backbone = to_plain(backbone)
    backbone = backbone.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base, maxrss_before = _rss_bytes(), _maxrss_bytes()
        start = time.perf_counter()
        maps = backbone(x)
        sync()
        first_s = time.perf_counter() - start
        shapes = [list(m.shape) for m in maps]
        del maps
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = backbone(x)
            sync()
            times.append(time.perf_counter() - start)
            del out
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
            peak_note = "cuda max_memory_allocated"
        else:
            maxrss = _maxrss_bytes()
            peak = maxrss - base
            peak_note = "ru_maxrss growth" if maxrss > maxrss_before else "below the process's earlier peak (upper bound)"
    return dict(
        model=model_name, size=size, batch=batch, variant=variant, device=device_name, dtype=dtype_name,
        threads=torch.get_num_threads(), reps=reps, first_call_s=first_s, median_s=statistics.median(times),
        min_s=min(times), img_per_s=batch / statistics.median(times), peak_bytes=int(peak), peak_measure=peak_note,
        map_shapes=shapes,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shvit_s1")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variants", default="fused,plain", help="comma list of fused, plain")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=3, help="timed forwards per row, after one warm-up")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is recorded as failed")
    p.add_argument("--output", default=None, help="JSON file (default: results/highres_MODEL_DEVICE_DTYPE.json)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(**json.loads(args.row))))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("fused", "plain")]
    if bad or not variants:
        p.error(f"--variants: unknown {bad}; use fused and/or plain")
    if any(s < 64 or s % 16 for s in args.sizes):
        p.error("--sizes: SHViT needs multiples of 16, at least 64")
    rows = []
    print(f"{'size':>5} {'batch':>5} {'variant':>7} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'peak MiB':>9}")
    for size in args.sizes:
        for batch in args.batches:
            for variant in variants:
                spec = dict(model_name=args.model, size=size, batch=batch, variant=variant, device_name=args.device,
                            dtype_name=args.dtype, reps=args.reps, threads=args.threads)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(spec)]
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                    failure = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
                except subprocess.TimeoutExpired:
                    failure = f"timed out after {args.timeout:.0f} s"
                if failure:
                    row = dict(spec, error=failure)
                    print(f"{size:>5} {batch:>5} {variant:>7}  failed: {failure}")
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f"{size:>5} {batch:>5} {variant:>7} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} "
                          f"{row['img_per_s']:>8.2f} {row['peak_bytes'] / 2**20:>9.1f}")
                rows.append(row)
    output = Path(args.output) if args.output else RESULTS / f"highres_{args.model}_{args.device}_{args.dtype}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": "highres", "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
