"""Where a training step's time goes: forward and backward apart, each shvit op kind timed, against the same
model in plain eager PyTorch.

    python benchmarks/profile_train.py --model shvit_s1 --batch-size 16 --threads 1 [--amp bf16] [--output FILE]

A step is forward + cross-entropy + backward + AdamW step on a fixed synthetic batch (channels_last, and AdamW as
``shvit train`` builds it: torch's fused kernel on CPU and CUDA). Every kernel the dispatcher picks is timed by a
dispatch observer (wall clock on CPU, synchronised on CUDA) under its phase: forward ops, and their ``*_backward``
ops, which autograd runs in the backward pass. "outside the ops" is the rest of each phase (plain torch layers such
as the squeeze-excite gate, BatchNorm of the head, the loss, autograd's own bookkeeping, Python). Achieved GFLOP/s
count the algorithmic products (a backward: input and weight gradients, twice the forward's; recomputation not
counted) against the measured matmul ceiling. The plain-eager step (benchmarks/plain.py: the same modules and
weights on torch ops only) is timed in the same process, interleaved with the fused one.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shvit  # noqa: E402
from benchmarks.plain import to_plain  # noqa: E402
from benchmarks.profile_model import OpTimer, flops, kind, print_ceiling_and_rows, write_json  # noqa: E402
from shvit import bench  # noqa: E402
from shvit.train import build_optimizer, param_groups  # noqa: E402
from shvit_kernels import dispatch  # noqa: E402

def _as_inference_call(op: str, args):
    """(inference op, its positional arguments) with the products of this training-time call's forward."""
    a = dict(zip(dispatch.op_arguments(op), args))
    if op.startswith("conv"):
        return "conv_bias_act", (a["x"], a["weight"], None, a["stride"], a["padding"], a["groups"])
    if op.startswith("ffn"):
        return "ffn_fused", (a["x"], a["w1"])
    return "shsa_fused", (a["x"], a["qkv_weight"], None, a["qk_dim"])


def _kind_and_flops(op: str, args):
    """(kind label, algorithmic FLOPs) of one call; a backward's input and weight gradients are twice its
    forward's products."""
    if op == "conv_bn_train_output":  # an elementwise pass: no products
        return f"{op} {'x'.join(map(str, args[0].shape[1:]))}", 0
    inference_op, inference_args = _as_inference_call(op, args)
    label = kind(inference_op, inference_args)
    if op.startswith("conv_bn_train"):
        label = label.replace("conv_bias_act", "conv_bn_train")
    products = flops(inference_op, inference_args)
    return label, (2 * products if op.endswith("_backward") else products)


class Trainee:
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, amp: str):
        self.model, self.x, self.labels, self.amp = model, x, labels, amp
        # The optimizer ``shvit train`` builds (torch's fused AdamW on CPU and CUDA), the same for every variant; the
        # weight decay (S1's recipe value) does not change a step's cost.
        self.optimizer = build_optimizer(param_groups(model, weight_decay=0.025), lr=1e-4, device=x.device)

    def step(self, phases=None) -> None:
        marks = [time.perf_counter()]
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            logits = self.model(self.x).float()
        loss = F.cross_entropy(logits, self.labels, label_smoothing=0.1)
        bench._sync(self.x.device)
        marks.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bench._sync(self.x.device)
        marks.append(time.perf_counter())
        self.optimizer.step()
        bench._sync(self.x.device)
        marks.append(time.perf_counter())
        if phases is not None:
            for name, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:]):
                phases[name] += b - a


def training_setup(model_name: str, img_size: int, batch: int, device: torch.device):
    """The model a training benchmark starts from (fixed seed, channels_last, train mode), and its fixed synthetic
    channels_last batch and labels."""
    torch.manual_seed(0)
    model = shvit.create_model(model_name).to(device, memory_format=torch.channels_last).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return model, x, labels


