"""Op microbenchmarks: every shvit_kernels op, every backend, forward / backward / both, at SHViT's shapes.

Each benchmark cycles through enough independent input sets that the caches cannot hold them all, so small
layers are not flattered. On CUDA every timed call ends in a synchronize and the CUDA-event median of the call
alone is recorded too (GB/s and TFLOP/s use it there); on CPU they use pytest-benchmark's median. The grid and
its options are described in ``benchmarks/conftest.py``.
"""

from __future__ import annotations

import itertools
import statistics
import time

import pytest
import torch

import shvit_kernels
from shvit_kernels import dispatch

from benchmarks import shapes
from benchmarks.device import cuda_event_times, free_memory_bytes, last_level_cache_bytes, sync

NOT_DIFFERENTIABLE = ("running_mean", "running_var")


def _prepare(tensors, grad: bool):
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and grad and name not in NOT_DIFFERENTIABLE:
            t = t.detach().requires_grad_(True)
        out[name] = t
    return out


def _differentiable(tensors):
    return [t for t in tensors.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def make_runner(mode: str, sets, device):
    """(target, setup) for benchmark.pedantic; setup rotates through ``sets`` and stays out of the timing."""
    grad = mode != "forward"
    prepared = []
    for fn, tensors in sets:
        t = _prepare(tensors, grad)
        g = None
        if grad:
            with torch.no_grad():
                g = torch.randn_like(fn(**t))
        prepared.append((fn, t, g))
    cycle = itertools.cycle(prepared)
    # Wall-clock timing needs the GPU work finished inside the call; CUDA-event timing turns it off.
    state = {"sync": device.type == "cuda"}

    def end():
        if state["sync"]:
            torch.cuda.synchronize(device)

    if mode == "forward":
        def setup():
            fn, t, _ = next(cycle)
            return (fn, t), {}

        def target(fn, t):
            with torch.no_grad():
                fn(**t)
            end()
    elif mode == "backward":
        def setup():
            fn, t, g = next(cycle)
            out = fn(**t)
            sync(device)
            return (out, _differentiable(t), g), {}

        def target(out, inputs, g):
            torch.autograd.grad(out, inputs, g)
            end()
    else:
        def setup():
            fn, t, g = next(cycle)
            return (fn, t, g), {}

        def target(fn, t, g):
            torch.autograd.grad(fn(**t), _differentiable(t), g)
            end()
    return target, setup, state


def test_op(benchmark, bench_env, op_layer):
    model, layer, count, batch, mode, backend = op_layer
    device, dtype = bench_env["device"], bench_env["dtype"]
    reasons = dispatch.unavailable_reasons(backend)
    if reasons:
        pytest.skip(f"backend {backend} not usable: {'; '.join(reasons)}")
    if dispatch.kernel(backend, layer.op) is None:
        pytest.skip(f"backend {backend} has no {layer.op} kernel")
    set_bytes = shapes.traffic_bytes(layer, batch, dtype, "forward") * (1 if mode == "forward" else 3)
    budget = free_memory_bytes(device) // 4
    if set_bytes > budget:
        pytest.skip(f"inputs need {set_bytes / 2**30:.1f} GiB, more than a quarter of the free memory")
    build = layer.case(batch)
    sets = shapes.input_sets(build, dtype, device, True, last_level_cache_bytes(device), set_bytes, budget)
    target, setup, state = make_runner(mode, sets, device)
    with shvit_kernels.use_backend(backend):
        try:  # a forced backend that cannot take this call says why
            args, _ = setup()
            target(*args)
        except RuntimeError as e:
            if "was forced but cannot run" in str(e):
                pytest.skip(str(e))
            raise
        args, _ = setup()
        start = time.perf_counter()
        target(*args)
        once = time.perf_counter() - start
        rounds = int(min(500, max(5, bench_env["time"] / max(once, 1e-6))))
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        timing = "pytest-benchmark median (wall clock)"
        if device.type == "cuda":
            state["sync"] = False
            seconds = statistics.median(cuda_event_times(target, lambda: setup()[0], min(rounds, 100)))
            timing = "CUDA events median"
    nbytes = shapes.traffic_bytes(layer, batch, dtype, mode)
    nflops = shapes.flops(layer, batch, mode)
    benchmark.extra_info.update(
        model=model, op=layer.op, layer=layer.label(), calls_per_forward=count, batch=batch, mode=mode,
        backend=backend, dtype=str(dtype).replace("torch.", ""), device=str(device), input_sets=len(sets),
        bytes=nbytes, flops=nflops, seconds=seconds, timing=timing,
        GBps=nbytes / seconds / 1e9, TFLOPs=nflops / seconds / 1e12, intensity=nflops / nbytes,
    )
