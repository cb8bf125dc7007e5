"""Issue #16: a CPU training step with the fused ops against plain eager PyTorch and torch.compile.

    python benchmarks/train_vs_peers.py --model shvit_s1 --img-size 224 --batch-size 16 --threads 1 [--amp bf16]
    python benchmarks/train_vs_peers.py --model shvit_s4 --batch-size 64 --threads 2 --output FILE
    python benchmarks/train_vs_peers.py --img-size 64 --batch-size 4 --steps 1 --rounds 2   # a quick smoke run

A step is benchmarks/profile_train.py's: forward (under bf16 autocast with ``--amp bf16``) + cross-entropy +
backward + AdamW step on a fixed synthetic batch, channels_last. Variants (``--variants``), all starting from
the same weights (one model built with a fixed seed), each with its own copy of them and its own AdamW (torch's
fused kernel, as ``shvit train`` builds it):

  fused    the project's model (shvit_kernels ops, automatic backend choice, the user's defaults)
  fused-keep-all / fused-keep-none   the same with every training Conv+BN keeping its conv output for the
           backward pass / recomputing every one there (``shvit_kernels.keep_conv_outputs``: speed against memory)
  eager    the same modules on plain torch ops (benchmarks/plain.py)
  compile  torch.compile(eager), default mode

Every variant is warmed up first (compile compiles in its first step; each warm-up step's seconds are
reported), then timed in ``--rounds`` interleaved rounds of ``--steps`` steps each, the order rotated every
round; medians over rounds are reported. Unless ``--skip-peak``, each variant's peak memory of one step
(after a warm-up step) is measured in a fresh process (benchmarks/device.py ``PeakMemory``: on the CPU the
growth of the peak resident set, with glibc mapping each block from 128 KiB up on its own and the cpp backend's output
cache off, so that the resident set follows the live blocks, ``LIVE_PEAK_ENV``; the fused variants' peak with that
cache on, its free blocks included, is reported beside it as ``peak_cached_bytes``). The issue's targets (speed
>= 1.3x eager and >= 1.0x compile, peak memory <= 0.70x eager's) are reported as met or not; nothing is asserted. JSON (default
benchmarks/results/train_vs_peers_MODEL_SIZEpx_bBATCH_cpu_AMP_tTHREADS.json) holds the command, the environment
(CPU with family/model, versions, load average, git revision) and every per-round figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable as a script

import torch

import shvit
import shvit_kernels
from benchmarks.device import (
    CACHED_PEAK_ENV,
    CACHED_PEAK_HOW,
    LIVE_PEAK_ENV,
    LIVE_PEAK_HOW,
    PeakMemory,
    git_revision,
    load_average,
    run_in_fresh_process,
)
from benchmarks.plain import to_plain
from benchmarks.profile_model import write_json
from benchmarks.profile_train import Trainee, training_setup
from shvit import bench

VARIANTS = ("fused", "eager", "compile", "fused-keep-all", "fused-keep-none")
# Issue #16: fused speed / peer speed at least this much; fused peak memory / eager's at most this much.
TARGETS = {"speed_vs_eager": 1.3, "speed_vs_compile": 1.0, "memory_vs_eager": 0.70}
PEAK_TIMEOUT_S = 1800  # one fresh process: imports, a compile and two steps


class KeepingTrainee(Trainee):
    """A fused-model trainee whose steps run under one ``shvit_kernels.keep_conv_outputs`` setting."""

    def __init__(self, keep: str, *args):
        super().__init__(*args)
        self.keep = keep

    def step(self, phases=None) -> None:
        with shvit_kernels.keep_conv_outputs(self.keep):
            super().step(phases)


def make_variant(name: str, model: torch.nn.Module, x, labels, amp: str) -> Trainee:
    """One variant on its own copy of ``model``'s weights, with its own AdamW (used by timing and peak alike)."""
    if name.startswith("fused-keep-"):
        return KeepingTrainee(name[len("fused-keep-"):], copy.deepcopy(model), x, labels, amp)
    if name == "fused":
        net = copy.deepcopy(model)
    elif name == "eager":
        net = to_plain(model)  # a deep copy with plain-torch forwards
    elif name == "compile":
        net = torch.compile(to_plain(model))  # compiles lazily, in the first (warm-up) step
    else:
        raise ValueError(f"unknown variant {name!r}; use {', '.join(VARIANTS)}")
    return Trainee(net, x, labels, amp)


