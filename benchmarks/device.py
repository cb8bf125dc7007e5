"""Device facts for the benchmarks: measured memory-bandwidth and matmul ceilings (the roofline), cache and
memory sizes for input rotation, and GPU timing with CUDA events."""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

import torch

import shvit_kernels

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            return int(text.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return 32 << 20


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def cuda_event_times(run: Callable, setup: Callable, reps: int) -> List[float]:
    """Seconds per call of ``run(*setup())`` timed by CUDA events around the call alone (setup excluded)."""
    times = []
    for _ in range(reps):
        args = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _best_time(fn: Callable, device: torch.device, reps: int) -> float:
    """Fastest of ``reps`` calls: a ceiling is what the device can do, so load from other processes is excluded."""
    fn()
    sync(device)
    if device.type == "cuda":
        return min(cuda_event_times(lambda: fn(), lambda: (), reps))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def probe(device: torch.device, dtypes=(torch.float32,), quick: bool = False) -> Dict:
    """Measured ceilings at the current thread count: copy bandwidth (read + write) and dense matmul rate.

    Sizes are chosen to run from memory (copy: 8x the last-level cache, at least 256 MiB) and to be
    compute-bound (square matmuls). Each number is the best of many short repetitions: on a shared machine a
    long repetition is always sliced with other processes' work, a short one often runs whole.
    """
    cache = last_level_cache_bytes(device)
    copy_bytes = max(8 * cache, 256 << 20) if not quick else 16 << 20
    n = copy_bytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    reps = 3 if quick else 20
    t = _best_time(lambda: dst.copy_(src), device, reps)
    result = {
        "bandwidth_GBps": 2 * copy_bytes / t / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_TFLOPs": {},
        "threads": torch.get_num_threads(),
    }
    del src, dst
    size = 8192 if device.type == "cuda" else 1024
    if quick:
        size = 256
    # Two GEMM routes: torch.mm and a channels_last 1x1 convolution (on CPU, oneDNN's convolution can be much
    # faster than the mm path of the build). The ceiling is the faster one; both are recorded.
    result["gemm_candidates_TFLOPs"] = {}
    for dtype in dtypes:
        name = DTYPE_NAMES.get(dtype, str(dtype))
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        mm = 2 * size**3 / _best_time(lambda: a @ b, device, reps) / 1e12
        # SHViT-like 1x1 shape: a few ms per call on one CPU core (larger ones ran slower through oneDNN here).
        n, c, hw = (16, 256, 14) if device.type == "cpu" and not quick else ((256, 512, 14) if not quick else (2, 64, 8))
        x = torch.randn(n, c, hw, hw, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 1, 1, device=device).to(dtype)
        conv = 2 * n * hw * hw * c * c / _best_time(lambda: torch.nn.functional.conv2d(x, w), device, reps) / 1e12
        result["gemm_candidates_TFLOPs"][name] = {"mm": mm, "conv1x1": conv}
        result["matmul_TFLOPs"][name] = max(mm, conv)
    result["matmul_size"] = size
    if device.type == "cpu":
        from shvit_kernels.backends import cpp

        # Per core (one thread): the arithmetic limits the op rates are read against.
        result["core_peak_GFLOPs"] = {kind: cpp.peak_gflops(kind) for kind in ("fp32_fma", "bf16_dot", "amx_bf16")}
        result["bf16_products"] = cpp.bf16_products()
        result["bf16_pair_unit"] = cpp.bf16_pair_unit()
        result["fp32_gemm"] = cpp.fp32_gemm()
    return result


def git_revision() -> Optional[str]:
    """HEAD of the checkout, with '+dirty' when tracked files differ (kernels change while people work)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of one call, and running a measurement in a fresh process (peaks do not carry over between runs)
# ---------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the block above what was allocated at its start: on CUDA the caching allocator's peak; on the CPU
    the peak resident set (VmHWM, its mark reset at the start, freed heap memory and the cpp backend's cached output
    blocks first handed back to the OS) above the resident set at the start. Blocks left in that cache by the
    warm-up would sit in the starting resident set and the block's outputs reuse them unseen (a fused S1 training
    step measured 97 MiB that way against 146 with them handed back; bf16, Xeon with AMX, 2026-12-03). Where the
    mark cannot be reset: the growth of the process's lifetime peak (an upper bound when the block stays under an
    earlier peak). Run a warm-up call before the block, so one-time initialisation (thread pools, library caches) is
    not counted. After the block: ``bytes`` and ``measure`` (how it was taken)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: Optional[int] = None
        self.measure = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        shvit_kernels.empty_cache(packed_weights=False)  # packed weights stay: the model's, like its weights
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._reset = _reset_peak_rss()
        self._base, self._maxrss_before = _rss_bytes(), _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.measure = "cuda max_memory_allocated"
        elif self._reset:
            self.bytes = max(0, _status_kib("VmHWM") * 1024 - self._base)
            self.measure = "peak resident set (VmHWM) growth"
        else:
            maxrss = _maxrss_bytes()
            self.bytes = maxrss - self._base
            self.measure = "ru_maxrss growth" if maxrss > self._maxrss_before else "under the process's earlier peak (upper bound)"


# A fresh process's environment for a CPU peak that follows the live allocations: glibc then maps every block from
# 128 KiB up on allocation and unmaps it when freed. By default it raises that threshold as blocks are freed and keeps
# later ones in its heap, whose freed pages stay resident: the same fused S1 training step (bf16, batch 16, AMD Zen 5,
# 2026-12-04) measured 120-137 MiB of resident-set growth that way from run to run, against 90 MiB this way. CUDA's
# max_memory_allocated, this benchmark's peak there, likewise counts live blocks, not the allocator's reserve. The cpp
# backend's output cache is such a reserve (free blocks kept for the next call of their size, as glibc's heap keeps
# eager PyTorch's): off here. CACHED_PEAK_ENV keeps it on, the resident set a user of the defaults sees beyond
# glibc's own reserve (reported beside the live peak).
CACHED_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
LIVE_PEAK_ENV = dict(CACHED_PEAK_ENV, SHVIT_CPU_OUTPUT_CACHE="0")
LIVE_PEAK_HOW = ("the resident set's growth with glibc's mmap threshold fixed at 128 KiB and the cpp backend's output "
                 "cache off (live blocks)")
CACHED_PEAK_HOW = "the same with the cpp backend's output cache on (live blocks and that cache's free ones)"


def run_in_fresh_process(script: str, flag: str, spec: dict, timeout: Optional[float] = None,
                         env: Optional[dict] = None) -> dict:
    """Run ``python script flag JSON(spec)`` with the repository on the path (and ``env`` added to the
    environment); its last stdout line is a JSON dict. A failure or a timeout comes back as
    ``dict(spec, error=...)``."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env = dict(os.environ, **(env or {}),
                     PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, script, flag, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    if done.returncode:
        return dict(spec, error=(done.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])
