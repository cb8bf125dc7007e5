"""pytest configuration for the op microbenchmarks (``pytest benchmarks/ --benchmark-only``).

This file stands alone: the tests' conftest (Triton interpreter mode on CPU, per-test seeding) does not apply
here, since timing the interpreter would be meaningless. The grid is chosen with options (or environment
variables, handy in CI) and kept small by default:

* ``--shvit-grid small`` (default, env SHVIT_BENCH_GRID): S1, one batch (16 on CPU, 256 on GPU), the
  inference ops forward and the training ops forward+backward ("both");
* ``--shvit-grid full``: S1..S4, batches 1, 16 and 256 (skipped when the inputs would not fit), every mode;
* ``--shvit-models``, ``--shvit-batches``, ``--shvit-modes``, ``--shvit-ops``, ``--shvit-backends`` narrow or
  widen either grid (comma lists); ``--shvit-dtype`` (fp32, bf16, fp16), ``--shvit-device`` (auto, cpu, cuda);
  ``--shvit-threads`` CPU threads, ``--shvit-time`` seconds of timed calls per benchmark.

Save results with ``--benchmark-json benchmarks/results/ops_<device>.json``: the measured roofline ceilings,
versions, date, command and load are added under the key ``shvit``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

SMALL_MODES = {"conv_bias_act": ("forward",), "ffn_fused": ("forward",), "shsa_fused": ("forward",),
               "conv_bn_train": ("both",), "shsa_train": ("both",)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _env(name, default):
    return os.environ.get(name, default)


def pytest_addoption(parser):
    g = parser.getgroup("shvit", "SHViT op microbenchmarks")
    g.addoption("--shvit-grid", default=_env("SHVIT_BENCH_GRID", "small"), choices=["small", "full"])
    g.addoption("--shvit-models", default=_env("SHVIT_BENCH_MODELS", None), help="comma list, e.g. shvit_s1,shvit_s4")
    g.addoption("--shvit-batches", default=_env("SHVIT_BENCH_BATCHES", None), help="comma list, e.g. 1,16,256")
    g.addoption("--shvit-modes", default=_env("SHVIT_BENCH_MODES", None), help="comma list of forward,backward,both")
    g.addoption("--shvit-ops", default=_env("SHVIT_BENCH_OPS", None), help="comma list of op names")
    g.addoption("--shvit-backends", default=_env("SHVIT_BENCH_BACKENDS", None), help="comma list of backends")
    g.addoption("--shvit-dtype", default=_env("SHVIT_BENCH_DTYPE", "fp32"), choices=sorted(DTYPES))
    g.addoption("--shvit-device", default=_env("SHVIT_BENCH_DEVICE", "auto"), choices=["auto", "cpu", "cuda"])
    g.addoption("--shvit-threads", type=int, default=int(_env("SHVIT_BENCH_THREADS", "0")),
                help="CPU threads (torch.set_num_threads); 0 keeps torch's default")
    g.addoption("--shvit-time", type=float, default=float(_env("SHVIT_BENCH_TIME", "0.3")),
                help="seconds of timed calls per benchmark (rounds are derived from it, 5..500)")


def _list(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def bench_device(config) -> torch.device:
    name = config.getoption("--shvit-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pytest_generate_tests(metafunc):
    if "op_layer" not in metafunc.fixturenames:
        return
    from benchmarks import shapes
    from shvit_kernels import BACKENDS

    config = metafunc.config
    device = bench_device(config)
    full = config.getoption("--shvit-grid") == "full"
    models = _list(config.getoption("--shvit-models")) or (
        ["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"] if full else ["shvit_s1"]
    )
    batches = [int(b) for b in _list(config.getoption("--shvit-batches")) or []] or (
        [1, 16, 256] if full else [256 if device.type == "cuda" else 16]
    )
    modes = _list(config.getoption("--shvit-modes"))
    ops = _list(config.getoption("--shvit-ops")) or list(shapes.FORWARD_OPS)
    backends = _list(config.getoption("--shvit-backends")) or [b for b in BACKENDS]
    params, ids = [], []
    for model, layer, count, batch in shapes.grid(models, batches, ops):
        for mode in modes or (shapes.MODES if full else SMALL_MODES[layer.op]):
            for backend in backends:
                params.append((model, layer, count, batch, mode, backend))
                ids.append(f"{model}-{layer.op}-{layer.label().replace(' ', '_')}-b{batch}-{mode}-{backend}")
    metafunc.parametrize("op_layer", params, ids=ids)


_session = {}


@pytest.fixture(scope="session")
def bench_env(request):
    """Device, dtype and the measured ceilings, computed once per session (and saved in the JSON)."""
    from benchmarks.device import load_average, probe

    config = request.config
    device = bench_device(config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--shvit-device cuda but CUDA is not available")
    if config.getoption("--shvit-threads"):
        torch.set_num_threads(config.getoption("--shvit-threads"))
    dtype = DTYPES[config.getoption("--shvit-dtype")]
    env = dict(device=device, dtype=dtype, time=config.getoption("--shvit-time"), load_start=load_average())
    if not config.getoption("benchmark_disable", False):
        env["probe"] = probe(device, dtypes=sorted({torch.float32, dtype}, key=str))
    _session.update(env)
    return env


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from shvit.bench import environment

    from benchmarks.device import git_revision, load_average

    device = _session.get("device", bench_device(config))
    output_json["shvit"] = dict(
        suite="ops",
        device=str(device),
        dtype=config.getoption("--shvit-dtype"),
        grid=config.getoption("--shvit-grid"),
        threads=torch.get_num_threads(),
        environment=environment(device),
        command=" ".join(["pytest"] + sys.argv[1:]),
        load_average_start=_session.get("load_start"),
        load_average_end=load_average(),
        git=git_revision(),
        probe=_session.get("probe"),
    )