def peak_of_one_step(spec: dict) -> dict:
    """In a fresh process (peaks do not carry over): one variant's peak memory of a step after a warm-up step."""
    torch.set_num_threads(spec["threads"])
    model, x, labels = training_setup(spec["model"], spec["img_size"], spec["batch"], torch.device("cpu"))
    trainee = make_variant(spec["variant"], model, x, labels, spec["amp"])
    del model
    trainee.step()  # compilation, optimizer state, thread pools and autotuning stay outside the measurement
    with PeakMemory(x.device) as peak:
        trainee.step()
    return {"peak_bytes": int(peak.bytes), "peak_measure": peak.measure}


def time_variants(args, names):
    """Warm-up seconds per step, and ms per step in interleaved rounds (order rotated each round, each variant's
    steps in a round timed after one untimed step)."""
    model, x, labels = training_setup(args.model, args.img_size, args.batch_size, torch.device("cpu"))
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (~2 s): not the first variant's
    trainees, report = {}, {}
    for name in names:
        start = time.perf_counter()
        trainees[name] = make_variant(name, model, x, labels, args.amp)
        build_s, warmup_s = time.perf_counter() - start, []
        for _ in range(args.warmup):
            start = time.perf_counter()
            trainees[name].step()
            warmup_s.append(time.perf_counter() - start)
        report[name] = {"build_s": build_s, "warmup_step_s": warmup_s, "ms_per_step_rounds": []}
    del model
    orders = []
    for r in range(args.rounds):
        # Rotating the order keeps a variant from always following the same one (caches, turbo, others' load).
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            # One untimed step first: it refills the caches the previous variant evicted (shvit.bench.measure's
            # windows open the same way).
            trainees[name].step()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainees[name].step()
            report[name]["ms_per_step_rounds"].append((time.perf_counter() - start) / args.steps * 1e3)
    for name, v in report.items():
        v["ms_per_step_median"] = statistics.median(v["ms_per_step_rounds"])
        v["ms_per_step_min"] = min(v["ms_per_step_rounds"])
        v["img_per_s_median"] = args.batch_size / v["ms_per_step_median"] * 1e3
    return report, orders


def compare(variants: dict) -> dict:
    """Ratios of fused to each peer and the issue's targets; a ratio is None where a figure is missing."""
    fused = variants.get("fused", {})
    ratios = {}
    for peer in ("eager", "compile"):
        other = variants.get(peer, {})
        speed = other.get("ms_per_step_median") / fused["ms_per_step_median"] if fused and other else None
        memory = (fused["peak_bytes"] / other["peak_bytes"]
                  if fused.get("peak_bytes") and other.get("peak_bytes") else None)
        ratios[f"fused_vs_{peer}"] = {"speed": speed, "memory": memory}
    measured = {"speed_vs_eager": ratios["fused_vs_eager"]["speed"],
                "speed_vs_compile": ratios["fused_vs_compile"]["speed"],
                "memory_vs_eager": ratios["fused_vs_eager"]["memory"]}
    targets = {}
    for key, target in TARGETS.items():
        value = measured[key]
        met = None if value is None else (value <= target if key.startswith("memory") else value >= target)
        targets[key] = {"target": target, "measured": value, "met": met}
    return {"ratios": ratios, "targets": targets}


