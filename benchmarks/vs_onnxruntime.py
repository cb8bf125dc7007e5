"""Where the fused model gains or loses against ONNX Runtime, op by op (CPU, fp32).

    python -m benchmarks.vs_onnxruntime --model shvit_s1 --threads 1 [--batch-size 16] [--rounds 20] [--output FILE]

Both run in one process, alternately, on the same folded model and the same NCHW input (what a user passes): each
round times one fused forward under a dispatch observer (each kernel call timed), one profiled ONNX Runtime run
(its per-node timer), and one plain run of each (the totals). Host noise on shared machines moves whole minutes by
1.5x, which made per-kind figures from separate runs (``profile_model.py --onnxruntime``) disagree from one run to
the next; alternating rounds share it.

Each of our op calls is matched to the ONNX Runtime convolutions that compute the same thing, by shape: a
conv_bias_act to the Conv with its input and weight shapes, an FFN to its two 1x1 Convs, the stem to its four 3x3
Convs. The rest (attention, squeeze-excite, head, layout reorders, Python) is compared as one remainder of the timed
runs. Timed, the fused model runs its modules one call at a time (a replayed chain, the plain forward's path, has
no calls to time), so its timed run is slower than its plain one by the Python between the kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shvit  # noqa: E402
from shvit import bench  # noqa: E402
from shvit_kernels import dispatch  # noqa: E402
from benchmarks.profile_model import OpTimer  # noqa: E402

ConvKey = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (input shape, weight shape) of one convolution


def matched_convs(op: str, args) -> List[ConvKey]:
    """The (input shape, weight shape) of each ONNX Runtime Conv that computes this call of ``op``; [] for ops
    that ONNX Runtime runs as other nodes (attention, squeeze-excite)."""
    x = tuple(args[0].shape)
    if op == "conv_bias_act":
        return [(x, tuple(args[1].shape))]
    if op == "ffn_fused":
        w1, w2 = tuple(args[1].shape), tuple(args[3].shape)
        return [(x, w1), ((x[0], w1[0], x[2], x[3]), w2)]
    if op == "patch_embed":
        keys, shape = [], x
        for weight in args[1:9:2]:
            w = tuple(weight.shape)
            keys.append((shape, w))
            shape = (shape[0], w[0], (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
        return keys
    return []


def find_conv(key: ConvKey, conv_ms: Dict[ConvKey, float]) -> Optional[ConvKey]:
    """The profiled Conv for ``key``: the same shapes, or channel counts padded up to the next multiple of 16
    or less (ONNX Runtime's blocked layout pads them: S4's 28-channel stem layer runs as 32). None if neither."""
    if key in conv_ms:
        return key
    (x, w) = key

    def padded(ours, theirs):
        return ours <= theirs < ours + 16

    for k in conv_ms:
        kx, kw = k
        if (len(kx) == len(x) == 4 and kx[0] == x[0] and kx[2:] == x[2:] and kw[2:] == w[2:] and padded(x[1], kx[1])
                and padded(w[0], kw[0]) and (kw[1] == w[1] or padded(w[1], kw[1]))):
            return k
    return None


def group_name(op: str, args) -> str:
    x, w = args[0].shape, args[1].shape
    if op == "ffn_fused":
        return f"ffn_fused {x[1]}->{w[0]}->{x[1]} at {x[2]}x{x[3]}"
    if op == "conv_bias_act":
        kind = "depthwise" if args[5] > 1 else f"{w[2]}x{w[3]}"
        return f"conv_bias_act {kind} {x[1]}->{w[0]} at {x[2]}x{x[3]}" + (f" stride {args[3]}" if args[3] > 1 else "")
    if op == "patch_embed":
        return f"patch_embed {x[1]}->{args[7].shape[0]} at {x[2]}x{x[3]}"
    return op


def onnxruntime_conv_times(events: list, skip_runs: int, runs: int) -> Dict[ConvKey, float]:
    """ms per run of each Conv shape in a profile of ``skip_runs + runs`` runs, the first ``skip_runs`` left out."""
    per_shape: Dict[ConvKey, List[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["args"].get("op_name") not in ("Conv", "FusedConv"):
            continue
        shapes = [tuple(next(iter(s.values()))) for s in e["args"].get("input_type_shape", [])[:2]]
        per_shape[tuple(shapes)].append(e["dur"] / 1e3)
    total = skip_runs + runs
    return {key: sum(v[len(v) * skip_runs // total:]) / runs for key, v in per_shape.items()}


def compare(model_name: str, threads: int, batch: int, rounds: int) -> Dict:
    from benchmarks.paper_protocol import OnnxRuntimeModel
    from benchmarks.plain import to_plain

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = shvit.create_model(model_name).eval()
    bench._randomize_bn(model)
    fused = shvit.fuse(model)
    size = bench.PAPER_IMG_SIZE[model_name]
    x = torch.randn(batch, 3, size, size)
    runner = OnnxRuntimeModel(to_plain(shvit.fuse(model)).eval(), x, threads)
    profiled = runner.new_session(profile_prefix=os.path.join(os.path.dirname(runner.path), "profile"))
    feed = {runner.input_name: x.numpy()}
    convs: Dict[str, List[ConvKey]] = {}

    def classify(call):  # profile_model's timer, keyed by group; each group's convs noted on the way
        name = group_name(call.op, call.args)
        convs.setdefault(name, matched_convs(call.op, call.args))
        return (name,), 0

    timer = OpTimer(torch.device("cpu"), classify)
    warmup = 3
    ours_ms, ort_ms, observed_ms, profiled_ms = [], [], [], []
    with torch.inference_mode():
        for _ in range(warmup):
            fused(x)
            runner(x)
            profiled.run(None, feed)
        for _ in range(rounds):
            start = time.perf_counter()
            with dispatch.observe(timer):
                fused(x)
            observed_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            profiled.run(None, feed)
            profiled_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            fused(x)
            ours_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            runner(x)
            ort_ms.append((time.perf_counter() - start) * 1e3)
    with open(profiled.end_profiling()) as f:
        conv_ms = onnxruntime_conv_times(json.load(f), warmup, rounds)
    rows, claimed = [], set()
    for timed in sorted(timer.rows(rounds, ("group",)), key=lambda r: -r["ms"]):
        name, ours = timed["group"], timed["ms"]
        keys = [find_conv(k, conv_ms) for k in convs[name]]
        if not keys or None in keys:
            rows.append(dict(group=name, calls=timed["calls"], ours_ms=ours, onnxruntime_ms=None))
            continue
        claimed.update(keys)
        theirs = sum(conv_ms[k] for k in set(keys))
        rows.append(dict(group=name, calls=timed["calls"], ours_ms=ours, onnxruntime_ms=theirs, speedup=theirs / ours))
    ours_total, ort_total = statistics.median(ours_ms), statistics.median(ort_ms)
    matched_ours = sum(r["ours_ms"] for r in rows if r["onnxruntime_ms"] is not None)
    matched_ort = sum(r["onnxruntime_ms"] for r in rows if r["onnxruntime_ms"] is not None)
    return dict(
        model=model_name, threads=threads, batch=batch, rounds=rounds, input_layout="NCHW",
        ours_forward_ms=ours_total, onnxruntime_run_ms=ort_total, speedup=ort_total / ours_total,
        speedup_per_round=statistics.median(o / f for f, o in zip(ours_ms, ort_ms)),
        rows=rows,
        # The timed runs' time outside the matched calls (unmatched ops, Python, layout moves, other nodes). Timed,
        # the fused model runs its modules (a replayed chain has no calls to time), so its remainder holds the Python
        # between the kernels that the plain, replayed forward above does not spend.
        observed_forward_ms=statistics.median(observed_ms), profiled_run_ms=statistics.median(profiled_ms),
        remainder=dict(ours_ms=statistics.median(observed_ms) - matched_ours,
                       onnxruntime_ms=statistics.median(profiled_ms) - matched_ort),
        unmatched_onnxruntime_convs=[dict(input=list(k[0]), weight=list(k[1]), ms=v)
                                     for k, v in conv_ms.items() if k not in claimed],
        environment=bench.environment(torch.device("cpu")), load_average=os.getloadavg(),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=shvit.list_models())
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--output", help="write the JSON here too")
    args = p.parse_args(argv)
    for flag in ("threads", "batch_size", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    r = compare(args.model, args.threads, args.batch_size, args.rounds)
    env = r["environment"]
    print(f"{r['model']} fp32 batch {r['batch']} NCHW, {r['threads']} thread(s), {r['rounds']} alternating rounds, "
          f"{env.get('cpu', '?')}: fused {r['ours_forward_ms']:.2f} ms, ONNX Runtime {r['onnxruntime_run_ms']:.2f} ms "
          f"-> {r['speedup']:.2f}x (per round {r['speedup_per_round']:.2f}x)")
    print(f"  timed runs (the fused model's modules, each call timed; ONNX Runtime profiling): fused "
          f"{r['observed_forward_ms']:.2f} ms, ONNX Runtime {r['profiled_run_ms']:.2f} ms")
    print(f"  {'ours ms':>8} {'ORT ms':>8} {'ORT/ours':>8}  calls  group")
    for row in r["rows"]:
        theirs = row["onnxruntime_ms"]
        cols = f"{theirs:8.2f} {row['speedup']:7.2f}x" if theirs is not None else f"{'-':>8} {'-':>8}"
        print(f"  {row['ours_ms']:8.2f} {cols}  x{row['calls']:<4d} {row['group']}")
    rest = r["remainder"]
    print(f"  {rest['ours_ms']:8.2f} {rest['onnxruntime_ms']:8.2f}           rest: the unmatched ops above and "
          f"everything between the kernels (Python, layout, ONNX Runtime's other nodes)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
