"""Model throughput under the paper's protocol, against every peer: ``python -m benchmarks.paper_protocol``.

Run from a checkout (the repository root); the options are ``python -m shvit bench``'s plus ``--peers``.

Protocol (spec section 5): BN folded, batch 256 on GPU / 16 on CPU, CPU at one thread by default, warm-up and
then timed windows. The peers run interleaved in one process (``shvit.bench.measure``: one window per peer
per round, each opened by an untimed call, median and min..max over rounds reported) so machine load and clock
drift hit them alike.

Peers (``--peers``, comma list; default: all but compile-max-autotune on CPU):
  eager            plain PyTorch modules (BN folded, torch ops only), NCHW
  eager-cl         the same, channels_last
  compile          torch.compile of eager-cl, default mode       (CPU here: 20-40 s, 8-24 s with a warm cache)
  compile-max-autotune  torch.compile mode="max-autotune"        (not timed here; autotunes each conv/GEMM,
                   so expect many times the default compile; off by default on CPU)
  cuda-graph       CUDA graph replay of eager-cl and of the fused model (GPU only)
  onnxruntime      ONNX Runtime CPU session of the plain fp32 model, intra-op threads = --threads (CPU; in a
                   bf16/fp16 run it stays fp32, the yardstick for the low-precision path)
  fused            this project: the fused model with the automatic backend choice and with each usable
                   backend forced
  train            training steps (forward, cross-entropy, backward, SGD step; BN with batch statistics;
                   autocast for bf16/fp16): plain PyTorch vs this project's ops; with peak memory
Peers that cannot run here are skipped with a printed reason and listed in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import shvit
import shvit_kernels
from shvit import bench
from shvit_kernels import dispatch

from benchmarks.device import git_revision, load_average, probe
from benchmarks.plain import to_plain

ALL_PEERS = ("eager", "eager-cl", "compile", "compile-max-autotune", "cuda-graph", "onnxruntime", "fused", "train")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Images for the low-precision top-1 agreement check (whole batches, at least this many).
AGREEMENT_IMAGES = 1024


def default_peers(device: torch.device) -> List[str]:
    return [p for p in ALL_PEERS if device.type == "cuda" or p != "compile-max-autotune"]


def parse_peers(text: Optional[str], device: torch.device) -> List[str]:
    if not text or text == "default":
        return default_peers(device)
    peers = list(ALL_PEERS) if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        raise ValueError(f"--peers: unknown {unknown}; choose from {', '.join(ALL_PEERS)} (or 'all', 'default')")
    return peers


class Skipped(Exception):
    """A peer that cannot run here; the message says why."""


def _first_call(fn: Callable, x: torch.Tensor, inference: bool = True, backend: Optional[str] = None) -> float:
    """Run once (compiles, autotunes, checks that a forced backend covers every op); returns the seconds it took."""
    start = time.perf_counter()
    with shvit_kernels.use_backend(backend), (torch.inference_mode() if inference else torch.enable_grad()):
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class CudaGraphed:
    """Replays one captured call; the input is copied into the captured buffer (that copy is timed too)."""

    def __init__(self, fn: Callable, example: torch.Tensor, backend: Optional[str] = None):
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with shvit_kernels.use_backend(backend), torch.inference_mode():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(self.static_in)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def _graphs_on(fused: torch.nn.Module) -> torch.nn.Module:
    """A copy of the fused model replaying its CUDA inference forward from CUDA graphs (the product's own path,
    against the benchmark's CudaGraphed wrapper)."""
    model = copy.deepcopy(fused)
    model.cuda_graphs = True
    return model


class OnnxRuntimeModel:
    """An ONNX Runtime CPU session of ``model`` exported at the example's shape (dynamo exporter, else TorchScript)."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, threads: int):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise Skipped(f"onnxruntime is not installed ({e})")
        self.path = os.path.join(tempfile.mkdtemp(prefix="shvit_onnx_"), "model.onnx")
        errors = []
        for dynamo, opset in ((True, 18), (False, 17)):
            try:
                torch.onnx.export(model, (example,), self.path, dynamo=dynamo, opset_version=opset,
                                  input_names=["x"], output_names=["logits"])
                self.exporter = f"{'dynamo' if dynamo else 'torchscript'} exporter, opset {opset}"
                break
            except Exception as e:  # exporters fail in many ways; try the next one
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {str(e)[:200]}")
        else:
            raise Skipped("torch.onnx.export failed: " + " | ".join(errors))
        self.threads = threads
        self.session = self.new_session()
        self.input_name = self.session.get_inputs()[0].name

    def new_session(self, profile_prefix: Optional[str] = None):
        """A CPU session of the exported model; with ``profile_prefix``, one that records ONNX Runtime's per-node
        profile (``end_profiling()`` writes it next to that prefix)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op workers would otherwise spin after each run and steal the cores from the variant timed
        # next (with 2 threads the fused model measured ~7% slower right after ONNX Runtime than elsewhere).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


class TrainStep:
    """One optimisation step; returns the loss. Autocast (when set on the Variant) comes from ``measure``."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor):
        self.model = model.train()
        self.labels = labels
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x).float(), self.labels)
        loss.backward()
        self.opt.step()
        return loss.detach()


def step_memory(v: bench.Variant, x: torch.Tensor, dtype: torch.dtype) -> Dict[str, float]:
    """Tensors saved for backward by one step (MiB, by storage) and, on CUDA, the peak allocated during it."""
    saved: Dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    dev = x.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with bench._context(v, dev, dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v.model(x)
    out = {"saved_for_backward_MiB": sum(saved.values()) / 2**20}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["peak_allocated_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def usable_backends(fn: Callable, x: torch.Tensor, inference: bool) -> Tuple[List[str], Dict[str, str]]:
    """Backends that can run every op of ``fn(x)`` when forced, and why the others cannot."""
    ok, why = [], {}
    for name in dispatch.BACKENDS:
        reasons = dispatch.unavailable_reasons(name)
        if reasons:
            why[name] = "; ".join(reasons)
            continue
        try:
            _first_call(fn, x, inference, backend=name)
            ok.append(name)
        except RuntimeError as e:
            why[name] = str(e).splitlines()[0][:300]
    return ok, why


def inference_variants(peers, fused, fused_fmt, plain, x, device, dtype, threads, skipped, setup_s) -> List[bench.Variant]:
    """The inference peers that can run here (eager first: the others' outputs are compared with it)."""
    cl = torch.channels_last
    plain_nchw = plain
    plain_cl = copy.deepcopy(plain).to(memory_format=cl)
    variants: List[bench.Variant] = []

    def add(peer: str, name: str, build: Callable[[], Callable], fmt=None, backend=None, input_dtype=None):
        if peer not in peers:
            return
        try:
            start = time.perf_counter()  # setup time: building (export, compile wrapper) and the first call
            model = build()
            xin = x.to(input_dtype or x.dtype).contiguous(memory_format=fmt or torch.contiguous_format)
            _first_call(model, xin, backend=backend)
            setup_s[name] = time.perf_counter() - start
            variants.append(bench.Variant(name, model, backend=backend, input_format=fmt, input_dtype=input_dtype))
        except Skipped as e:
            skipped.append(dict(peer=name, reason=str(e)))
        except Exception as e:  # compile / export failures are reported, not fatal
            skipped.append(dict(peer=name, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))

    add("eager", "eager (plain torch, NCHW)", lambda: plain_nchw)
    add("eager-cl", "eager (plain torch, channels_last)", lambda: plain_cl, cl)
    add("compile", "torch.compile default (channels_last)", lambda: torch.compile(plain_cl), cl)
    add("compile-max-autotune", "torch.compile max-autotune (channels_last)",
        lambda: torch.compile(plain_cl, mode="max-autotune"), cl)
    if "cuda-graph" in peers:
        if device.type != "cuda":
            skipped.append(dict(peer="cuda-graph", reason="needs a CUDA device"))
        else:
            add("cuda-graph", "CUDA graph of eager channels_last", lambda: CudaGraphed(plain_cl, x.contiguous(memory_format=cl)), cl)
            add("cuda-graph", "CUDA graph of shvit_kernels fused (auto)",
                lambda: CudaGraphed(fused, x.contiguous(memory_format=fused_fmt or torch.contiguous_format)), fused_fmt)
            add("cuda-graph", "shvit_kernels fused (auto), model.cuda_graphs = True", lambda: _graphs_on(fused),
                fused_fmt)
    if "onnxruntime" in peers:
        if device.type != "cpu":
            skipped.append(dict(peer="onnxruntime", reason="runs on CPU only (ONNX Runtime's CPU provider)"))
        elif dtype == torch.float32:
            add("onnxruntime", "ONNX Runtime CPU", lambda: OnnxRuntimeModel(plain_nchw, x, threads))
        else:  # the fp32 session is the yardstick for the low-precision CPU path
            add("onnxruntime", "ONNX Runtime CPU (fp32)",
                lambda: OnnxRuntimeModel(copy.deepcopy(plain_nchw).float(), x.float(), threads),
                input_dtype=torch.float32)
    if "fused" in peers:
        xin = x.contiguous(memory_format=fused_fmt) if fused_fmt else x
        add("fused", "shvit_kernels fused (auto)", lambda: fused, fused_fmt)
        ok, why = usable_backends(fused, xin, inference=True)
        for name, reason in why.items():
            skipped.append(dict(peer=f"shvit_kernels fused ({name})", reason=reason))
        for name in ok:
            add("fused", f"shvit_kernels fused ({name})", lambda: fused, fused_fmt, backend=name)
    return variants


@contextlib.contextmanager
def _full_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN's convs default to TF32 on CUDA), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fp32_reference(model: torch.nn.Module, fmt) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused fp32 model run on the pure-PyTorch reference kernels (their spec).

    Forced, no op is autotuned and the input layout is not timed (model._run_layout), so nothing is compiled:
    the fp32 fused model on automatic dispatch timed and compiled fp32 Triton kernels past the GPU check's time
    box (H200, 2026-12-04).
    """
    with shvit_kernels.use_backend("reference"):
        reference = shvit.fuse(model).float().to(memory_format=fmt or torch.contiguous_format)

    def run(x: torch.Tensor) -> torch.Tensor:
        with shvit_kernels.use_backend("reference"), _full_fp32():
            return reference(x)

    return run


def low_precision_agreement(model: torch.nn.Module, fused: torch.nn.Module, size: int, batch: int, batches: int,
                            fmt) -> Dict[str, float]:
    """Top-1 agreement of the low-precision fused model with the fp32 fused model (reference kernels, no TF32) on
    fresh random images."""
    device, dtype = next(fused.parameters()).device, next(fused.parameters()).dtype
    reference = _fp32_reference(model, fmt)
    g = torch.Generator().manual_seed(2)
    agree, total, worst = 0, 0, 0.0
    with torch.inference_mode():
        for _ in range(batches):
            x = torch.randn(batch, 3, size, size, generator=g).to(device)
            x = x.contiguous(memory_format=fmt or torch.contiguous_format)
            want, got = reference(x), fused(x.to(dtype)).float()
            agree += (want.argmax(1) == got.argmax(1)).sum().item()
            total += batch
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return dict(images=total, top1_agreement=agree / total, max_rel_logit_err=worst,
                fp32_side="fused model on the reference kernels, no TF32")


def training_variants(model, x, labels, fmt, dtype, skipped, setup_s) -> List[bench.Variant]:
    low = dtype != torch.float32
    xin = x.contiguous(memory_format=fmt) if fmt else x
    variants = []

    def add(name, m, backend=None):
        m = copy.deepcopy(m).to(memory_format=fmt or torch.contiguous_format)
        v = bench.Variant(name, TrainStep(m, labels), backend=backend, autocast=low, inference=False, input_format=fmt)
        try:
            with bench._context(v, x.device, dtype):
                setup_s[name] = _first_call(v.model, xin, inference=False, backend=backend)
            variants.append(v)
        except RuntimeError as e:
            skipped.append(dict(peer=name, reason=str(e).splitlines()[0][:300]))

    add("train: eager (plain torch)", to_plain(model))
    add("train: shvit_kernels (auto)", model)
    probe_model = copy.deepcopy(model).train()
    for name in dispatch.BACKENDS:
        reasons = dispatch.unavailable_reasons(name)
        if reasons:
            skipped.append(dict(peer=f"train: shvit_kernels ({name})", reason="; ".join(reasons)))
            continue
        try:
            with torch.autocast(x.device.type, dtype=dtype, enabled=low):
                _first_call(lambda t: probe_model(t).float().sum().backward(), xin, inference=False, backend=name)
        except RuntimeError as e:
            skipped.append(dict(peer=f"train: shvit_kernels ({name})", reason=str(e).splitlines()[0][:300]))
            continue
        add(f"train: shvit_kernels ({name})", model, backend=name)
    return variants


def run_paper_suite(args) -> int:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if args.model not in shvit.list_models():
        raise ValueError(f"--model must be one of {shvit.list_models()}, got {args.model!r}")
    peers = parse_peers(getattr(args, "peers", None), dev)
    threads = args.threads or (1 if dev.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    dtype = bench.DTYPES[args.dtype]
    size = args.img_size or bench.PAPER_IMG_SIZE[args.model]
    load_start = load_average()
    print(f"paper suite: {args.model} {size}px batch {args.batch_size} {dev} {args.dtype} threads {threads}; "
          f"peers {', '.join(peers)}; load average {load_start}", flush=True)

    torch.manual_seed(0)
    model = shvit.create_model(args.model).to(dev)
    bench._randomize_bn(model)
    fmt = None if args.nchw else torch.channels_last
    fused = shvit.fuse(model).to(dtype).to(memory_format=fmt or torch.contiguous_format)
    plain = to_plain(shvit.fuse(model)).to(dtype)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(args.batch_size, 3, size, size, generator=g).to(dev, dtype) for _ in range(3)]

    skipped: List[dict] = []
    setup_s: Dict[str, float] = {}
    variants = inference_variants(peers, fused, fmt, plain, inputs[0], dev, dtype, threads, skipped, setup_s)
    for s in skipped:
        print(f"  skipped {s['peer']}: {s['reason']}", flush=True)
    report = bench.Report(args.model, args.batch_size, size, str(dev), args.dtype, threads, environment=bench.environment(dev))
    if variants:
        report.results = bench.measure(variants, inputs, dev, dtype, args.warmup, args.window, args.rounds)
        for r in report.results:
            r.extra["setup_s"] = round(setup_s.get(r.name, 0.0), 3)
        print(report.table(), flush=True)

    env = dict(report.environment)
    via_main = sys.argv[0].endswith(os.path.join("benchmarks", "paper_protocol.py"))
    command = ("python -m benchmarks.paper_protocol " + " ".join(sys.argv[1:])) if via_main else " ".join(sys.argv)
    env.update(command=command, load_average_start=load_start, git=git_revision())
    result = dict(
        suite="paper",
        model=args.model,
        img_size=size,
        batch_size=args.batch_size,
        device=str(dev),
        dtype=args.dtype,
        threads=threads,
        channels_last=not args.nchw,
        protocol=dict(warmup_s=args.warmup, window_s=args.window, rounds=args.rounds, bn_folded=True,
                      window_opens_untimed=True,
                      note="peers interleaved in one process, each window opened by an untimed call; median and "
                           "min..max over rounds"),
        environment=env,
        probe={},
        inference=[asdict(r) for r in report.results],
        low_precision_vs_fp32={},
        training=[],
        skipped=skipped,
        complete=False,  # True once the agreement, training and probe parts are in
    )
    path = args.output or os.path.join(RESULTS_DIR, result_name(result))

    def save() -> None:
        env["load_average_end"] = load_average()
        write_report(path, result)

    # Saved as soon as the table is measured: a run stopped in a later part (a time box) keeps it.
    save()

    if dtype != torch.float32 and "fused" in peers:
        agreement = low_precision_agreement(model, fused, size, args.batch_size,
                                              -(-AGREEMENT_IMAGES // args.batch_size), fmt)
        print(f"{args.dtype} fused vs fp32 fused on {agreement['images']} random images: top-1 agreement "
              f"{agreement['top1_agreement']:.4f}, max relative logit error {agreement['max_rel_logit_err']:.2e}",
              flush=True)
        result["low_precision_vs_fp32"] = agreement
        save()

    train_results = []
    if "train" in peers:
        n_skipped = len(skipped)
        labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(dev)
        train_inputs = [x.float() for x in inputs]
        tv = training_variants(model, train_inputs[0], labels, fmt, dtype, skipped, setup_s)
        for s in skipped[n_skipped:]:
            print(f"  skipped {s['peer']}: {s['reason']}", flush=True)
        if tv:
            memory = {v.name: step_memory(v, train_inputs[0].contiguous(memory_format=fmt or torch.contiguous_format), dtype) for v in tv}
            train_results = bench.measure(tv, train_inputs, dev, dtype, args.warmup, args.window, args.rounds)
            for r in train_results:
                r.extra.update(memory[r.name])
                r.extra["setup_s"] = round(setup_s.get(r.name, 0.0), 3)
            train_report = bench.Report(args.model, args.batch_size, size, str(dev), args.dtype, threads, train_results)
            print(train_report.table().replace("img/s", "img/s (train)", 1), flush=True)
            for r in train_results:
                print(f"  {r.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.extra.items()))
        result["training"] = [asdict(r) for r in train_results]
        save()

    result["probe"] = probe(dev, dtypes=sorted({torch.float32, dtype}, key=str))
    result["complete"] = True
    save()
    print(f"saved {path}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def write_report(path: str, result: dict) -> None:
    """Write the JSON through a temporary file and os.replace: a reader, or a run stopped while writing, sees the
    previous whole file or the new one, never a truncated one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # same folder: os.replace stays one rename
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def result_name(r: dict) -> str:
    threads = f"_t{r['threads']}" if r["device"] == "cpu" else ""
    return f"paper_{r['model']}_{r['img_size']}px_b{r['batch_size']}_{r['device'].split(':')[0]}_{r['dtype']}{threads}.json"


def build_parser() -> argparse.ArgumentParser:
    from shvit.__main__ import add_bench_arguments

    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_protocol", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    p.add_argument("--peers", default=None,
                   help="comma list of peers (eager, eager-cl, compile, compile-max-autotune, cuda-graph, onnxruntime, "
                        "fused, train), 'all' or 'default' (see this module's docstring)")
    return p


def main(argv=None) -> int:
    from shvit.__main__ import default_batch_size

    args = build_parser().parse_args(argv)
    default_batch_size(args)
    try:
        return run_paper_suite(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