def _print_table(result: dict) -> None:
    c = result["config"]
    print(f"{c['model']} {c['img_size']}px batch {c['batch_size']} threads {c['threads']} amp {c['amp']} "
          f"(cpu: {result['environment']['cpu']}; load {result['load_average']['start']} -> {result['load_average']['end']})")
    print(f"{'variant':>8} {'build s':>8} {'warm-up s (each step)':>24} {'median ms':>10} {'min ms':>9} {'img/s':>8} "
          f"{'peak MiB':>9} {'cached':>7}")
    mib = lambda v, key, width: f"{v[key] / 2**20:{width}.1f}" if v.get(key) is not None else f"{'-':>{width}}"  # noqa
    for name, v in result["variants"].items():
        warm = " ".join(f"{s:.1f}" for s in v["warmup_step_s"])
        print(f"{name:>8} {v['build_s']:8.1f} {warm:>24} {v['ms_per_step_median']:10.1f} {v['ms_per_step_min']:9.1f} "
              f"{v['img_per_s_median']:8.1f} {mib(v, 'peak_bytes', 9)} {mib(v, 'peak_cached_bytes', 7)}")
    for key, t in result["targets"].items():
        if t["measured"] is not None:
            sign = "<=" if key.startswith("memory") else ">="
            print(f"fused {key.replace('_', ' ')}: {t['measured']:.2f}x (target {sign} {t['target']:.2f}: "
                  f"{'met' if t['met'] else 'not met'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shvit_s1", choices=shvit.list_models())
    p.add_argument("--img-size", type=int, default=None, help="default: the paper's (224 for S1-S3, 256 for S4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compile compiles here)")
    p.add_argument("--variants", default="fused,eager,compile", help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--skip-peak", action="store_true", help="no peak-memory measurement (saves a process per variant)")
    p.add_argument("--output", default=None, help="JSON file (default: under benchmarks/results/)")
    p.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak memory, as JSON
    args = p.parse_args(argv)
    if args.peak:
        print(json.dumps(peak_of_one_step(json.loads(args.peak))))
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--variants: {args.variants!r}; use a comma list of distinct {', '.join(VARIANTS)}")
    args.img_size = args.img_size or bench.PAPER_IMG_SIZE[args.model]
    if args.img_size < 64 or args.img_size % 16:
        p.error("--img-size: SHViT needs a multiple of 16, at least 64")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1 (compile must not compile in a timed round)")
    torch.set_num_threads(args.threads)  # before anything runs: thread pools are sized on first use

    load_start = load_average()  # a shared machine: others' load slows the variants, unevenly
    variants, orders = time_variants(args, names)
    load_end = load_average()
    if not args.skip_peak:
        for name in names:
            spec = {"model": args.model, "img_size": args.img_size, "batch": args.batch_size, "amp": args.amp,
                    "threads": args.threads, "variant": name}
            peak = run_in_fresh_process(__file__, "--peak", spec, PEAK_TIMEOUT_S, env=LIVE_PEAK_ENV)
            variants[name].update(peak_bytes=peak.get("peak_bytes"), peak_measure=peak.get("peak_measure"),
                                  **({"peak_error": peak["error"]} if "error" in peak else {}))
            if name.startswith("fused"):  # the only variants with an output cache
                cached = run_in_fresh_process(__file__, "--peak", spec, PEAK_TIMEOUT_S, env=CACHED_PEAK_ENV)
                variants[name].update(peak_cached_bytes=cached.get("peak_bytes"),
                                      **({"peak_cached_error": cached["error"]} if "error" in cached else {}))
    command = argv if argv is not None else sys.argv[1:]
    result = dict(
        benchmark="train_vs_peers", issue=16,
        command="python benchmarks/train_vs_peers.py " + " ".join(command),
        config={k: v for k, v in vars(args).items() if k not in ("output", "peak")},
        environment=dict(bench.environment(torch.device("cpu")), git_revision=git_revision()),
        threads=torch.get_num_threads(),
        load_average={"start": load_start, "end": load_end},
        step="forward (autocast if amp) + cross-entropy (label smoothing 0.1) + backward "
        "+ AdamW (fused, as shvit train builds it), channels_last",
        peak_memory_how=None if args.skip_peak else
        "each variant in a fresh process: one warm-up step, then benchmarks.device.PeakMemory around one step; on the "
        f"CPU {LIVE_PEAK_HOW}; peak_cached_bytes: {CACHED_PEAK_HOW}",
        round_orders=orders,
        variants=variants,
        **compare(variants),
    )
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results",
        f"train_vs_peers_{args.model}_{args.img_size}px_b{args.batch_size}_cpu_"
        f"{'fp32' if args.amp == 'none' else args.amp}_t{args.threads}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json(output, result)
    _print_table(result)
    print(f"wrote {output}")
    return 0 if all("peak_error" not in v and "peak_cached_error" not in v for v in variants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
