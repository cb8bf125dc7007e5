"""SHSA against multi-head self-attention inside SHViT's macro design (the paper's central claim).

    python benchmarks/attention_ablation.py                                   # S1, 224 px, batch 16, CPU fp32
    python benchmarks/attention_ablation.py --device cuda --dtype bf16 --batch 256
    python benchmarks/attention_ablation.py --mode train --batch 32           # forward + backward
    python benchmarks/attention_ablation.py --sizes 64 --reps 1 --rounds 1    # a quick smoke run

The same network (stem, stages, FFNs, PatchMerging, head; BatchNorms not folded) with the mixer of every
attention block ("s" blocks) swapped, everything in plain PyTorch eager so only the mixer differs:

* ``shsa``: SHViT's single-head attention on the first P channels (query/key dim Q = 16, value dim P); the
  other C - P channels pass through.
* ``mhsa-equal``: multi-head attention at equal FLOPs: the same P attended channels, and the same total
  query/key (Q) and value (P) widths split over ``--heads`` heads (Q / h and ceil(P / h) per head), so the
  projections and the attention products cost what SHSA's do; only the number of heads (h score maps
  instead of one) differs.
* ``mhsa-all``: conventional multi-head attention over all C channels: ``--all-heads`` heads with key dim 16
  and value dim ceil(C / h) each, no pass-through channels (more FLOPs: the table reports them).
* ``shsa-fused``: for reference, this project's fused model on its kernels (BN folded in ``infer`` mode).

Every mixer has SHViT's pre-norm (GroupNorm, one group), Conv+BN qkv projection, ReLU and Conv+BN output
projection, and the block's residual. Reported per variant: GFLOPs per image (``torch.utils.flop_counter``),
parameters, img/s (median over ``--rounds`` rounds of ``--reps`` calls, variants in separate processes, in
turn) and peak memory of one call (CUDA allocator peak; on CPU the peak resident-set growth of a fresh
process). ``--plot`` writes a bar chart. Results go to results/attention_<model>_<device>_<dtype>_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import shvit  # noqa: E402
from benchmarks.highres import _maxrss_bytes, _rss_bytes  # noqa: E402
from benchmarks.plain import PlainConv2dBN, to_plain  # noqa: E402

VARIANTS = ("shsa", "mhsa-equal", "mhsa-all", "shsa-fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def conv_bn(a: int, b: int, bn_weight_init: float = 1.0) -> nn.Module:
    """A 1x1 Conv+BN with plain-PyTorch forward (same parameters as the model's Conv2d_BN)."""
    m = shvit.Conv2d_BN(a, b, bn_weight_init=bn_weight_init)
    m.__class__ = PlainConv2dBN
    return m


class MultiHeadMixer(nn.Module):
    """Residual multi-head self-attention on the first ``in_dim`` channels, the rest passing through."""

    def __init__(self, dim: int, in_dim: int, heads: int, qk_per_head: int, v_per_head: int):
        super().__init__()
        self.dim, self.in_dim, self.heads, self.qk, self.v = dim, in_dim, heads, qk_per_head, v_per_head
        self.pre_norm = nn.GroupNorm(1, in_dim)
        self.qkv = conv_bn(in_dim, heads * (2 * qk_per_head + v_per_head))
        self.proj = nn.Sequential(nn.ReLU(), conv_bn(heads * v_per_head + dim - in_dim, dim, bn_weight_init=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(self.pre_norm(x[:, : self.in_dim])).reshape(b, self.heads, 2 * self.qk + self.v, h * w)
        q, k, v = qkv.split([self.qk, self.qk, self.v], dim=2)  # (B, heads, d, N)
        attn = torch.softmax((q.transpose(-2, -1) @ k) * self.qk ** -0.5, dim=-1)  # (B, heads, N, N)
        y = (v @ attn.transpose(-2, -1)).reshape(b, self.heads * self.v, h, w)
        return x + self.proj(torch.cat([y, x[:, self.in_dim:]], dim=1))


def build(model_name: str, variant: str, heads: int, all_heads: int, mode: str) -> nn.Module:
    model = shvit.create_model(model_name)
    if variant == "shsa-fused":
        return model.eval().fuse() if mode == "infer" else model
    for stage in (model.blocks1, model.blocks2, model.blocks3):
        for block in stage:
            mixer = getattr(block, "mixer", None)
            if not isinstance(mixer, shvit.Residual) or not isinstance(mixer.m, shvit.SHSA):
                continue
            attn = mixer.m
            if variant == "mhsa-equal":
                if attn.qk_dim % heads:
                    raise ValueError(f"--heads {heads} must divide the query/key dim {attn.qk_dim}")
                block.mixer = MultiHeadMixer(attn.dim, attn.pdim, heads, attn.qk_dim // heads, math.ceil(attn.pdim / heads))
            elif variant == "mhsa-all":
                block.mixer = MultiHeadMixer(attn.dim, attn.dim, all_heads, 16, math.ceil(attn.dim / all_heads))
    return to_plain(model)


def gflops_per_image(model: nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), shvit_kernels_inline():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def shvit_kernels_inline():
    import shvit_kernels

    return shvit_kernels.inline_reference()  # the fused ops counted as their reference's torch ops


def run_variant(model_name, variant, size, batch, heads, all_heads, mode, device_name, dtype_name, reps, rounds, threads) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    torch.manual_seed(0)
    model = build(model_name, variant, heads, all_heads, mode)
    flops = gflops_per_image(model, size)
    params = sum(p.numel() for p in model.parameters())
    model = model.to(device=device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    train = mode == "train"
    model.train(train)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if not train:
        model = model.to(dtype)
        x = x.to(dtype)

    def step():
        if train:
            with autocast:
                out = model(x)
            out.float().mean().backward()
            for p in model.parameters():
                p.grad = None
        else:
            with torch.inference_mode():
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base, maxrss_before = _rss_bytes(), _maxrss_bytes()
    step()  # warm-up, and the call whose peak memory is reported
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _maxrss_bytes() - base if _maxrss_bytes() > maxrss_before else None
    round_rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            step()
        round_rates.append(batch * reps / (time.perf_counter() - start))
    return dict(model=model_name, variant=variant, size=size, batch=batch, mode=mode, device=device_name, dtype=dtype_name,
                threads=torch.get_num_threads(), heads=heads, all_heads=all_heads, gflops_per_image=flops, params=params,
                img_per_s=statistics.median(round_rates), img_per_s_min=min(round_rates), img_per_s_max=max(round_rates),
                peak_bytes=peak, reps=reps, rounds=rounds)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["variant"] for r in ok]
    for ax, key, label in zip(axes, ("img_per_s", "peak_bytes", "gflops_per_image"), ("img/s", "peak MiB", "GFLOPs / image")):
        values = [(r[key] or 0) / (2**20 if key == "peak_bytes" else 1) for r in ok]
        ax.bar(names, values, color=["tab:blue" if n.startswith("shsa") else "tab:orange" for n in names])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    r0 = ok[0]
    fig.suptitle(f"{r0['model']} {r0['size']} px batch {r0['batch']} {r0['device']} {r0['dtype']} {r0['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shvit_s1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[224])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="mhsa-equal: heads sharing SHSA's widths (must divide 16)")
    p.add_argument("--all-heads", type=int, default=4, help="mhsa-all: heads over all channels (key dim 16 each)")
    p.add_argument("--mode", default="infer", choices=["infer", "train"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--plot", action="store_true", help="also write a PNG bar chart beside the JSON")
    p.add_argument("--output", default=None)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(run_variant(**json.loads(args.run))))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if 16 % args.heads:
        p.error("--heads must divide SHViT's query/key dim 16 (1, 2, 4, 8, 16)")
    rows = []
    print(f"{'variant':>11} {'size':>5} {'GFLOPs':>7} {'params M':>8} {'img/s':>9} {'min..max':>17} {'peak MiB':>9}")
    for size in args.sizes:
        for variant in variants:
            spec = dict(model_name=args.model, variant=variant, size=size, batch=args.batch, heads=args.heads,
                        all_heads=args.all_heads, mode=args.mode, device_name=args.device, dtype_name=args.dtype,
                        reps=args.reps, rounds=args.rounds, threads=args.threads)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                error = (done.stderr.strip().splitlines() or ["?"])[-1]
                rows.append(dict(spec, error=error))
                print(f"{variant:>11} {size:>5}  failed: {error}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            print(f"{variant:>11} {size:>5} {r['gflops_per_image']:>7.3f} {r['params'] / 1e6:>8.2f} {r['img_per_s']:>9.1f} "
                  f"{r['img_per_s_min']:>8.1f}..{r['img_per_s_max']:<8.1f} {peak:>9}")
    name = f"attention_{args.model}_{args.device}_{args.dtype}_{args.mode}"
    output = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": "attention_ablation", "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")
    if args.plot:
        try:
            plot(rows, output.with_suffix(".png"))
            print(f"wrote {output.with_suffix('.png')}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install '.[bench]')")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
