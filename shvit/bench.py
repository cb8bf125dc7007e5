"""Model throughput: the reference model against the fused model on the best backends, measured side by side.

Variants run interleaved in one process (one timed window of each per round, rounds repeated), so drift in
clock speed or machine load hits them alike; medians and the spread over rounds are reported, and each variant's
speed against the first per round (:func:`paired_speedup`): on a shared machine whose speed drifts by tens of percent
within a run, the ratio within a round is steadier than the ratio of two medians.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import shvit_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Resolution each variant was measured at in the paper (spec table).
PAPER_IMG_SIZE = {"shvit_s1": 224, "shvit_s2": 224, "shvit_s3": 224, "shvit_s4": 256}


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    backend: Optional[str] = None  # forced backend, or None for the dispatcher's choice
    autocast: bool = False
    inference: bool = True  # run under torch.inference_mode (False for training steps)
    input_format: Optional[torch.memory_format] = None  # convert the inputs once, before timing
    input_dtype: Optional[torch.dtype] = None  # likewise (an fp32 peer in a low-precision run)


@dataclass
class Result:
    name: str
    img_per_s: float
    ms_per_batch_median: float
    ms_per_batch_min: float
    ms_per_batch_max: float
    rounds: int
    max_rel_diff_vs_first: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)  # e.g. peak memory of a training step
    ms_per_round: List[float] = field(default_factory=list)  # ms per batch in each round, in round order


def paired_speedup(ms_per_round: Sequence[float],
                   reference_ms_per_round: Sequence[float]) -> Optional[Tuple[float, float, float]]:
    """Speed over the reference within each round (reference ms / ms): (median, min, max) over the rounds, or None
    when either has no per-round times or they differ in number (results saved before rounds were kept)."""
    if not ms_per_round or len(ms_per_round) != len(reference_ms_per_round):
        return None
    ratios = [ref / mine for mine, ref in zip(ms_per_round, reference_ms_per_round)]
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass
class Report:
    model: str
    batch_size: int
    img_size: int
    device: str
    dtype: str
    threads: int
    results: List[Result] = field(default_factory=list)
    environment: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        base = self.results[0].img_per_s if self.results else 1.0
        width = max([28] + [len(r.name) + 2 for r in self.results])
        lines = [
            f"{self.model} batch {self.batch_size} {self.img_size}px {self.device} {self.dtype} threads {self.threads}",
            f"{'variant':<{width}}{'img/s':>12}{'ms/batch (median)':>20}{'min..max':>20}{'speed-up':>10}"
            f"{'per round (min..max)':>24}{'max rel diff':>14}",
        ]
        for r in self.results:
            spread = f"{r.ms_per_batch_min:.2f}..{r.ms_per_batch_max:.2f}"
            paired = paired_speedup(r.ms_per_round, self.results[0].ms_per_round)
            per_round = f"{paired[0]:.2f}x ({paired[1]:.2f}..{paired[2]:.2f})" if paired else "n/a"
            lines.append(
                f"{r.name:<{width}}{r.img_per_s:>12.1f}{r.ms_per_batch_median:>20.2f}{spread:>20}"
                f"{r.img_per_s / base:>9.2f}x{per_round:>24}{r.max_rel_diff_vs_first:>14.2e}"
            )
        return "\n".join(lines)


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": shvit_kernels.autotune.machine()["cpu"],  # model name with family and model numbers
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "shvit_kernels": shvit_kernels.__version__,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _context(v: Variant, device: torch.device, dtype: torch.dtype):
    stack = contextlib.ExitStack()
    if v.inference:
        stack.enter_context(torch.inference_mode())
    stack.enter_context(shvit_kernels.use_backend(v.backend))
    if v.autocast:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    return stack


def measure(
    variants: List[Variant],
    inputs: List[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    warmup_s: float = 1.0,
    window_s: float = 0.5,
    rounds: int = 7,
) -> List[Result]:
    """Warm each variant up, then alternate timed windows of ``window_s`` per variant for ``rounds`` rounds.

    ``inputs`` rotate between calls so no variant is flattered by a cache holding its one input. Each window starts
    with one untimed call: the first call after another variant refills the caches that variant's model evicted, and
    with two or three calls per window (S4 on a CPU thread) it weighed on whichever variant followed another model
    (Intel Xeon, 2026-12-03: the fused model's default dispatch, after ONNX Runtime, measured 0.91x the same model
    with the cpp backend forced, which followed it warm; ONNX Runtime's lead over eager PyTorch went from 1.42x to
    1.34x once every window opened warm).
    """
    per_variant = {
        v.name: [x.to(v.input_dtype or x.dtype).contiguous(memory_format=v.input_format or torch.contiguous_format)
                 if (v.input_format or v.input_dtype) else x for x in inputs]
        for v in variants
    }
    outputs = []
    for v in variants:
        first_input = per_variant[v.name][0]
        with _context(v, device, dtype):
            outputs.append(v.model(first_input).detach().float())
            deadline = time.perf_counter() + warmup_s
            while time.perf_counter() < deadline:
                v.model(first_input)
            _sync(device)
    samples: Dict[str, List[float]] = {v.name: [] for v in variants}
    counter = 0
    from tqdm import tqdm

    # A bar with ETA on a terminal (the rounds take rounds x variants x window_s); nothing in logs or pipes.
    bar = tqdm(total=rounds * len(variants), desc="timing", unit="window", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())
    for _ in range(rounds):
        for v in variants:
            bar.update()
            with _context(v, device, dtype):
                mine = per_variant[v.name]
                # One untimed call first (see above).
                v.model(mine[counter % len(mine)])
                counter += 1
                _sync(device)
                start = time.perf_counter()
                calls = 0
                while True:
                    v.model(mine[counter % len(mine)])
                    counter += 1
                    calls += 1
                    if calls % 2 == 0 or device.type != "cuda":
                        _sync(device)
                        if time.perf_counter() - start >= window_s:
                            break
                samples[v.name].append((time.perf_counter() - start) / calls)
    bar.close()
    first = outputs[0]
    results = []
    for v, out in zip(variants, outputs):
        s = samples[v.name]
        med = statistics.median(s)
        diff = ((out - first).abs().max() / first.abs().max().clamp_min(1e-30)).item()
        results.append(Result(v.name, inputs[0].shape[0] / med, med * 1e3, min(s) * 1e3, max(s) * 1e3, rounds, diff,
                              ms_per_round=[t * 1e3 for t in s]))
    return results


def model_variants(model_name: str, device: torch.device, dtype: torch.dtype, channels_last: bool) -> List[Variant]:
    """Reference (unfused, reference ops), fused on reference ops, fused on the best available backends, and on CUDA
    the same replayed from CUDA graphs."""
    import shvit

    model = shvit.create_model(model_name).to(device).eval()
    _randomize_bn(model)
    fused = shvit.fuse(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    low = dtype != torch.float32
    models = {}
    for name, m in (("unfused", model), ("fused", fused)):
        m = m.to(memory_format=fmt)
        models[name] = m.to(dtype) if low else m
    variants = [
        Variant("reference (unfused)", models["unfused"], backend="reference"),
        Variant("fused, reference ops", models["fused"], backend="reference"),
        Variant("fused, best backends", models["fused"], backend=None),
    ]
    if device.type == "cuda":  # op by op the fused model is host-bound there; replayed, it is not (model.cuda_graphs)
        graphed = copy.deepcopy(models["fused"])
        graphed.cuda_graphs = True
        variants.append(Variant("fused, best backends, CUDA graphs", graphed, backend=None))
    return variants


def _randomize_bn(model: torch.nn.Module) -> None:
    """Fresh models have identity BNs and zero-init residual branches; random statistics make outputs meaningful."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def run_model_bench(
    model: str = "shvit_s1",
    batch_size: int = 16,
    img_size: Optional[int] = None,
    device: str = "auto",
    dtype: str = "fp32",
    threads: Optional[int] = None,
    channels_last: bool = True,
    warmup_s: float = 1.0,
    window_s: float = 0.5,
    rounds: int = 7,
    variants_fn: Callable = model_variants,
) -> Report:
    import shvit

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if rounds < 1 or warmup_s < 0 or window_s <= 0:
        raise ValueError(f"--rounds must be >= 1, --warmup >= 0 and --window > 0; got {rounds}, {warmup_s}, {window_s}")
    if threads:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if model not in shvit.list_models():
        raise ValueError(f"--model must be one of {shvit.list_models()}, got {model!r}")
    size = img_size or PAPER_IMG_SIZE[model]
    variants = variants_fn(model, dev, torch_dtype, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(batch_size, 3, size, size, generator=g).to(dev, torch_dtype).contiguous(memory_format=fmt)
        for _ in range(3)
    ]
    report = Report(model, batch_size, size, str(dev), dtype, torch.get_num_threads(), environment=environment(dev))
    report.results = measure(variants, inputs, dev, torch_dtype, warmup_s, window_s, rounds)
    return report
