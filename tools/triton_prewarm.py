#!/usr/bin/env python3
"""Fill Triton's kernel cache for the lent GPU ahead of time, on a CPU machine, so the GPU check compiles little.

    PYTHONPATH=<triton of the GPU machine's version> python tools/triton_prewarm.py --device-python <python> [--jobs N]

On the H200 (2026-12-04) the GPU check spent its smoke, benchmark and op-benchmark time boxes compiling Triton
kernels. Triton finds a compiled kernel in its cache under a key made of its own build (``triton_key``: version,
Python sources, libtriton), the kernel's source and specialization, the target (ptxas version, sm_90) and the
options. Compiled here for sm_90 by the same Triton version, a kernel gets the key the GPU machine computes, except
that libtriton is built per Python version: ``--device-python`` names an interpreter of the GPU machine's Python
version that imports that Triton (e.g. a pyenv 3.12 with the cp312 wheel on its PYTHONPATH), and its
``triton_key()`` is used here. A kernel whose key still differs is simply compiled on the GPU, as before.

Captured with the stand-in driver of tools/triton_aot_check.py (nothing runs): the GPU check's smoke cases on the
triton backend (fp32, bf16, fp16, channels_last and NCHW, forward and backward), S1 at 224 and S4 at 256 fused in
bf16 at batch 256 (the benchmarks, both input layouts), S1 at batch 64 (the graph check) and an S1 training step
at batch 256 with bf16 autocast (the S1 benchmark's training peers). Written to
``.triton_cache/`` in the checkout (git-ignored), keeping only what a cache hit reads (metadata and cubin), and
packed as ``.triton_cache.tar.xz`` (2026-12-04: 843 kernels, 87 MiB, 11.2 MiB packed; about 3 minutes on two
cores). Carry the archive to the device (run's ``carry: [".triton_cache.tar.xz"]``): tools/gpu_check.py unpacks
and uses it and reports how many kernels it still had to compile. The cache holds absolute paths: the checkout
must be at the same path on both machines (/work/main in this workplace).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: must precede any triton import
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".triton_cache"  # where tools/gpu_check.py looks (it unpacks <cache>.tar.xz there first)
KEEP_SUFFIXES = (".json", ".cubin")  # what a cache hit reads: the metadata (and its group file) and the binary
for p in (ROOT, ROOT / "tools", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import triton_aot_check as aot  # noqa: E402


def device_triton_key(python: str) -> str:
    """``triton_key()`` as the GPU machine's Python computes it (its libtriton is built for that version)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = "import triton; from triton.runtime.cache import triton_key; print(triton.__version__); print(triton_key())"
    cmd = [*shlex.split(python), "-c", code]  # e.g. "env PYTHONPATH=/path/to/cp312/triton python3.12"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.split("\n")
    version, key = out[0].strip(), out[1].strip()
    import triton

    if version != triton.__version__:
        raise SystemExit(f"--device-python has triton {version}, this process {triton.__version__}: they must match")
    return key


def _smoke_run(name: str, dtype: torch.dtype, cl: bool) -> None:
    from helpers import backend_vs_fp64
    from shvit_kernels.testing.cases import CASES

    torch.manual_seed(0)
    backend_vs_fp64(dict(CASES)[name], dtype, "cpu", cl, "triton")


def capture_all(quick: bool) -> dict:
    from shvit_kernels import dispatch
    from shvit_kernels.testing.cases import CASES

    dispatch.set_verify(False)
    specs: dict = {}
    current = {}

    def record(jit_fn, c):
        aot.record_launch(specs, jit_fn, c, current["label"])

    runs = [(f"{m} bf16 {lay} b{b}", aot._run_model, (m, "eval", torch.bfloat16, lay, b))
            for m, b in (("shvit_s1", 256), ("shvit_s4", 256), ("shvit_s1", 64)) for lay in ("cl", "nchw")]
    runs.append(("shvit_s1 train bf16 cl b256", aot._run_model, ("shvit_s1", "train", torch.bfloat16, "cl", 256)))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    runs += [(f"smoke {n} {d} {'cl' if cl else 'nchw'}", _smoke_run, (n, d, cl))
             for cl in (True, False) for n, _ in CASES for d in dtypes]
    if quick:
        runs = runs[:1] + [r for r in runs if r[0].startswith("smoke")][:3]
    for i, (label, fn, args) in enumerate(runs):
        current["label"] = label
        try:
            with aot._triton_on_cpu(90, record):
                fn(*args)
        except Exception as e:  # noqa: BLE001  (a run that fails after its launches were recorded still counts)
            print(f"  {label}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        if i % 20 == 0:
            print(f"  captured {i + 1}/{len(runs)} runs, {len(specs)} distinct kernels", flush=True)
    return specs


def _init_worker(key: str, cache: Path) -> None:
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    import triton.compiler.compiler as compiler
    import triton.runtime.cache as cache

    cache.triton_key = lambda: key  # get_cache_key reads the module global
    if hasattr(compiler, "triton_key"):
        compiler.triton_key = lambda: key


def _compile(spec: dict):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    try:
        jit_fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        src = ASTSource(jit_fn, spec["signature"], spec["constants"], spec["attrs"])
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(spec["options"]))
        return spec["kernel"], None, time.time() - t0
    except Exception as e:  # noqa: BLE001
        return spec["kernel"], f"{type(e).__name__}: {str(e)[:200]}", time.time() - t0


