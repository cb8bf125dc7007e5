#!/usr/bin/env python3
"""Ahead-of-time compile check of every Triton kernel specialization SHViT S1..S4 launch, with no GPU.

1. Capture: a stand-in Triton driver reports a CUDA target (sm_90 or sm_80); Triton's JIT cache hook records
   each launch's signature, constexprs, specialization attributes and options and skips the launch. The
   models run on CPU tensors with the triton backend forced (its device list widened to take them; every
   decline stays and is reported): eval (fused, model in the dtype), train (forward + backward,
   autocast as ``shvit train`` does) and fused_backward (gradients through a fused model), fp32 / fp16 /
   bf16, NCHW and channels_last, for the chosen batches.
   Kernels never execute, so this is fast; the launchers' tile choice sees the target's shared-memory limit.
2. Compile: each distinct specialization once, with the real compiler (``triton.compile`` of an
   ``ASTSource``) for the target. Shared memory comes from the metadata, registers and spill bytes from
   ptxas (the Triton wheel's, run with -v by the compiler).

Fails (exit 1) on a compile error, or shared memory above the target's per-block limit. Prints a table and
writes JSON (default ``benchmarks/results/triton_aot_sm{cc}.json`` with ``--full``).

    python tools/triton_aot_check.py            # CI: covering subset (one per kernel x constexprs x dtypes)
    python tools/triton_aot_check.py --full     # every distinct specialization, JSON under benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: must precede any triton import
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Max dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability.
SHARED_LIMIT = {90: 232448, 80: 166912}
MODELS = ("shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4")
RESOLUTION = {"shvit_s4": 256}  # the paper's input sizes; others 224
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "cl")
MODES = ("eval", "train", "fused_backward")  # fused_backward: gradients through a fused model (FFN backward)


# ---------------------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------------------
def _stand_in_driver(cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """Reports a CUDA target so the JIT binds and specializes launches as it would on that GPU."""

        def __init__(self):
            self.target = GPUTarget("cuda", cc, 32)

        def is_active(self):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("no GPU: the stand-in driver cannot benchmark")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return StandInDriver()


@contextlib.contextmanager
def _triton_on_cpu(cc: int, record):
    """Force the triton backend on CPU tensors, launches recorded (not run), the target's limits visible.
    ``record`` None: no recording hook, so launches compile (or hit the cache) as on the GPU; the caller keeps
    them from running."""
    import triton
    from triton import knobs

    from shvit_kernels import dispatch
    from shvit_kernels.backends import triton as backend
    from shvit_kernels.backends.triton import common as triton_common

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        record(fn.jit_function, compile)
        return True  # skip compile and launch

    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = triton.runtime.driver._active  # (reset_active() fails where no real driver exists)
    declined = []

    def recording_declines(op, check):
        def reasons(*args, **kwargs):
            rs = check(*args, **kwargs)
            if rs:
                declined.append((op, rs))
            return rs
        return reasons

    triton.runtime.driver.set_active(_stand_in_driver(cc))
    if record is not None:
        knobs.runtime.jit_cache_hook = hook
    patched = dispatch.patched_backend(
        "triton", device_types=("cuda", "cpu"), availability=lambda: [], verify_first_use=False,
        not_supported={op: recording_declines(op, f) for op, f in backend.NOT_SUPPORTED.items()})
    try:
        with patched, triton_common.target_shared_memory(SHARED_LIMIT[cc]), dispatch.use_backend("triton", strict=False):
            yield declined
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        triton.runtime.driver.set_active(saved_driver)


def _run_model(name, mode, dtype, layout, batch):
    from shvit import create_model

    torch.manual_seed(0)
    res = RESOLUTION.get(name, 224)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    model = create_model(name).to(memory_format=fmt)
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=fmt)
    if mode in ("eval", "fused_backward"):
        model = model.eval().fuse().to(dtype)
        # the layout asked for: with the backend forced a fused model would otherwise move NCHW to channels_last,
        # while autotuning on a GPU times both
        model.input_layout = "as_given"
    if mode == "eval":
        with torch.no_grad():
            model(x.to(dtype))
    elif mode == "fused_backward":
        model(x.to(dtype).requires_grad_()).float().sum().backward()
    else:
        model.train()
        x = x.repeat(2, 1, 1, 1) if batch == 1 else x  # the head's BatchNorm needs two samples to train
        amp = dtype if dtype != torch.float32 else None
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(x)
        out.float().sum().backward()


def record_launch(specs: dict, jit_fn, c, label: str) -> None:
    """Add one recorded launch (the JIT cache hook's ``compile`` dict) to ``specs``: {spec key: spec}, where a spec
    holds the kernel, its compile inputs and where it was seen."""
    sig = dict(c["signature"])
    constants = {tuple(k): v for k, v in c["constants"].items()}
    attrs = {tuple(k): v for k, v in c["configs"][0].items()}
    options = dict(num_warps=c["num_warps"], num_stages=c["num_stages"], num_ctas=c["num_ctas"])
    key = repr((jit_fn.fn.__module__, jit_fn.fn.__name__, sorted(sig.items()), sorted(constants.items()),
                sorted((k, repr(v)) for k, v in attrs.items()), sorted(options.items())))
    spec = specs.get(key)
    if spec is None:
        names = list(sig)
        spec = specs[key] = dict(
            module=jit_fn.fn.__module__, kernel=jit_fn.fn.__name__, signature=sig,
            constants=constants, attrs=attrs, options=options,
            constexprs={names[k[0]]: v for k, v in constants.items() if sig[names[k[0]]] == "constexpr"},
            declared={names[i]: constants.get((i,)) for i in jit_fn.constexprs},
            dtypes=sorted({t for t in sig.values() if t.startswith("*")}),
            seen=[], launches=0)
    spec["launches"] += 1
    if label not in spec["seen"]:
        spec["seen"].append(label)


def capture(cc, models, modes, dtypes, layouts, batches):
    """{spec key: spec} of every distinct launch of the models, and the calls the triton backend declined."""
    specs, declines = {}, {}
    current = {}

    def record(jit_fn, c):
        record_launch(specs, jit_fn, c, current["label"])

    for name in models:
        for mode in modes:
            for dname in dtypes:
                for layout in layouts:
                    for batch in batches:
                        current["label"] = f"{name} {mode} {dname} {layout} b{batch}"
                        with _triton_on_cpu(cc, record) as declined:
                            _run_model(name, mode, DTYPES[dname], layout, batch)
                        for op, rs in declined:
                            declines.setdefault(f"{op}: {'; '.join(rs)}", []).append(current["label"])
    return specs, declines


_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def covering_subset(specs):
    """One specialization per (kernel, declared constexprs, pointer element sizes, options): what sets tiles,
    code paths and shared memory. Left to --full: divisibility and ==1 specializations (vectorisation of
    loads and stores) and fp16 where a bf16 twin with the same tiles is kept (same sizes, same instructions).
    The largest shared-memory user of a group is the one with the most 16-byte divisible arguments."""
    chosen = {}
    for key, s in specs.items():
        sizes = tuple(_ELEMENT_BYTES.get(t.lstrip("*"), 0) for t in s["signature"].values() if t.startswith("*"))
        k = (s["kernel"], repr(sorted(s["declared"].items())), sizes, repr(sorted(s["options"].items())))
        best = chosen.get(k)
        if best is None or len(s["attrs"]) > len(specs[best]["attrs"]):
            chosen[k] = key
    return {key: specs[key] for key in chosen.values()}


# ---------------------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------------------
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_one(args):
    """Compile one specialization for ``cc``: dict of shared memory, registers, spills and tensor-core use."""
    spec, cc = args
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    src = ASTSource(jit_fn, spec["signature"], spec["constants"], spec["attrs"])
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec["options"]))
    except Exception as e:  # noqa: BLE001  (every compile failure is reported, with its message)
        return dict(error=f"{type(e).__name__}: {str(e)[:2000]}", seconds=time.time() - t0)
    text = log.getvalue()
    regs = spills = stack = None
    if _REGS.search(text) is None:  # cached compile: ptxas did not run, so run it on the cached PTX
        text = _ptxas_log(kernel.asm["ptx"], cc)
    if (m := _REGS.search(text)) is not None:
        regs = int(m.group(1))
    if (m := _PTXAS.search(text)) is not None:
        stack, spills = int(m.group(1)), max(int(m.group(2)), int(m.group(3)))
    sass_ops = kernel.asm.get("ptx", "")
    return dict(shared=int(kernel.metadata.shared), registers=regs, spill_bytes=spills, stack_bytes=stack,
                wgmma="wgmma.mma_async" in sass_ops, mma="mma.sync" in sass_ops,
                seconds=round(time.time() - t0, 2))


def _ptxas_log(ptx, cc):
    import subprocess
    import tempfile

    from triton import knobs

    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", str(p), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    return r.stderr + r.stdout


def config_label(spec):
    parts = [f"{k}={v}" for k, v in spec["constexprs"].items() if not k.startswith("s")]
    ones = [k for k, v in spec["constexprs"].items() if k.startswith("s") and v == 1]
    parts.append(f"warps={spec['options']['num_warps']}")
    parts.append("/".join(d.lstrip("*") for d in spec["dtypes"]))
    if ones:
        parts.append("unit:" + ",".join(ones))
    return " ".join(parts)


def check(cc, specs, jobs):
    limit = SHARED_LIMIT[cc]
    rows = []
    items = list(specs.values())
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_one, [(s, cc) for s in items], chunksize=1))
    for s, r in zip(items, results):
        row = dict(kernel=s["kernel"], config=config_label(s), constexprs={k: (v if isinstance(v, (int, float, bool, str)) else repr(v)) for k, v in s["constexprs"].items()},
                   num_warps=s["options"]["num_warps"], dtypes=s["dtypes"],
                   divisibility16=sorted(k for k, v in zip(s["signature"], range(len(s["signature"])))
                                         if any(a[0] == "tt.divisibility" for a in s["attrs"].get((v,), []))),
                   seen_in=s["seen"][:3], seen_count=len(s["seen"]), **r)
        problems = []
        if "error" in r:
            problems.append("compile error")
        elif r["shared"] > limit:
            problems.append(f"shared memory {r['shared']} B > {limit} B")
        row["ok"] = not problems
        row["problems"] = problems
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], -(r.get("shared") or 0), r["config"]))
    return rows


def print_table(cc, rows):
    print(f"\nsm_{cc}: {len(rows)} specializations (limit {SHARED_LIMIT[cc]} B shared per block)")
    print(f"{'kernel':24} {'shared B':>9} {'regs':>5} {'spill B':>8} {'tc':>5}  config")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:24} {'ERROR':>9}  {r['config']}: {r['error'][:200]}")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        flag = "  <-- " + "; ".join(r["problems"]) if r["problems"] else ""
        print(f"{r['kernel']:24} {r['shared']:>9} {r['registers'] or '?':>5} {r['spill_bytes'] if r['spill_bytes'] is not None else '?':>8} "
              f"{tc:>5}  {r['config']}{flag}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="compile every distinct specialization (default: covering subset)")
    ap.add_argument("--ci", action="store_true",
                    help="the CI run: sm_90, channels_last, fp32 and bf16, covering subset (layouts and fp16 only "
                         "change ==1/divisibility specializations, which --full compiles)")
    ap.add_argument("--arch", type=int, nargs="+", default=None, choices=sorted(SHARED_LIMIT),
                    help="compute capabilities (default 90 and 80; --ci: 90)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--batches", type=int, nargs="+", default=[2],
                    help="batch sizes (they set the M %% 16 specializations)")
    ap.add_argument("--kernels", nargs="+", default=None, help="compile only these kernels (e.g. _ffn_fwd_kernel)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for triton_aot_sm{cc}.json (default benchmarks/results with --full, none otherwise)")
    ap.add_argument("--fail-on-spills", action="store_true", help="also fail when a specialization spills")
    args = ap.parse_args(argv)
    if args.ci:
        args.full, args.layouts, args.dtypes = False, ["cl"], ["fp32", "bf16"]
    args.arch = args.arch or ([90] if args.ci else [90, 80])
    out_dir = args.out if args.out is not None else (ROOT / "benchmarks" / "results" if args.full else None)
    failed = False
    for cc in args.arch:
        t0 = time.time()
        specs, declines = capture(cc, args.models, args.modes, args.dtypes, args.layouts, args.batches)
        n_all = len(specs)
        if not args.full:
            specs = covering_subset(specs)
        if args.kernels:
            specs = {k: s for k, s in specs.items() if s["kernel"] in args.kernels}
        t1 = time.time()
        print(f"sm_{cc}: captured {n_all} distinct specializations in {t1 - t0:.0f} s; compiling {len(specs)}")
        rows = check(cc, specs, args.jobs)
        print_table(cc, rows)
        bad = [r for r in rows if not r["ok"]]
        spilling = [r for r in rows if r.get("spill_bytes")]
        print(f"sm_{cc}: {len(rows) - len(bad)}/{len(rows)} within limits, {len(spilling)} spilling, "
              f"{len(declines)} declined call kinds; compile {time.time() - t1:.0f} s")
        for d, where in declines.items():
            print(f"  declined: {d} ({len(where)} runs, e.g. {where[0]})")
        if args.fail_on_spills and spilling:
            failed = True
        failed |= bool(bad)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            doc = dict(target=f"sm_{cc}", shared_limit=SHARED_LIMIT[cc], full=args.full,
                       captured=n_all, compiled=len(rows), triton=__import__("triton").__version__,
                       torch=torch.__version__, models=args.models, modes=args.modes, dtypes=args.dtypes,
                       layouts=args.layouts, batches=args.batches, failures=len(bad), spilling=len(spilling),
                       declined={d: len(w) for d, w in declines.items()}, rows=rows)
            path = out_dir / f"triton_aot_sm{cc}.json"
            path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
