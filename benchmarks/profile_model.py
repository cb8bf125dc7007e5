"""Where the fused model's forward time goes: each shvit op call timed (inclusive), grouped by kind.

    python benchmarks/profile_model.py --model shvit_s1 --dtype fp32 --threads 1 [--onnxruntime] [--output FILE]

Every kernel the dispatcher picks is timed by a dispatch observer (CPU: wall clock; CUDA: synchronised), so the groups
add up to the kernels' time, and "outside the ops" is the rest of the forward (plain torch layers such as
the squeeze-excite gate and the head, plus Python and dispatch overhead).

``--isolated`` also times each kernel call of one forward repeated on its own (warm caches) and all of them back to
back: the first against the timed forward shows what the model's memory traffic costs each kind, the second what
the Python, dispatch and torch layers between the kernels cost.

``--onnxruntime`` (CPU, fp32) also profiles ONNX Runtime on the same folded model (its own per-node timer), grouped
the same way, so the two can be compared kind by kind; its 1x1 convs include the attention's q/k/v projections and
both halves of each FFN, which are separate kinds on the fused side.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shvit  # noqa: E402
from shvit import bench  # noqa: E402
from shvit_kernels import dispatch  # noqa: E402


def kind(op: str, args) -> str:
    if op != "conv_bias_act":
        return op
    x, weight, groups = args[0], args[1], args[5]
    if groups > 1:
        return f"conv_bias_act depthwise {weight.shape[2]}x{weight.shape[3]}"
    if tuple(weight.shape[2:]) == (1, 1):
        return "conv_bias_act 1x1"
    return f"conv_bias_act dense {weight.shape[2]}x{weight.shape[3]} ({x.shape[1]}->{weight.shape[0]})"


def flops(op: str, args) -> int:
    """Multiply-adds x 2 of one call's convolutions / GEMMs (the attention's own products for shsa_fused)."""
    x = args[0]
    n, c, h, w = x.shape
    if op == "conv_bias_act":
        weight, stride, padding = args[1], args[3], args[4]
        oh = (h + 2 * padding - weight.shape[2]) // stride + 1
        ow = (w + 2 * padding - weight.shape[3]) // stride + 1
        return 2 * n * oh * ow * weight.numel()
    if op == "ffn_fused":
        return 4 * n * h * w * args[1].shape[0] * c
    if op == "patch_embed":  # four 3x3 stride-2 convs
        total = 0
        for weight in args[1:9:2]:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            total += 2 * n * h * w * weight.numel()
        return total
    if op == "squeeze_excite":  # its two products on the pooled map
        return 2 * n * (args[1].numel() + args[3].numel())
    if op == "pooled_linear":  # the head's product on the pooled map
        return 2 * n * args[1].numel()
    if op == "shsa_fused":
        qkv_weight, qk_dim = args[1], args[3]
        p_dim = qkv_weight.shape[1]
        tokens = h * w
        return 2 * n * tokens * qkv_weight.numel() + 2 * n * tokens * tokens * (qk_dim + p_dim)
    return 0


class OpTimer:
    """A dispatch observer: each kernel call's time (inclusive, synchronised on CUDA), call count and FLOPs,
    under the key ``classify(call)`` gives with the call's FLOPs."""

    def __init__(self, device: torch.device, classify: Callable):
        self.device, self.classify = device, classify
        self.spent: Dict[tuple, float] = collections.defaultdict(float)
        self.calls: Dict[tuple, int] = collections.Counter()
        self.work: Dict[tuple, int] = collections.Counter()

    def __call__(self, call):
        key, products = self.classify(call)
        bench._sync(self.device)
        start = time.perf_counter()

        def done():
            bench._sync(self.device)
            self.spent[key] += time.perf_counter() - start
            self.calls[key] += 1
            self.work[key] += products

        return done

    def rows(self, iters: int, names: tuple) -> list:
        """One dict per key (its parts under ``names``): calls per iteration, ms per iteration, GFLOP/s."""
        return [dict(zip(names, key), calls=self.calls[key] // iters, ms=self.spent[key] / iters * 1e3,
                     gflop_per_s=self.work[key] / self.spent[key] / 1e9 if self.work[key] else None)
                for key in self.spent]