def prune(cache: Path) -> int:
    """Keep the files a cache hit reads; group files list only those. Returns the bytes kept."""
    kept = 0
    for d in cache.iterdir():
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if not f.name.endswith(KEEP_SUFFIXES):
                f.unlink()
        for g in d.glob("__grp__*.json"):
            group = json.loads(g.read_text())
            group["child_paths"] = {k: v for k, v in group.get("child_paths", {}).items() if os.path.exists(v)}
            g.write_text(json.dumps(group))
        kept += sum(f.stat().st_size for f in d.iterdir())
    return kept


def verify(key: str, cache: Path, quick: bool) -> tuple:
    """The benchmark models' launches through Triton's own JIT path (as on the GPU, launches skipped) against the
    cache: (kernels the JIT found there, kernels it compiled anew). Anew means the keys differ from the GPU's."""
    import triton.compiler.compiler as compiler

    _init_worker(key, cache)
    before = {d.name for d in cache.iterdir()}
    compiled = []
    saved_run, saved_meta = compiler.CompiledKernel.run, compiler.CompiledKernel.launch_metadata
    compiler.CompiledKernel.run = property(lambda self: (lambda *args, **kwargs: None))  # nothing runs here
    compiler.CompiledKernel.launch_metadata = lambda self, *args: None
    saved_init = compiler.CompiledKernel.__init__

    def counting_init(self, src, metadata_group, hash):
        saved_init(self, src, metadata_group, hash)
        compiled.append(hash)

    compiler.CompiledKernel.__init__ = counting_init
    try:
        runs = [("shvit_s1", 256, "cl")] if quick else [("shvit_s1", 256, "cl"), ("shvit_s4", 256, "nchw")]
        for name, batch, layout in runs:
            with aot._triton_on_cpu(90, None):
                aot._run_model(name, "eval", torch.bfloat16, layout, batch)
    finally:
        compiler.CompiledKernel.run, compiler.CompiledKernel.__init__ = saved_run, saved_init
        compiler.CompiledKernel.launch_metadata = saved_meta
    new = {d.name for d in cache.iterdir()} - before
    return len(set(compiled)) - len(new), len(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device-python", required=True,
                    help="a Python of the GPU machine's version that imports the same Triton version as this one "
                         "(a command line: 'env PYTHONPATH=DIR python3.12' works)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="a few runs only (to try the tool)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    args = ap.parse_args(argv)
    cache, archive = args.cache.resolve(), Path(f"{args.cache.resolve()}.tar.xz")
    key = device_triton_key(args.device_python)
    t0 = time.time()
    specs = capture_all(args.quick)
    print(f"captured {len(specs)} distinct kernel specializations in {time.time() - t0:.0f} s", flush=True)
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    t1, failures = time.time(), []
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(key, cache)) as pool:
        for i, (kernel, error, secs) in enumerate(pool.map(_compile, specs.values())):
            if error:
                failures.append(f"{kernel}: {error}")
            if i % 25 == 0:
                print(f"  compiled {i + 1}/{len(specs)} ({time.time() - t1:.0f} s)", flush=True)
    kept = prune(cache)
    entries = sum(1 for d in cache.iterdir() if d.is_dir())
    import triton

    (cache / "PREWARM.json").write_text(json.dumps(dict(
        triton=triton.__version__, target="cuda sm_90", kernels=len(specs), cache_entries=entries,
        failures=failures, root=str(ROOT), seconds=round(time.time() - t0)), indent=1) + "\n")
    print(f"{entries} cache entries, {kept / 2**20:.1f} MiB in {cache} ({len(failures)} failed) in "
          f"{time.time() - t0:.0f} s")
    for f in failures[:10]:
        print("  failed:", f)
    found, anew = verify(key, cache, args.quick)
    print(f"verify: Triton's JIT path found {found} kernels of the benchmark models in the cache, compiled {anew} anew")
    with tarfile.open(archive, "w:xz") as tar:  # 87 MiB of cache packs to ~11 (the device takes 64 MiB in all)
        tar.add(cache, arcname=cache.name)
    print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB): carry it to the device")
    return 1 if failures or anew else 0


if __name__ == "__main__":
    sys.exit(main())
