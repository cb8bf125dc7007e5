"""SHSA against multi-head self-attention inside SHViT's macro design (the paper's central claim).

    python benchmarks/attention_ablation.py                                   # S1, 224 px, batch 16, CPU fp32
    python benchmarks/attention_ablation.py --device cuda --dtype bf16 --batch 256
    python benchmarks/attention_ablation.py --mode train --batch 32           # forward + backward
    python benchmarks/attention_ablation.py --sizes 64 --rounds 1 --window 0.05   # a quick smoke run

The same network (stem, stages, FFNs, PatchMerging, head; BatchNorms not folded) with the mixer of every
attention block ("s" blocks) swapped, everything in plain PyTorch eager, every mixer the same module
(``MultiHeadMixer``) with other widths and head counts, so only those differ:

* ``shsa``: SHViT's single-head attention on the first P channels (one head, query/key dim Q = 16, value dim
  P); the other C - P channels pass through.
* ``mhsa-equal``: multi-head attention at equal FLOPs: the same P attended channels, and the same total
  query/key (Q) and value (P) widths split over ``--heads`` heads (Q / h and ceil(P / h) per head), so the
  projections and the attention products cost what SHSA's do; only the number of heads (h score maps
  instead of one) differs.
* ``mhsa-all``: conventional multi-head attention over all C channels: ``--all-heads`` heads with key dim 16
  and value dim ceil(C / h) each, no pass-through channels (more FLOPs: the table reports them).
* ``shsa-fused``: for reference, this project's fused model on its kernels (BN folded in ``infer`` mode).

Every mixer has SHViT's pre-norm (GroupNorm, one group), Conv+BN qkv projection, ReLU and Conv+BN output
projection, and the block's residual. Reported per variant: GFLOPs per image (``torch.utils.flop_counter``),
parameters, img/s (the variants interleaved in one process: ``--rounds`` rounds of one ``--window`` each;
median and min..max over rounds) and the peak memory of one call after a warm-up call, each in a fresh process
(CUDA allocator peak; on the CPU the peak resident-set growth). ``--plot`` writes a bar chart. Results go to
results/attention_<model>_<device>_<dtype>_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import shvit  # noqa: E402
from shvit import bench  # noqa: E402
from benchmarks.device import PeakMemory, git_revision, load_average, run_in_fresh_process  # noqa: E402
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
            if variant == "shsa":
                block.mixer = MultiHeadMixer(attn.dim, attn.pdim, 1, attn.qk_dim, attn.pdim)
            elif variant == "mhsa-equal":
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


def prepare(model_name, variant, size, batch, heads, all_heads, mode, device_name, dtype_name):
    """The variant's model and a callable running one step on a batch (forward, or forward + backward)."""
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    torch.manual_seed(0)
    model = build(model_name, variant, heads, all_heads, mode)
    info = dict(gflops_per_image=gflops_per_image(model, size), params=sum(p.numel() for p in model.parameters()))
    model = model.to(device=device, memory_format=torch.channels_last)
    train = mode == "train"
    model.train(train)
    if not train:
        model = model.to(dtype)

    def step(x):
        if not train:
            return model(x)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().mean().backward()
        for p in model.parameters():
            p.grad = None
        return out.detach()

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return step, (x if train else x.to(dtype)), info


def peak_of_one_call(spec: dict) -> dict:
    """In a fresh process: the peak memory of one step, after a warm-up step."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    step, x, _ = prepare(**{k: v for k, v in spec.items() if k != "threads"})
    context = torch.inference_mode if spec["mode"] == "infer" else torch.enable_grad
    with context():
        step(x)  # one-time initialisation outside the measurement
    with PeakMemory(x.device) as peak, context():
        step(x)
    return dict(peak_bytes=peak.bytes, peak_measure=peak.measure)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["variant"] for r in ok]
    for ax, key, label in zip(axes, ("img_per_s", "peak_bytes", "gflops_per_image"), ("img/s", "peak MiB", "GFLOPs / image")):
        values = [(r[key] or 0) / (2**20 if key == "peak_bytes" else 1) for r in ok]
        spread = None
        if key == "img_per_s":  # whiskers: min..max over the interleaved rounds
            spread = [[v - r["img_per_s_min"] for v, r in zip(values, ok)], [r["img_per_s_max"] - v for v, r in zip(values, ok)]]
        ax.bar(names, values, yerr=spread, capsize=4,
               color=["tab:blue" if n.startswith("shsa") else "tab:orange" for n in names])
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
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per variant")
    p.add_argument("--window", type=float, default=0.5, help="seconds per timed window")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--plot", action="store_true", help="also write a PNG bar chart beside the JSON")
    p.add_argument("--output", default=None)
    p.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak memory, printed
    args = p.parse_args(argv)
    if args.peak:
        print(json.dumps(peak_of_one_call(json.loads(args.peak))))
        return 0
    variants_wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants_wanted or any(v not in VARIANTS for v in variants_wanted):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if 16 % args.heads:
        p.error("--heads must divide SHViT's query/key dim 16 (1, 2, 4, 8, 16)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    print(f"{'variant':>11} {'size':>5} {'GFLOPs':>7} {'params M':>8} {'img/s':>9} {'min..max':>17} {'peak MiB':>9}")
    for size in args.sizes:
        specs, variants, infos = {}, [], {}
        for variant in variants_wanted:
            spec = dict(model_name=args.model, variant=variant, size=size, batch=args.batch, heads=args.heads,
                        all_heads=args.all_heads, mode=args.mode, device_name=args.device, dtype_name=args.dtype)
            specs[variant] = spec
            step, x, infos[variant] = prepare(**spec)
            variants.append(bench.Variant(variant, step, inference=args.mode == "infer"))
        inputs = [x, torch.randn_like(x), torch.randn_like(x)]
        timed = {r.name: r for r in bench.measure(variants, inputs, device, dtype, args.warmup, args.window, args.rounds)}
        for variant in variants_wanted:
            r = timed[variant]
            peak = run_in_fresh_process(__file__, "--peak", dict(specs[variant], threads=torch.get_num_threads()))
            row = dict(specs[variant], **infos[variant], threads=torch.get_num_threads(), img_per_s=r.img_per_s,
                       img_per_s_min=args.batch * 1e3 / r.ms_per_batch_max, img_per_s_max=args.batch * 1e3 / r.ms_per_batch_min,
                       rounds=args.rounds, window_s=args.window, peak_bytes=peak.get("peak_bytes"),
                       peak_measure=peak.get("peak_measure", peak.get("error")))
            row["model"], row["device"], row["dtype"] = row.pop("model_name"), row.pop("device_name"), row.pop("dtype_name")
            rows.append(row)
            mib = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f}"
            print(f"{variant:>11} {size:>5} {row['gflops_per_image']:>7.3f} {row['params'] / 1e6:>8.2f} {row['img_per_s']:>9.1f} "
                  f"{row['img_per_s_min']:>8.1f}..{row['img_per_s_max']:<8.1f} {mib:>9}")
    name = f"attention_{args.model}_{args.device}_{args.dtype}_{args.mode}"
    output = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    environment = dict(bench.environment(device), git=git_revision(), load_average_end=load_average(),
                       command="python benchmarks/attention_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv))
    output.write_text(json.dumps({"benchmark": "attention_ablation", "environment": environment, "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")
    if args.plot:
        try:
            plot(rows, output.with_suffix(".png"))
            print(f"wrote {output.with_suffix('.png')}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install '.[bench]')")
    return 0 if all(r["peak_bytes"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