def print_ceiling_and_rows(result: Dict, columns: Callable, extra: str = "") -> None:
    """The measured matmul ceiling, then one line per row: ``columns(row)`` + ms, GFLOP/s, calls, kind, backend."""
    probe = result["probe"]
    peak = max(probe["matmul_TFLOPs"].values(), default=0) * 1e3
    print(f"  measured matmul ceiling: {peak:.0f} GFLOP/s{extra}")
    arithmetic = arithmetic_peak(result)
    if arithmetic:
        cores = probe.get("core_peak_GFLOPs", {})
        print(f"  measured per-core peaks: fp32 FMA {cores.get('fp32_fma', 0):.0f}, bf16 dot products "
              f"{cores.get('bf16_dot', 0):.0f}, AMX tiles {cores.get('amx_bf16', 0):.0f} GFLOP/s; bf16 multiplied as "
              f"{probe.get('bf16_products')} on {probe.get('bf16_pair_unit')}; "
              f"% below: of {arithmetic:.0f} GFLOP/s ({result['threads']} thread(s), the faster arithmetic usable)")
    for row in result["rows"]:
        rate = f"{row['gflop_per_s']:6.1f} GFLOP/s" if row.get("gflop_per_s") else " " * 13
        share = f" {row['gflop_per_s'] / arithmetic * 100:4.0f}%" if arithmetic and row.get("gflop_per_s") else " " * 6
        print(f"  {columns(row)}  {rate}{share}  x{row['calls']:<3d} {row['kind']} [{row['backend']}]")


def arithmetic_peak(result: Dict) -> float:
    """The arithmetic limit of the run (GFLOP/s): the faster measured per-core peak usable in its dtype, times
    its threads (0.0 off the CPU or when not measured)."""
    cores = result["probe"].get("core_peak_GFLOPs")
    if not cores:
        return 0.0
    bf16 = result.get("dtype") == "bfloat16" or result.get("amp") == "bf16"  # an inference or a training profile
    bf16_units = ("bf16_dot", "amx_bf16") if result["probe"].get("bf16_pair_unit") == "amx" else ("bf16_dot",)
    usable = [cores.get("fp32_fma", 0.0)] + ([cores.get(unit, 0.0) for unit in bf16_units] if bf16 else [])
    return max(usable) * result["threads"]


