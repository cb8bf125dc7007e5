"""One prepared GPU check for a lent GPU machine (one device call, at most ~9 minutes): ``bash tools/gpu_check.sh``.

Phases, in order, each a time-boxed subprocess (a failure or hang in one does not stop the next):
  env        nvidia-smi, driver, clocks, CUDA / torch / triton / Python versions, date
  build      the CUDA extension for this GPU's architecture with all cores (no CPU extension: not needed here)
  smoke      every op on every GPU backend (triton, cuda) vs the reference, fp32/bf16/fp16, forward and every
             gradient, under tests/helpers.py's tolerance rule (pass/fail, max error and bound, as JSON)
  graph      the fused S1 model's forward with host syncs turned into errors (torch.cuda.set_sync_debug_mode)
             and captured in a CUDA graph, per backend (issue 12 point 6: no host sync on the inference path);
             run early because it is cheap and decisive
  tests      the CUDA tests in parallel (pytest-xdist, all cores but two, at most 12), JUnit XML
  sanitizer  compute-sanitizer memcheck on a small run of each CUDA kernel
  bench_s1   paper protocol, S1 at 224, bf16, batch 256: fused vs eager (BN folded, channels_last),
  bench_s4   torch.compile and CUDA graphs (S4 at 256 likewise); short windows
  opbench    op microbenchmarks (benchmarks/test_op_bench.py) with achieved GB/s and TFLOP/s
  summary    one screen, also summary.json
A Triton cache compiled for this GPU on a CPU machine (tools/triton_prewarm.py) is unpacked and used when
``.triton_cache.tar.xz`` travels with the checkout; the summary says how many kernels were still compiled here.
Everything is written as it goes to $OUT when set, else benchmarks/results/gpu/ (at most 8 files: the device
tool brings back 8): gpu_check.log, results.json, junit.xml, paper_s1.json, paper_s4.json, ops.json,
summary.json, autotune.json (the backend autotuning chose per call signature, every phase's). ``--dry-run``
walks every phase on a CPU machine: what needs CUDA is skipped with its reason, the
rest runs on the CPU in a reduced form (smoke on the cpp backend, pytest and the benchmark command lines
collected or parsed only). Exit status: 1 if any phase failed, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "gpu")
# Seconds each phase may take at most; the whole run also stops starting phases near --budget (a phase that ends
# early leaves its time to the later ones). Observed on an H200 (16 cores), 2026-12-04: env 9, build 46 (one arch),
# smoke out at its 70 s box (230 entries done: Triton compiles), graph 36, tests 86, sanitizer 6, bench tables
# ~75 each (then out of time compiling the agreement's fp32 model, now on the reference kernels), opbench out at
# its 45 s box. Expected with these boxes: ~505 s of the 525 s default; boxes of the quick phases kept ~2-3x
# their time so that a hang there does not eat smoke's or the benchmarks' time.
BUDGETS = dict(env=30, build=120, smoke=110, graph=45, tests=90, sanitizer=30, bench_s1=85, bench_s4=85, opbench=45)
ALL_PHASES = tuple(BUDGETS)  # in the order they run
GPU_BACKENDS = ("triton", "cuda")
STICKY_CUDA = ("illegal memory access", "unspecified launch failure", "misaligned address", "CUDA error",
               "device-side assert", "an illegal instruction")


def parallel_workers() -> int:
    """Processes for the compile-bound phases: all cores but two (for the orchestrator and the driver), at most 12."""
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def dump(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def load(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


# =============================================================================================================
# Phases that run inside a subprocess: python tools/gpu_check.py --phase NAME --work DIR
# =============================================================================================================
def _tests_on_path():
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def phase_env(work: str, dry_run: bool) -> int:
    import platform

    import torch

    env = dict(date=now_iso(), python=platform.python_version(), torch=torch.__version__,
               torch_cuda=str(torch.version.cuda), cuda_available=torch.cuda.is_available(),
               kernel=platform.release(), cpu_count=os.cpu_count())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"not importable ({e})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_GiB=round(p.total_memory / 2**30, 1), l2_MiB=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    import shvit_kernels

    env["backends"] = {r["backend"] + "/" + r["op"]: (r["usable"], r["why"]) for r in shvit_kernels.backend_table()}
    dump(os.path.join(work, "env.json"), env)
    print(json.dumps({k: v for k, v in env.items() if k != "backends"}, indent=1))
    return 0


def _judge(got, eager, ref):
    """The numbers behind tests/helpers.assert_close_to_fp64, and its verdict."""
    import torch
    from shvit_kernels.testing import ERROR_FLOOR, assert_close_to_fp64

    r = ref.double()
    row = dict(shape_ok=tuple(got.shape) == tuple(r.shape))
    if row["shape_ok"]:
        row["err"] = (got.double() - r).abs().max().item()
        row["eager_err"] = (eager.double() - r).abs().max().item()
        row["bound"] = 2.0 * row["eager_err"] + ERROR_FLOOR[got.dtype] * max(r.abs().max().item(), 1e-30)
        row["finite"] = bool(torch.isfinite(got).all())
    try:
        assert_close_to_fp64(got, eager, ref)
        row["ok"] = True
    except AssertionError as e:
        row["ok"], row["why"] = False, str(e)
    return row


def _smoke_entries(dry_run: bool, backends, device):
    import torch

    from shvit_kernels.testing.cases import CASES

    first = ("conv-infer-dw3x3s1-residual", "conv-infer-1x1-relu", "conv-infer-stem0-3x3s2", "ffn-s1-stage1",
             "shsa-infer-s1-stage2", "conv-train-dw3x3s2-relu", "conv-train-1x1-residual", "shsa-train-s1-stage2",
             "conv-eval-dw3x3s1-residual", "shsa-eval-s1-stage2")
    by_name = dict(CASES)
    ordered = [n for n in first if n in by_name] + [n for n, _ in CASES if n not in first]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if dry_run:
        ordered, dtypes = ordered[:3], [torch.float32]
    # Representative cases in channels_last (the model's layout) first, then the rest, then NCHW.
    passes = [(True, ordered[:len(first)]), (True, ordered[len(first):]), (False, ordered)]
    for cl, names in passes:
        for name in names:
            for backend in backends:
                for dtype in dtypes:
                    key = f"{backend}/{str(dtype).split('.')[-1]}/{'cl' if cl else 'nchw'}/{name}"
                    yield key, backend, dtype, cl, name, by_name[name]


def phase_smoke(work: str, dry_run: bool) -> int:
    _tests_on_path()
    import torch

    from helpers import backend_vs_fp64
    from shvit_kernels import dispatch

    dispatch.set_verify(False)  # judge the kernels' own results, not the first-use check's reference fallback

    shard, shards = (int(v) for v in os.environ.get("GPU_CHECK_SHARD", "0/1").split("/"))
    path = os.path.join(work, f"smoke_{shard}.json")
    state = load(path, None) or dict(entries={}, backends={}, device=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        candidates = GPU_BACKENDS
    else:  # dry run: the harness on the CPU's compiled backend (or the reference) so the code path is exercised
        candidates = ("cpp",) if not dispatch.unavailable_reasons("cpp") else ("reference",)
    backends = []
    for b in candidates:
        reasons = dispatch.unavailable_reasons(b)
        state["backends"][b] = "usable" if not reasons else "unavailable: " + "; ".join(reasons)
        if not reasons:
            backends.append(b)
    state["device"] = device
    deadline = time.time() + float(os.environ.get("GPU_CHECK_PHASE_SECONDS", "1e9")) - 10
    entries = list(_smoke_entries(dry_run, backends, device))
    state["planned"] = len(entries[shard::shards])  # a phase stopped early then says how far it got
    dump(path, state)
    sticky = None
    for index, (key, backend, dtype, cl, name, build) in enumerate(entries):
        if index % shards != shard or key in state["entries"]:
            continue  # done before a restart
        if time.time() > deadline:
            state["stopped"] = "phase time box reached"
            break
        start = time.time()
        row = dict(backend=backend, dtype=str(dtype).split(".")[-1], layout="cl" if cl else "nchw", case=name)
        try:
            torch.manual_seed(0)
            calls, compared = backend_vs_fp64(build, dtype, device, cl, backend)
            if device == "cuda":
                torch.cuda.synchronize()
            row["ran"] = sorted({f"{c.op}:{c.backend}" for c in calls})
            if compared is None:
                reasons = {r for c in calls for r in dispatch.explain(c.op, *c.args).not_supported.get(backend, [])}
                row.update(status="declined", reasons=sorted(reasons))
            else:
                checks = {name: _judge(*triple) for name, triple in compared.items()}
                row["checks"] = checks
                row["status"] = "pass" if all(c["ok"] for c in checks.values()) else "fail"
        except Exception as e:  # one crash must not stop the rest
            msg = f"{type(e).__name__}: {e}"
            row.update(status="error", error=msg[:2000], traceback=traceback.format_exc()[-3000:])
            if device == "cuda" and any(s in msg for s in STICKY_CUDA):
                sticky = msg
        row["seconds"] = round(time.time() - start, 3)
        state["entries"][key] = row
        dump(path, state)
        print(f"{row['status']:8} {key} ({row['seconds']:.1f}s)"
              + (f"  {row.get('error', '')[:200]}" if row["status"] == "error" else ""), flush=True)
        if sticky:  # the CUDA context is unusable now; the orchestrator restarts this phase in a fresh process
            print(f"sticky CUDA error, restarting in a new process: {sticky[:300]}", flush=True)
            return 3
    return 0


def phase_graph(work: str, dry_run: bool) -> int:
    """Fused S1 bf16 channels_last forward: sync-debug mode 'error' (a host sync raises) and CUDA-graph capture."""
    _tests_on_path()
    import torch

    import shvit
    import shvit_kernels
    from shvit import bench
    from shvit_kernels import dispatch

    path = os.path.join(work, "graph.json")
    out = {}
    if not torch.cuda.is_available():
        out["skipped"] = "needs a CUDA device"
        dump(path, out)
        print(out["skipped"])
        return 0
    torch.manual_seed(0)
    model = shvit.create_model("shvit_s1").cuda().eval()
    bench._randomize_bn(model)
    fused = shvit.fuse(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
    xs = [torch.randn(64, 3, 224, 224, device="cuda").to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
          for _ in range(2)]
    for backend in (None, "triton", "cuda"):
        name = backend or "auto"
        row = out[name] = {}
        if backend and dispatch.unavailable_reasons(backend):
            row.update(status="skipped", reason="; ".join(dispatch.unavailable_reasons(backend)))
            print(f"{name}: skipped ({row['reason']})", flush=True)
            continue
        try:
            with shvit_kernels.use_backend(backend, strict=False), torch.inference_mode():
                with dispatch.record() as calls:
                    want0 = fused(xs[0])
                torch.cuda.synchronize()
                ran = {}
                for c in calls:
                    ran[c.backend] = ran.get(c.backend, 0) + 1
                row["op_calls_by_backend"] = ran
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fused(xs[0])
                    row["no_host_sync"] = True
                except RuntimeError as e:
                    row["no_host_sync"], row["sync_error"] = False, str(e)[:500]
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                static_in = xs[0].clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        fused(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = fused(static_in)
                static_in.copy_(xs[1])
                graph.replay()
                want1 = fused(xs[1])
                torch.cuda.synchronize()
                rel = ((static_out.float() - want1.float()).abs().max() / want1.float().abs().max()).item()
                row.update(captured=True, replay_vs_eager_max_rel=rel, eager_first_ok=bool(torch.isfinite(want0).all()))
                row["status"] = "pass" if row["no_host_sync"] and rel <= 1e-2 else "fail"
        except Exception as e:
            row.update(status="error", error=f"{type(e).__name__}: {str(e)[:1000]}")
        print(f"{name}: {json.dumps(row)}", flush=True)
        dump(path, out)
    dump(path, out)
    return 0 if all(r.get("status") in ("pass", "skipped") for r in out.values()) else 1


def phase_sanitize_kernels(work: str, dry_run: bool) -> int:
    """A small call of each CUDA kernel, forward and backward (run under compute-sanitizer by the orchestrator)."""
    _tests_on_path()
    import torch

    import test_backend_cuda as tb
    from shvit_kernels import dispatch

    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 0
    k = {op: dispatch.kernel("cuda", op) for op in dispatch.ops()}
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            tag = f"{str(dtype).split('.')[-1]} {'cl' if cl else 'nchw'}"
            steps = []
            for stride in (1, 2):
                a = tb.conv_bias_act_args(device="cuda", dtype=dtype, cl=cl, b=2, c=40, h=9, w=11, stride=stride,
                                          residual=True)
                steps.append((f"conv_bias_act s{stride}", lambda a=a: k["conv_bias_act_backward"](
                    torch.randn_like(o := k["conv_bias_act"](*a)), *a, o)))
                t = tb.conv_bn_train_args(device="cuda", dtype=dtype, cl=cl, b=2, c=40, h=9, w=11, stride=stride)

                def bn(t=t):
                    out, mean, var, _ = k["conv_bn_train"](*t)
                    x, w, g, b, s, p, grp, eps, relu, res = t
                    return k["conv_bn_train_backward"](torch.randn_like(out), x, w, g, b, mean, var, out, s, p, grp,
                                                       eps, relu, res is not None)
                steps.append((f"conv_bn_train s{stride}", bn))
            for case in (dict(b=2, c=80, p=75, h=7, w=7), dict(b=1, c=128, p=128, h=9, w=9)):
                f = tb.shsa_fused_args(device="cuda", dtype=dtype, cl=cl, **case)

                def fused(f=f):
                    out = k["shsa_fused"](*f)
                    x, wq, bq, qk, eps = f
                    return k["shsa_fused_backward"](torch.randn_like(out), x, wq, bq, out, qk, eps)
                steps.append((f"shsa_fused p{case['p']}", fused))
                t = tb.shsa_train_args(device="cuda", dtype=dtype, cl=cl, **case)

                def train(t=t):
                    out, mean, var = k["shsa_train"](*t)
                    x, gw, gb, wq, bw, bb, qk, ge, be = t
                    return k["shsa_train_backward"](torch.randn_like(out), x, gw, gb, wq, bw, bb, mean, var, out, qk,
                                                    ge, be)
                steps.append((f"shsa_train p{case['p']}", train))
            for name, step in steps:
                try:
                    step()
                    torch.cuda.synchronize()
                    print(f"ran  {name} {tag}", flush=True)
                except Exception as e:
                    failures += 1
                    print(f"FAIL {name} {tag}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 1 if failures else 0


PY_PHASES = {"env": phase_env, "smoke": phase_smoke, "graph": phase_graph, "sanitize-kernels": phase_sanitize_kernels}


# =============================================================================================================
# Orchestrator
# =============================================================================================================
class Check:
    def __init__(self, args):
        self.dry_run = args.dry_run
        self.only = set(args.only.split(",")) if args.only else None
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or DEFAULT_OUT)
        os.makedirs(self.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.start = time.time()
        self.deadline = self.start + args.budget
        self.log = open(os.path.join(self.out, "gpu_check.log"), "a", buffering=1)
        self.results = dict(started=now_iso(), dry_run=self.dry_run, budget_s=args.budget, out=self.out, phases={})
        self.python = sys.executable
        # the retest switch: calls a backend declines after an earlier GPU run got them wrong are run and judged
        # again (the phases run in processes of their own; the test suite ends a worker whose CUDA context is lost)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", SHVIT_KERNELS_RETEST_GPU_FAILURES="1",
                        PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        self.has_cuda = False
        # Triton kernels compiled ahead of time for this GPU on a CPU machine (tools/triton_prewarm.py), carried
        # in with the checkout: a kernel found there is not compiled here.
        self.triton_cache = os.path.join(ROOT, ".triton_cache")
        archive = self.triton_cache + ".tar.xz"
        if os.path.exists(archive) and not os.path.isdir(self.triton_cache):
            with tarfile.open(archive) as tar:
                tar.extractall(ROOT, filter="data")
        self.prewarmed = _cache_entries(self.triton_cache)
        if self.prewarmed:
            self.env["TRITON_CACHE_DIR"] = self.triton_cache
        self.results["triton_cache"] = dict(prewarmed=len(self.prewarmed))
        # Dispatch measured here: the autotuned choices of every phase land in one folder, saved as autotune.json
        self.tune_dir = os.path.join(self.work, "autotune")
        self.env["SHVIT_KERNELS_CACHE_DIR"] = self.tune_dir

    # ---- plumbing -------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        dump(os.path.join(self.out, "results.json"), self.results)

    def time_for(self, phase: str) -> float:
        return min(BUDGETS[phase], self.deadline - time.time() - 8)

    def run_cmd(self, cmd, timeout: float, env=None, label=None):
        """Runs cmd in its own process group, streaming output to stdout and the log; SIGINT at the time box
        (pytest then still writes its reports), SIGKILL 15 s later. Returns (rc, seconds, timed_out, tail)."""
        label = label or (cmd if isinstance(cmd, str) else " ".join(cmd))
        self.say(f"$ {label}")
        start = time.time()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True, shell=isinstance(cmd, str))
        except OSError as e:
            self.say(f"  cannot start: {e}")
            return 127, 0.0, False, str(e)
        tail = []

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                self.say("  " + line)
                tail.append(line)
                del tail[:-60]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"  time box of {timeout:.0f}s reached: interrupting")
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        reader.join(timeout=5)
        return proc.returncode, round(time.time() - start, 1), timed_out, "\n".join(tail)

    def py_phase(self, name: str, timeout: float, extra_env=None):
        cmd = [self.python, os.path.join(ROOT, "tools", "gpu_check.py"), "--phase", name, "--work", self.work]
        if self.dry_run:
            cmd.append("--dry-run")
        env = dict(self.env, GPU_CHECK_PHASE_SECONDS=str(timeout), **(extra_env or {}))
        return self.run_cmd(cmd, timeout, env=env)

    def phase(self, name: str, fn) -> None:
        t = self.time_for(name)
        rec = self.results["phases"].setdefault(name, {})
        if self.only is not None and name not in self.only and name not in ("env", "build"):
            rec.update(status="skipped", reason="not selected (--only)")
            return
        self.say(f"\n===== {name} (time box {max(t, 0):.0f}s, {time.time() - self.start:.0f}s elapsed) =====")
        if t < 10:
            rec.update(status="skipped", reason=f"out of time ({self.deadline - time.time():.0f}s left of the budget)")
            self.say(f"skipped: {rec['reason']}")
            self.save()
            return
        start = time.time()
        try:
            fn(rec, t)
        except Exception as e:  # the orchestrator's own bug must not lose the other phases
            rec.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        rec["seconds"] = round(time.time() - start, 1)
        self.say(f"----- {name}: {rec.get('status')}{' (' + rec['reason'] + ')' if rec.get('reason') else ''} "
                 f"in {rec['seconds']}s")
        self.save()
        try:
            self.summary(final=False)
        except Exception as e:  # a partial summary must not stop the run; the final one says the same
            self.say(f"  summary.json not updated: {type(e).__name__}: {e}")

    @staticmethod
    def _finish(rec, rc, timed_out, ok_status="pass"):
        if timed_out:
            rec.update(status="timeout", rc=rc)
        else:
            rec.update(status=ok_status if rc == 0 else "fail", rc=rc)

    # ---- phases ---------------------------------------------------------------------------------------------
    def do_env(self, rec, t):
        info = {}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = ("name,driver_version,compute_cap,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                 "temperature.gpu,power.draw,power.limit,persistence_mode")
            for label, cmd in (("nvidia-smi", [smi]), ("query", [smi, f"--query-gpu={q}", "--format=csv"])):
                rc, _, _, tail = self.run_cmd(cmd, 15)
                info[label] = tail if rc == 0 else f"rc {rc}: {tail[-300:]}"
        else:
            info["nvidia-smi"] = "not found"
        for tool in ("nvcc", "compute-sanitizer"):
            path = self.cuda_tool(tool)
            if path:
                rc, _, _, tail = self.run_cmd([path, "--version"], 15)
                info[tool] = tail.splitlines()[-2:] if rc == 0 else f"rc {rc}"
            else:
                info[tool] = "not found"
        info["uname"] = " ".join(os.uname())
        rc, _, timed_out, _ = self.py_phase("env", t - 5)
        py = load(os.path.join(self.work, "env.json"), {})
        info.update({k: v for k, v in py.items() if k != "backends"})
        info["backends_unusable"] = {k: v[1] for k, v in py.get("backends", {}).items() if not v[0]}
        self.has_cuda = bool(py.get("cuda_available"))
        self.results["environment"] = info
        self._finish(rec, rc, timed_out)

    def cuda_home(self):
        for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
                return cand
        nvcc = shutil.which("nvcc")
        if nvcc:  # follow a wrapper script to the toolkit it runs
            try:
                with open(nvcc, errors="replace") as f:
                    m = re.search(r"(/\S+)/bin/nvcc", f.read(4096))
                if m and os.path.exists(m.group(1) + "/bin/nvcc"):
                    return m.group(1)
            except OSError:
                pass
            return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return None

    def cuda_tool(self, tool):
        home = self.cuda_home()
        if home and os.path.exists(os.path.join(home, "bin", tool)):
            return os.path.join(home, "bin", tool)
        return shutil.which(tool)

    def do_build(self, rec, t):
        env = self.results.get("environment", {})
        if not self.has_cuda:
            rec.update(status="skipped", reason="no CUDA device / torch without CUDA: nothing to build for")
            return
        home = self.cuda_home()
        if not home:
            rec.update(status="fail", reason="no CUDA toolkit (nvcc) found")
            return
        arch = env.get("capability", "9.0")
        jobs = str(os.cpu_count() or 8)
        benv = dict(self.env, CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=jobs, SHVIT_CPU_CAPABILITIES="")
        rc, secs, timed_out, _ = self.run_cmd([self.python, "setup.py", "build_ext", "--inplace"], t - 20, env=benv,
                                              label=f"CUDA_HOME={home} TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={jobs} "
                                                    f"SHVIT_CPU_CAPABILITIES= python setup.py build_ext --inplace")
        rec.update(build_s=secs, arch=arch, jobs=jobs, cuda_home=home)
        so = glob.glob(os.path.join(ROOT, "shvit_kernels", "_C_cuda*.so"))
        rec["so"] = so
        if so and self.cuda_tool("cuobjdump"):
            _, _, _, tail = self.run_cmd([self.cuda_tool("cuobjdump"), "--list-elf", so[0]], 15)
            rec["elf"] = tail.splitlines()[:10]
        rc2, _, _, tail = self.run_cmd([self.python, "-c", "import torch, shvit_kernels._C_cuda as m; "
                                        "print(sorted(n for n in dir(m) if not n.startswith('_')))"], 60)
        rec["import"] = tail.splitlines()[-1:] if rc2 == 0 else f"rc {rc2}: {tail[-500:]}"
        self._finish(rec, rc if rc else rc2, timed_out)

    def do_smoke(self, rec, t):
        """Shards in parallel processes (Triton compiles each new kernel on one core; the GPU has room)."""
        end = time.time() + t
        # Triton compiles each kernel on one core of the process that first needs it: the H200 run of 2026-12-04
        # used 6 shards of 16 cores and spent its box compiling; the small cases leave the GPU idle anyway.
        shards = 1 if self.dry_run or not self.has_cuda else parallel_workers()
        outcome = {}

        def shard(i):
            restarts = 0
            while True:
                rc, _, timed_out, _ = self.py_phase("smoke", end - time.time(), {"GPU_CHECK_SHARD": f"{i}/{shards}"})
                if rc == 3 and restarts < 3 and end - time.time() > 20:
                    restarts += 1
                    continue
                outcome[i] = (rc, timed_out, restarts)
                return

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(shards)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rc = max(o[0] for o in outcome.values())
        timed_out = any(o[1] for o in outcome.values())
        restarts = sum(o[2] for o in outcome.values())
        state = dict(entries={}, backends={}, device=None, shards=shards, planned=0)
        for i in range(shards):
            part = load(os.path.join(self.work, f"smoke_{i}.json"), {}) or {}
            state["entries"].update(part.get("entries", {}))
            state["planned"] += part.get("planned", 0)
            state["backends"].update(part.get("backends", {}))
            state["device"] = part.get("device") or state["device"]
            if part.get("stopped"):
                state["stopped"] = part["stopped"]
        self.results["smoke"] = state
        counts = {}
        for row in state.get("entries", {}).values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        rec.update(counts=counts, planned=state["planned"], restarts=restarts, backends=state.get("backends"),
                   stopped=state.get("stopped"))
        bad = counts.get("fail", 0) + counts.get("error", 0)
        if timed_out:
            rec["status"] = "timeout"
        else:
            rec["status"] = "fail" if bad or rc not in (0,) else "pass"
        if not state.get("entries") and not timed_out and rc == 0:
            rec.update(status="fail" if self.has_cuda else "skipped",
                       reason="no entry ran" + ("" if self.has_cuda else " (no usable backend on this machine)"))

    def do_graph(self, rec, t):
        rc, _, timed_out, _ = self.py_phase("graph", t)
        self.results["graph"] = load(os.path.join(self.work, "graph.json"), {})
        if self.results["graph"].get("skipped"):
            rec.update(status="skipped", reason=self.results["graph"]["skipped"])
        else:
            self._finish(rec, rc, timed_out)

    def test_files(self):
        files = ["tests/test_backend_cuda.py", "tests/test_op_accuracy.py", "tests/test_backend_triton.py",
                 "tests/test_first_use_check.py", "tests/test_cuda_graphs.py"]
        return [f for f in files if os.path.exists(os.path.join(ROOT, f))]

    def do_tests(self, rec, t):
        junit = os.path.join(self.out, "junit.xml")
        cmd = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *self.test_files()]
        have = lambda mod: subprocess.run([self.python, "-c", f"import {mod}"], capture_output=True).returncode == 0
        collect_only = self.dry_run or not self.has_cuda
        if collect_only:
            cmd[cmd.index("-q")] = "-qq"
            cmd += ["--collect-only"]
        else:
            if have("xdist"):
                cmd += ["-n", str(parallel_workers())]
            if have("pytest_timeout"):
                cmd += ["--timeout", "90"]
            cmd += [f"--junitxml={junit}"]
        rc, _, timed_out, _ = self.run_cmd(cmd, t)
        if os.path.exists(junit) and not collect_only:
            rec["junit"] = summarize_junit(junit)
        self._finish(rec, rc, timed_out, ok_status="skipped" if collect_only else "pass")
        if collect_only and rc == 0:
            rec["reason"] = "needs a CUDA device (collected)"

    def do_sanitizer(self, rec, t):
        tool = self.cuda_tool("compute-sanitizer")
        if not self.has_cuda:
            rec.update(status="skipped", reason="needs a CUDA device")
            return
        if not tool:
            rec.update(status="skipped", reason="compute-sanitizer not found")
            return
        if not glob.glob(os.path.join(ROOT, "shvit_kernels", "_C_cuda*.so")):
            rec.update(status="skipped", reason="the CUDA extension was not built")
            return
        end = time.time() + t
        base = [tool, "--tool", "memcheck", "--error-exitcode", "86"]
        inner = [self.python, os.path.join(ROOT, "tools", "gpu_check.py"), "--phase", "sanitize-kernels", "--work",
                 self.work]
        # Only the project's kernels (namespace shvit) are instrumented: torch's own stay fast.
        for filt in (["--kernel-name", "kns=shvit"], []):
            rc, _, timed_out, tail = self.run_cmd(base + filt + inner, end - time.time())
            summary = re.findall(r"ERROR SUMMARY: (\d+) error", tail)
            if summary or timed_out or end - time.time() < 15:
                break
            self.say("  no ERROR SUMMARY: retrying without the kernel filter")
        rec.update(errors=int(summary[-1]) if summary else None, kernel_filter=bool(filt))
        if timed_out:
            rec["status"] = "timeout"
        elif summary and int(summary[-1]) == 0 and rc == 0:
            rec["status"] = "pass"
        else:
            rec.update(status="fail", rc=rc, reason="" if summary else "the sanitizer did not report (see log)")
        self.results["sanitizer"] = dict(rec)

    def bench_cmd(self, model, size, output):
        # S1 also times a training step (bf16 autocast) of the project's model against eager PyTorch (#19); after
        # the inference table, so a box reached there still leaves the table
        peers = "eager-cl,compile,cuda-graph,fused" + (",train" if model == "shvit_s1" else "")
        return ["-m", "benchmarks.paper_protocol", "--model", model, "--img-size", str(size), "--device",
                "cuda", "--dtype", "bf16", "--batch-size", "256", "--peers", peers,
                "--warmup", "0.5", "--window", "0.25", "--rounds", "3", "--output", output]

    def do_bench(self, rec, t, model, size, tag):
        output = os.path.join(self.out, f"paper_{tag}.json")
        args = self.bench_cmd(model, size, output)
        if self.dry_run or not self.has_cuda:
            _tests_on_path()
            from benchmarks.paper_protocol import build_parser  # the command line must stay valid

            build_parser().parse_args(args[2:])
            rec.update(status="skipped", reason="needs a CUDA device (command line checked)",
                       command="python " + " ".join(args))
            return
        start = time.time()
        rc, _, timed_out, _ = self.run_cmd([self.python, *args], t)
        # paper_protocol writes the JSON once the table is measured and again after each later part, so a run
        # stopped at the time box still has it; a file older than this run (a reused --out) is not this run's.
        data = load(output, None) if os.path.exists(output) and os.path.getmtime(output) >= start - 1 else None
        if data:
            rec["img_per_s"] = {r["name"]: round(r["img_per_s"]) for r in data.get("inference", [])}
            if data.get("training"):
                rec["train_img_per_s"] = {r["name"]: round(r["img_per_s"]) for r in data["training"]}
            rec["skipped_peers"] = {s["peer"]: s["reason"][:200] for s in data.get("skipped", [])}
            rec["probe"] = data.get("probe")
            rec["agreement"] = data.get("low_precision_vs_fp32") or None
            rec["complete"] = data.get("complete", True)  # files without the key were written only at the end
        self._finish(rec, rc, timed_out)

    def do_opbench(self, rec, t):
        output = os.path.join(self.out, "ops.json")
        cmd = [self.python, "-m", "pytest", "benchmarks/test_op_bench.py", "-p", "no:cacheprovider",
               "--shvit-dtype", "bf16", "--shvit-time", "0.05", "--shvit-backends", "triton,cuda"]
        if self.dry_run or not self.has_cuda:
            rc, _, timed_out, _ = self.run_cmd(cmd + ["-qq", "--collect-only", "--shvit-device", "cpu"], t)
            self._finish(rec, rc, timed_out, ok_status="skipped")
            if rc == 0:
                rec["reason"] = "needs a CUDA device (collected)"
            return
        rc, _, timed_out, _ = self.run_cmd(cmd + ["-q", "--benchmark-only", "--shvit-device", "cuda",
                                                  f"--benchmark-json={output}"], t)
        rec["ops"] = summarize_ops(output)
        self._finish(rec, rc, timed_out)

    def save_dispatch(self) -> None:
        """The backend autotuning chose per call signature on this GPU (every phase's choices), as autotune.json,
        and per op how many signatures went to each backend."""
        choices = {}
        for path in sorted(glob.glob(os.path.join(self.tune_dir, "autotune-*.json"))):
            data = load(path, {})
            if isinstance(data, dict):
                choices.update(data.get("choices", {}))
        if not choices:
            return
        dump(os.path.join(self.out, "autotune.json"), dict(device=self.results.get("environment", {}).get("device"),
                                                           date=now_iso(), choices=choices))
        # what a user on this GPU sees of it (#19): the info command reads the same cache folder
        self.run_cmd([self.python, "-m", "shvit", "info"], 60)
        per_op = {}
        for key, backend in choices.items():
            counts = per_op.setdefault(key.split()[0], {})
            counts[backend] = counts.get(backend, 0) + 1
        self.results["dispatch"] = per_op

    def summary(self, final: bool = True) -> int:
        """Writes summary.json (``final=False``: quietly, after each phase, so a run killed later still has one)."""
        r = self.results
        env = r.get("environment", {})
        lines = [f"GPU check {'(dry run) ' if self.dry_run else ''}{now_iso()}: {env.get('device', 'no CUDA device')}, "
                 f"driver {_smi_field(env, 1)}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 f"triton {env.get('triton')}, Python {env.get('python')}; {r.get('elapsed_s', 0):.0f}s in all"]
        for name, rec in r["phases"].items():
            extra = rec.get("reason") or ""
            if name == "smoke" and rec.get("counts") is not None:
                extra = f"{rec['counts']}{' of %d planned' % rec['planned'] if rec.get('planned') else ''} {extra}"
            if name == "tests" and rec.get("junit"):
                j = rec["junit"]
                extra = f"{j['tests']} tests, {j['failures']} failed, {j['errors']} errors, {j['skipped']} skipped"
            if name == "sanitizer" and rec.get("errors") is not None:
                extra = f"{rec['errors']} errors {extra}"
            if name.startswith("bench_") and rec.get("img_per_s") is not None:
                extra = _bench_note(rec) + (f"; {extra}" if extra else "")
            lines.append(f"  {name:10} {rec.get('status', '?'):8} {rec.get('seconds', 0):6.1f}s  {extra}"[:160])
        bad = [f"{k}: {v.get('error') or next((c.get('why') for c in v.get('checks', {}).values() if not c['ok']), '')}"
               for k, v in r.get("smoke", {}).get("entries", {}).items() if v["status"] in ("fail", "error")]
        if bad:
            lines.append(f"  smoke failures ({len(bad)}):")
            lines += ["    " + b[:150] for b in bad[:12]]
        for name, g in (r.get("graph") or {}).items():
            if isinstance(g, dict):
                lines.append(f"  graph {name}: {g.get('status')} no_host_sync={g.get('no_host_sync')} "
                             f"replay_rel={g.get('replay_vs_eager_max_rel')} calls={g.get('op_calls_by_backend')}"
                             f"{' ' + (g.get('error') or g.get('reason') or '')[:80] if g.get('status') != 'pass' else ''}")
        if r["phases"].get("tests", {}).get("junit", {}).get("failed"):
            lines.append("  failed tests: " + ", ".join(r["phases"]["tests"]["junit"]["failed"][:8])[:300])
        for tag in ("bench_s1", "bench_s4"):
            ips = r["phases"].get(tag, {}).get("img_per_s")
            if ips:
                lines.append(f"  {tag} img/s: " + ", ".join(f"{k} {v}" for k, v in ips.items())[:300])
            train = r["phases"].get(tag, {}).get("train_img_per_s")
            if train:
                lines.append(f"  {tag} train img/s: " + ", ".join(f"{k} {v}" for k, v in train.items())[:300])
        for op, counts in sorted((r.get("dispatch") or {}).items()):
            lines.append(f"  tuned {op:24} " + ", ".join(f"{b} {n}" for b, n in sorted(counts.items())))
        cache = r.get("triton_cache") or {}
        if cache.get("prewarmed"):
            lines.append(f"  triton cache: {cache['prewarmed']} kernels prewarmed on a CPU machine, "
                         f"{cache.get('compiled_here', '?')} compiled here")
        for row in (r["phases"].get("opbench", {}).get("ops") or [])[:14]:
            lines.append(f"  op {row}")
        if final:
            self.say("\n===== summary =====\n" + "\n".join(lines))
        failed = [n for n, rec in r["phases"].items() if rec.get("status") in ("fail", "error", "timeout")]
        dump(os.path.join(self.out, "summary.json"),
             dict(text=lines, complete=final, failed_phases=failed,
                  environment={k: v for k, v in env.items() if k != "nvidia-smi"},
                  phases={n: {k: v for k, v in rec.items() if k not in ("traceback",)} for n, rec in r["phases"].items()}))
        return 1 if failed else 0

    def run(self) -> int:
        self.say(f"gpu_check {'--dry-run ' if self.dry_run else ''}started {now_iso()} in {ROOT}; results in {self.out}; "
                 f"budget {self.deadline - self.start:.0f}s")
        self.phase("env", self.do_env)
        self.phase("build", self.do_build)
        self.phase("smoke", self.do_smoke)
        self.phase("graph", self.do_graph)
        self.phase("tests", self.do_tests)
        self.phase("sanitizer", self.do_sanitizer)
        self.phase("bench_s1", lambda rec, t: self.do_bench(rec, t, "shvit_s1", 224, "s1"))
        self.phase("bench_s4", lambda rec, t: self.do_bench(rec, t, "shvit_s4", 256, "s4"))
        self.phase("opbench", self.do_opbench)
        if self.prewarmed:
            self.results["triton_cache"]["compiled_here"] = len(_cache_entries(self.triton_cache) - self.prewarmed)
        self.save_dispatch()
        self.save()
        rc = self.summary()
        shutil.rmtree(self.work, ignore_errors=True)
        return rc


def _cache_entries(folder: str) -> set:
    """The kernel entries of a Triton cache folder (empty when there is none)."""
    return {e.name for e in os.scandir(folder) if e.is_dir()} if os.path.isdir(folder) else set()


def _bench_note(rec) -> str:
    """What a bench phase's JSON holds: the table, the agreement, whether the run got to its end."""
    note = f"table measured ({len(rec['img_per_s'])} variants)"
    a = rec.get("agreement")
    if a:
        note += f", top-1 agreement {a['top1_agreement']:.4f} on {a['images']} images"
    if not rec.get("complete", True):
        note += ", run stopped before its end" + ("" if a else " (no agreement)")
    return note


def _smi_field(env, index):
    q = env.get("query")
    if isinstance(q, str) and "\n" in q:
        parts = [p.strip() for p in q.splitlines()[1].split(",")]
        return parts[index] if len(parts) > index else "?"
    return "?"


def summarize_junit(path):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return dict(tests=0, failures=0, errors=0, skipped=0, failed=[], parse_error=str(e))
    suites = [root] if root.tag == "testsuite" else list(root)
    out = dict(tests=0, failures=0, errors=0, skipped=0, failed=[])
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    return out


def summarize_ops(path):
    data = load(path, None)
    if not data:
        return []
    best = {}
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "GBps" not in e:
            continue
        key = (e["op"], e["backend"], e["mode"])
        if key not in best or e["GBps"] > best[key]["GBps"]:
            best[key] = e
    return [f"{op:16} {backend:9} {mode:8} best {e['GBps']:7.0f} GB/s {e['TFLOPs']:6.2f} TFLOP/s ({e['layer']})"
            for (op, backend, mode), e in sorted(best.items())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="walk every phase on a CPU machine (CI)")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results/gpu)")
    p.add_argument("--budget", type=float, default=525.0, help="seconds for the whole run (default 525 = 8m45s)")
    p.add_argument("--only", default=None,
                   help="comma list of phases to run (env and build always run), e.g. tests,bench_s1 for a rerun "
                        f"after a fix; phases: {', '.join(ALL_PHASES)}")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only is not None:
        unknown = sorted(set(args.only.split(",")) - set(ALL_PHASES))
        if unknown:
            p.error(f"--only: unknown phase(s) {', '.join(unknown)}; phases: {', '.join(ALL_PHASES)}")
    if args.phase:
        return PY_PHASES[args.phase](args.work, args.dry_run)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
