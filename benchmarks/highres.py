"""High-resolution backbone benchmark: SHViT as a dense-task backbone at 512, 1024 and 2048 px.

    python benchmarks/highres.py                                     # S1, 512/1024/2048 px, batch 1 and 8, CPU fp32
    python benchmarks/highres.py --device cuda --dtype bf16 --model shvit_s4
    python benchmarks/highres.py --sizes 256 --batches 1 --rounds 1  # a quick smoke run

Each row is the fused ``create_model(..., features_only=True)`` backbone (all three stage maps, inference,
channels_last) run two ways: ``fused`` on this project's kernels (automatic backend choice) and ``plain``,
the same weights with plain PyTorch ops (``benchmarks/plain.py``). Per (size, batch), in a process of its own:
the two variants timed interleaved (``shvit.bench.measure``: a warm-up call, then ``--rounds`` rounds of one
``--window`` each; median and min over rounds), then each variant's peak memory of one forward (after a
warm-up forward) in a fresh process (CUDA: the allocator's peak; CPU: the growth of the peak resident set).
The attention of the last two stages is quadratic in tokens: at 2048 px stage 2 has 64x64 = 4096 tokens (a 4096 x 4096 score matrix per
image), stage 3 1024.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
VARIANTS = ("fused", "plain")


def _backbone(model_name: str, size: int, batch: int, variant: str, device_name: str, dtype_name: str):
    import torch

    import shvit
    from benchmarks.plain import to_plain

    device, dtype = torch.device(device_name), getattr(torch, DTYPES[dtype_name])
    torch.manual_seed(0)
    backbone = shvit.create_model(model_name, features_only=True).eval().fuse()
    if variant == "plain":
        backbone = to_plain(backbone)
    backbone = backbone.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return backbone, x


def peak_of_one_forward(spec: dict) -> dict:
    """In a fresh process: the peak memory of one forward, after a warm-up forward."""
    import torch

    from benchmarks.device import PeakMemory

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    backbone, x = _backbone(**{k: v for k, v in spec.items() if k != "threads"})
    with torch.inference_mode():
        backbone(x)  # one-time initialisation outside the measurement
        with PeakMemory(x.device) as peak:
            maps = backbone(x)
    return dict(peak_bytes=int(peak.bytes), peak_measure=peak.measure, map_shapes=[list(m.shape) for m in maps])


def time_row(spec: dict) -> dict:
    """In a process of its own: every variant of one (size, batch), interleaved; then each one's peak memory."""
    import torch

    from shvit import bench
    from benchmarks.device import run_in_fresh_process

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    variants, x = [], None
    for variant in spec["variants"]:
        backbone, x = _backbone(spec["model_name"], spec["size"], spec["batch"], variant, spec["device_name"],
                                spec["dtype_name"])
        variants.append(bench.Variant(variant, lambda t, b=backbone: b(t)[-1]))
    results = bench.measure(variants, [x, torch.randn_like(x)], x.device, x.dtype, 0.0, spec["window"], spec["rounds"])
    rows = []
    for variant, r in zip(spec["variants"], results):
        one = dict(model_name=spec["model_name"], size=spec["size"], batch=spec["batch"], variant=variant,
                   device_name=spec["device_name"], dtype_name=spec["dtype_name"], threads=torch.get_num_threads())
        peak = run_in_fresh_process(__file__, "--peak", one, spec.get("timeout"))
        if "error" in peak:
            raise RuntimeError(f"{variant}: peak-memory run failed: {peak['error']}")
        rows.append(dict(model=spec["model_name"], size=spec["size"], batch=spec["batch"], variant=variant,
                         device=spec["device_name"], dtype=spec["dtype_name"], threads=torch.get_num_threads(),
                         rounds=spec["rounds"], median_s=r.ms_per_batch_median / 1e3, min_s=r.ms_per_batch_min / 1e3,
                         img_per_s=r.img_per_s, **peak))
    return dict(rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shvit_s1")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variants", default="fused,plain", help="comma list of fused, plain")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--window", type=float, default=0.5, help="seconds per timed window (at least one call)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per (size, batch) before it is recorded as failed")
    p.add_argument("--output", default=None, help="JSON file (default: results/highres_MODEL_DEVICE_DTYPE.json)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: time one (size, batch), print JSON
    p.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak memory
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(time_row(json.loads(args.row))))
        return 0
    if args.peak:
        print(json.dumps(peak_of_one_forward(json.loads(args.peak))))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants: unknown {bad}; use fused and/or plain")
    if any(s < 64 or s % 16 for s in args.sizes):
        p.error("--sizes: SHViT needs multiples of 16, at least 64")
    sys.path.insert(0, str(REPO))
    from benchmarks.device import git_revision, run_in_fresh_process

    rows = []
    print(f"{'size':>5} {'batch':>5} {'variant':>7} {'median ms':>10} {'min ms':>9} {'img/s':>8} {'peak MiB':>9}")
    for size in args.sizes:
        for batch in args.batches:
            spec = dict(model_name=args.model, size=size, batch=batch, variants=variants, device_name=args.device,
                        dtype_name=args.dtype, threads=args.threads, window=args.window, rounds=args.rounds,
                        timeout=args.timeout)
            done = run_in_fresh_process(__file__, "--row", spec, args.timeout)
            if "error" in done:
                print(f"{size:>5} {batch:>5}  failed: {done['error']}")
                rows.append(dict(spec, error=done["error"]))
                continue
            for row in done["rows"]:
                print(f"{size:>5} {batch:>5} {row['variant']:>7} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} "
                      f"{row['img_per_s']:>8.2f} {row['peak_bytes'] / 2**20:>9.1f}")
                rows.append(row)
    import torch

    from shvit import bench

    environment = dict(bench.environment(torch.device(args.device)), git=git_revision(),
                       command="python benchmarks/highres.py " + " ".join(sys.argv[1:] if argv is None else argv))
    output = Path(args.output) if args.output else RESULTS / f"highres_{args.model}_{args.device}_{args.dtype}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": "highres", "environment": environment, "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
