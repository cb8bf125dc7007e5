"""Training throughput: images/s per optimizer step and peak memory, reference backend against each usable
fused backend, in interleaved rounds (medians reported).

    python benchmarks/train_throughput.py --model shvit_s1 --batch-size 16 --img-size 128 --steps 3 --rounds 5

Each backend trains its own copy of the same model (same seed, same fixed batch) with the training loop's
recipe pieces (AdamW, AGC clipping, label smoothing); a step is forward + backward + clip + optimizer step.
Writes JSON (device, versions, date, command, per-round figures) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shvit  # noqa: E402
from benchmarks.device import git_revision, load_average  # noqa: E402
from shvit.bench import environment  # noqa: E402
from shvit.train import autocast, clip_gradients, param_groups, to_device  # noqa: E402
from shvit_kernels import prefer_backend  # noqa: E402
from shvit_kernels import dispatch  # noqa: E402


class Trainee:
    def __init__(self, backend: str, args, device):
        torch.manual_seed(0)
        self.backend, self.device, self.args = backend, device, args
        self.model = shvit.create_model(args.model, num_classes=args.num_classes).to(device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, shvit.train.WEIGHT_DECAY[args.model]), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), generator=g, dtype=torch.uint8)
        self.x = to_device(images, device, True)
        self.labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)

    def steps(self, n: int) -> float:
        """Seconds for ``n`` training steps."""
        _sync(self.device)
        start = time.perf_counter()
        with prefer_backend(self.backend):
            for _ in range(n):
                with autocast(self.device, self.args.amp):
                    logits = self.model(self.x).float()
                loss = F.cross_entropy(logits, self.labels, label_smoothing=0.1)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(self.model.parameters(), 0.02, "agc")
                self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shvit_s1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="default: benchmarks/results/train_<model>_<device>_<date>.json")
    args = p.parse_args(argv)
    if args.model not in shvit.MODEL_CONFIGS:
        p.error(f"--model must be one of {', '.join(shvit.MODEL_CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))

    load_start = load_average()  # the machines are shared: a busy one slows every backend, unevenly
    names = ["reference"] + dispatch.usable_backends(device.type)
    trainees = [Trainee(n, args, device) for n in names]
    peak = {}
    for t in trainees:  # warm-up, and the peak memory of a step on each backend
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t.steps(args.warmup)
        if device.type == "cuda":
            peak[t.backend] = torch.cuda.max_memory_allocated(device) / 2**20
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for t in trainees:
            times[t.backend].append(t.steps(args.steps))

    base = None
    results = []
    for n in names:
        per_round = [args.steps * args.batch_size / s for s in times[n]]
        median = statistics.median(per_round)
        base = base or median
        kernels = sorted(op for op in dispatch.ops() if dispatch.kernel(n, op) is not None)
        results.append({
            "backend": n,
            "img_per_s_median": median,
            "img_per_s_rounds": per_round,
            "ms_per_step_median": 1000 * args.batch_size / median,
            "speedup_vs_reference": median / base,
            "peak_memory_mib": peak.get(n),
            "backend_kernels": kernels,
        })
    env = environment(device)
    report = {
        "benchmark": "train_throughput",
        "device": env.get("gpu") or env["cpu"],
        "environment": env,
        "threads": torch.get_num_threads(),
        "git_revision": git_revision(),
        "load_average_1_5_15_min": {"start": load_start, "end": load_average()},
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "train_throughput.py", *sys.argv[1:]]),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "results": results,
        "peak_memory_note": None if device.type == "cuda" else (
            "CPU: no per-backend peak in-process; process max RSS (MiB) after all runs: "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        ),
    }
    out = args.output or os.path.join(
        ROOT, "benchmarks", "results",
        f"train_{args.model}_{device.type}_{datetime.date.today().isoformat()}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for r in results:
        mem = f", peak {r['peak_memory_mib']:.0f} MiB" if r["peak_memory_mib"] is not None else ""
        print(f"{r['backend']:<10} {r['img_per_s_median']:8.1f} img/s ({r['speedup_vs_reference']:.2f}x){mem}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