def write_json(path: str, result: Dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def isolated_times(calls, forward: Callable, device: torch.device, repeats: int = 9) -> tuple:
    """Each recorded kernel call repeated on its own (warm caches, its output memory reused), median seconds per
    call; and, in alternating rounds, ``forward()`` and all of the calls back to back (one forward's kernels without
    the Python, the dispatch and the torch layers between them): the medians of both and of the per-round
    differences, as this host's speed drifts within minutes."""
    kernels = [(dispatch.kernel(c.backend, c.op), c.args) for c in calls]
    each = []
    for kernel, args in kernels:
        for _ in range(2):
            kernel(*args)
        times = []
        for _ in range(repeats):
            bench._sync(device)
            start = time.perf_counter()
            kernel(*args)
            bench._sync(device)
            times.append(time.perf_counter() - start)
        each.append(statistics.median(times))

    def back_to_back():
        for kernel, args in kernels:
            kernel(*args)

    rounds = []
    for _ in range(repeats):
        pair = []
        for run in (forward, back_to_back):
            bench._sync(device)
            start = time.perf_counter()
            run()
            bench._sync(device)
            pair.append(time.perf_counter() - start)
        rounds.append(pair)
    medians = [statistics.median(r[i] for r in rounds) * 1e3 for i in (0, 1)]
    return each, dict(forward_ms=medians[0], kernels_back_to_back_ms=medians[1],
                      outside_kernels_ms=statistics.median((f - k) * 1e3 for f, k in rounds), rounds=len(rounds))


def profile(model_name: str, dtype: torch.dtype, threads: int, batch: int, iters: int, device: torch.device,
            isolated: bool = False) -> Dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = shvit.create_model(model_name).to(device).eval()
    bench._randomize_bn(model)
    fused = shvit.fuse(model).to(dtype).to(memory_format=torch.channels_last)
    size = bench.PAPER_IMG_SIZE[model_name]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    timer = OpTimer(device, lambda call: ((kind(call.op, call.args), call.backend), flops(call.op, call.args)))

    with torch.inference_mode():
        for _ in range(3):
            fused(x)
        bench._sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fused(x)
        bench._sync(device)
        plain_ms = (time.perf_counter() - start) / iters * 1e3
        with dispatch.observe(timer):
            start = time.perf_counter()
            for _ in range(iters):
                fused(x)
            bench._sync(device)
            total_ms = (time.perf_counter() - start) / iters * 1e3
        if isolated:
            with dispatch.record() as calls:
                fused(x)
            each, back_to_back = isolated_times(calls, lambda: fused(x), device)
    rows = timer.rows(iters, ("kind", "backend"))
    if isolated:
        alone = collections.defaultdict(float)
        for call, seconds in zip(calls, each):
            alone[(kind(call.op, call.args), call.backend)] += seconds * 1e3
        for row in rows:
            row["isolated_ms"] = alone[(row["kind"], row["backend"])]
    rows.sort(key=lambda r: -r["ms"])
    rows.append(dict(kind="outside the ops", backend="torch", calls=0, ms=total_ms - sum(r["ms"] for r in rows)))
    from benchmarks.device import probe

    ceilings = probe(device, dtypes=(dtype,))
    result = dict(model=model_name, dtype=str(dtype).replace("torch.", ""), threads=threads, batch=batch,
                  device=str(device), forward_ms=plain_ms, forward_ms_with_timers=total_ms, rows=rows, probe=ceilings,
                  environment=bench.environment(device), load_average=os.getloadavg())
    if isolated:
        result["forward_vs_kernels"] = back_to_back
    return result


def onnxruntime_kind(node: dict) -> str:
    """A profiled ONNX Runtime node's kind, named like :func:`kind` for convolutions."""
    op = node["args"].get("op_name", "?")
    shapes = node["args"].get("input_type_shape") or []
    if op in ("Conv", "FusedConv") and len(shapes) >= 2:
        (weight,) = shapes[1].values()
        if weight[1] == 1:
            return f"Conv depthwise {weight[2]}x{weight[3]}"
        if weight[2:] == [1, 1]:
            return "Conv 1x1"
        (x,) = shapes[0].values()
        return f"Conv dense {weight[2]}x{weight[3]} ({x[1]}->{weight[0]})"
    return op


def profile_onnxruntime(model_name: str, threads: int, batch: int, iters: int) -> Dict:
    """ONNX Runtime's per-node kernel time on the fused model's plain-torch twin (fp32, CPU), grouped by kind."""
    import onnxruntime as ort

    from benchmarks.paper_protocol import OnnxRuntimeModel
    from benchmarks.plain import to_plain

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = shvit.create_model(model_name).eval()
    bench._randomize_bn(model)
    size = bench.PAPER_IMG_SIZE[model_name]
    x = torch.randn(batch, 3, size, size)
    runner = OnnxRuntimeModel(to_plain(shvit.fuse(model)).eval(), x, threads)
    for _ in range(3):
        runner(x)
    start = time.perf_counter()
    for _ in range(iters):
        runner(x)
    run_ms = (time.perf_counter() - start) / iters * 1e3
    session = runner.new_session(profile_prefix=os.path.join(os.path.dirname(runner.path), "profile"))
    feed = {runner.input_name: x.numpy()}
    for _ in range(3 + iters):  # warm-up runs are profiled too: counted below
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = iters + 3
    spent, calls = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[onnxruntime_kind(e)] += e["dur"] / 1e3
            calls[onnxruntime_kind(e)] += 1
    rows = [dict(kind=k, ms=v / runs, calls=calls[k] // runs) for k, v in spent.items()]
    rows.sort(key=lambda r: -r["ms"])
    return dict(model=model_name, threads=threads, batch=batch, run_ms=run_ms, node_ms=sum(r["ms"] for r in rows),
                rows=rows, onnxruntime=ort.__version__, exporter=runner.exporter)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shvit_s1", choices=shvit.list_models())
    p.add_argument("--dtype", default="fp32", choices=sorted(bench.DTYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--onnxruntime", action="store_true", help="also profile ONNX Runtime on the same folded model")
    p.add_argument("--isolated", action="store_true",
                   help="also time each kernel call repeated on its own, and one forward's kernels back to back")
    p.add_argument("--output", help="write the JSON here too")
    args = p.parse_args(argv)
    if args.onnxruntime and (args.device != "cpu" or args.dtype != "fp32"):
        p.error("--onnxruntime compares fp32 CPU runs: use --device cpu --dtype fp32")
    r = profile(args.model, bench.DTYPES[args.dtype], args.threads, args.batch_size, args.iters, torch.device(args.device),
                isolated=args.isolated)
    print(f"{r['model']} {r['dtype']} batch {r['batch']} threads {r['threads']} {r['device']}: forward "
          f"{r['forward_ms']:.2f} ms ({r['forward_ms_with_timers']:.2f} with timers), load {r['load_average'][0]:.2f}")
    if args.isolated:
        b = r["forward_vs_kernels"]
        print(f"  alternating rounds: forward {b['forward_ms']:.2f} ms, its kernels back to back "
              f"{b['kernels_back_to_back_ms']:.2f} ms, outside the kernels {b['outside_kernels_ms']:.2f} ms (median of "
              f"{b['rounds']} rounds' differences); 'alone': each call repeated on its own")

    def columns(row):
        text = f"{row['ms']:8.2f} ms {row['ms'] / r['forward_ms_with_timers'] * 100:5.1f}%"
        if args.isolated:
            text += f"  alone {row['isolated_ms']:7.2f} ms" if "isolated_ms" in row else " " * 18
        return text

    print_ceiling_and_rows(r, columns)
    if args.onnxruntime:
        o = r["onnxruntime"] = profile_onnxruntime(args.model, args.threads, args.batch_size, args.iters)
        print(f"ONNX Runtime {o['onnxruntime']}, same folded model: run {o['run_ms']:.2f} ms, its node timer "
              f"{o['node_ms']:.2f} ms")
        for row in o["rows"][:12]:
            print(f"  {row['ms']:8.2f} ms  x{row['calls']:<3d} {row['kind']}")
    if args.output:
        write_json(args.output, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