def profile(model_name: str, batch: int, threads: int, amp: str, iters: int, rounds: int, device: torch.device,
            img_size: Optional[int] = None) -> Dict:
    torch.set_num_threads(threads)
    size = img_size or bench.PAPER_IMG_SIZE[model_name]
    model, x, labels = training_setup(model_name, size, batch, device)
    fused = Trainee(model, x, labels, amp)
    plain = Trainee(to_plain(model), x, labels, amp)  # a deep copy: its own weights and optimizer
    for t in (fused, plain):
        for _ in range(2):
            t.step()

    # Step times, interleaved rounds (no observers: the timers' own cost stays out).
    step_ms = {"fused": [], "plain eager": []}
    for _ in range(rounds):
        for name, t in (("fused", fused), ("plain eager", plain)):
            start = time.perf_counter()
            for _ in range(iters):
                t.step()
            step_ms[name].append((time.perf_counter() - start) / iters * 1e3)

    # Per-op times of the fused step, by phase.
    def classify(call):
        # Outputs are recomputed for the backward pass, in it.
        phase = "backward" if call.op.endswith("_backward") or call.op == "conv_bn_train_output" else "forward"
        label, products = _kind_and_flops(call.op, call.args)
        return (phase, label, call.backend), products

    timer = OpTimer(device, classify)
    phases: Dict[str, float] = collections.defaultdict(float)
    with dispatch.observe(timer):
        for _ in range(iters):
            fused.step(phases)
    rows = timer.rows(iters, ("phase", "kind", "backend"))
    rows.sort(key=lambda r: (r["phase"] != "forward", -r["ms"]))
    for phase in ("forward", "backward"):
        inside = sum(r["ms"] for r in rows if r["phase"] == phase)
        rows.append(dict(phase=phase, kind="outside the ops", backend="torch", calls=0,
                         ms=phases[phase] / iters * 1e3 - inside))
    rows.append(dict(phase="optimizer", kind="AdamW step", backend="torch", calls=1,
                     ms=phases["optimizer"] / iters * 1e3))
    from benchmarks.device import probe
    from shvit_kernels.backends import cpp

    return dict(model=model_name, img_size=size, batch=batch, threads=threads, amp=amp, device=str(device),
                step_ms={k: statistics.median(v) for k, v in step_ms.items()}, step_ms_rounds=step_ms,
                phases_ms_with_timers={k: v / iters * 1e3 for k, v in phases.items()}, rows=rows,
                kxk_grads_paths=cpp.kxk_grads_choices() if device.type == "cpu" else [],
                probe=probe(device, dtypes=(torch.bfloat16 if amp == "bf16" else torch.float32,)),
                environment=bench.environment(device), load_average=os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=shvit.list_models())
    p.add_argument("--img-size", type=int, help="default: the paper's resolution for the model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--iters", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fused and plain-eager steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the JSON here too")
    args = p.parse_args(argv)
    r = profile(args.model, args.batch_size, args.threads, args.amp, args.iters, args.rounds, torch.device(args.device),
                args.img_size)
    fused, plain = r["step_ms"]["fused"], r["step_ms"]["plain eager"]
    print(f"{r['model']} {r['img_size']}px batch {r['batch']} threads {r['threads']} amp {r['amp']} {r['device']}: "
          f"step {fused:.1f} ms fused, {plain:.1f} ms plain eager ({plain / fused:.2f}x), "
          f"load {r['load_average'][0]:.2f}")
    phases = ", ".join(f"{k} {v:.1f} ms" for k, v in r["phases_ms_with_timers"].items())
    print_ceiling_and_rows(r, lambda row: f"{row['phase']:9} {row['ms']:8.2f} ms", f"; phases with timers: {phases}")
    if r["kxk_grads_paths"]:
        print("  kxk Conv+BN gradient paths (timed at first use):\n    " + "\n    ".join(r["kxk_grads_paths"]))
    if args.output:
        write_json(args.output, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
