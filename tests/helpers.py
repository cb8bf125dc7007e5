"""Shared test helpers: running an op case forward and backward on a backend, comparing backends, model
helpers (non-trivial norms, relative error), the spec's data files, timm, and the tiny training run's arguments.

The tolerance rule and the kernel-vs-reference check are in ``shvit_kernels.testing``; the case builders in
``shvit_kernels.testing.cases``.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import shvit_kernels as K
from shvit_kernels import dispatch
from shvit_kernels.testing import assert_close_to_fp64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NOT_DIFFERENTIABLE = ("running_mean", "running_var")


def run(fn, tensors, backend, grad_out=None, strict=True):
    """Forward + backward of ``fn(**tensors)`` on ``backend``; returns (out, grads dict, running stats, grad_out).

    ``strict=False`` lets ops the backend declines run on the usual order instead.
    """
    leaves = {k: v.detach().clone().requires_grad_(k not in NOT_DIFFERENTIABLE) for k, v in tensors.items()}
    with K.use_backend(backend, strict=strict):
        out = fn(**leaves)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
        diff = [k for k in leaves if leaves[k].requires_grad]
        grads = torch.autograd.grad(out, [leaves[k] for k in diff], grad_out)
    stats = {k: leaves[k] for k in NOT_DIFFERENTIABLE if k in leaves}
    return out, dict(zip(diff, grads)), stats, grad_out


def compare_backend(build, dtype, device, channels_last, backend):
    """Compare ``backend`` with the fp64 reference on one case; ops the backend declines run on the reference,
    and a case where it runs none of the ops is skipped with the backend's reasons."""
    fn, tensors = build(dtype, device, channels_last)
    eager_out, eager_grads, eager_stats, grad_out = run(fn, tensors, "reference")
    with dispatch.record() as calls:
        got_out, got_grads, got_stats, _ = run(fn, tensors, backend, grad_out, strict=False)
    if all(call.backend != backend for call in calls):
        reasons = {r for call in calls for r in dispatch.explain(call.op, *call.args).not_supported[backend]}
        pytest.skip(f"{backend} runs no op of this case: " + "; ".join(sorted(reasons)))
    tensors64 = {k: v.double() for k, v in tensors.items()}
    ref_out, ref_grads, ref_stats, _ = run(fn, tensors64, "reference", grad_out.double())

    assert_close_to_fp64(got_out, eager_out, ref_out, name="forward")
    if channels_last:
        assert got_out.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last layout"
    for k in ref_grads:
        assert_close_to_fp64(got_grads[k], eager_grads[k], ref_grads[k], name=f"grad {k}")
    for k in ref_stats:
        assert_close_to_fp64(got_stats[k], eager_stats[k], ref_stats[k], name=k)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN/GroupNorm affine and running statistics, so folding and zero-init branches matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


REPO = Path(__file__).resolve().parents[1]


def spec_file(name: str) -> Path:
    """A data file beside the spec: ``SHVIT_SPEC_DIR``, else ``shared/spec`` in or beside the checkout."""
    candidates = [Path(os.environ["SHVIT_SPEC_DIR"])] if os.environ.get("SHVIT_SPEC_DIR") else []
    candidates += [REPO / "shared" / "spec", REPO.parent / "shared" / "spec"]
    for directory in candidates:
        if (directory / name).is_file():
            return directory / name
    pytest.fail(f"reference data {name!r} not found in {[str(c) for c in candidates]}; set SHVIT_SPEC_DIR")


def require_timm(*modules: str):
    """timm (and ``modules`` of it), or a skip; with SHVIT_REQUIRE_TIMM=1 (CI's timm run) a missing one fails."""
    names = ("timm", *modules)
    if os.environ.get("SHVIT_REQUIRE_TIMM") == "1":
        loaded = [importlib.import_module(n) for n in names]
    else:
        loaded = [pytest.importorskip(n) for n in names]
    return loaded[0]


# ---------------------------------------------------------------------------------------------------------------
# Training: a tiny run (S1 widths, one block per stage, 64 px, a few synthetic classes, one CPU thread)
# ---------------------------------------------------------------------------------------------------------------
TINY_TRAIN_ARGS = [
    "--img-size", "64", "--depth", "1", "1", "1", "--synthetic-classes", "4", "--threads", "1",
    "--warmup-epochs", "0", "--no-lr-scaling", "--lr", "2e-3", "--device", "cpu", "--log-interval", "1000",
]


def parse_train_args(tmp_path, *extra):
    from shvit.__main__ import build_parser

    return build_parser().parse_args(["train", *TINY_TRAIN_ARGS, "--output-dir", str(tmp_path), *extra])


def run_train(tmp_path, *extra):
    from shvit import train

    return train.train(parse_train_args(tmp_path, *extra))


def run_train_cli(tmp_path, *extra):
    """``main`` in-process: exit status (2 for bad input) with the message on stderr."""
    from shvit import train

    return train.main(parse_train_args(tmp_path, *extra))


def tiny_model(name="shvit_s1", num_classes=4):
    import shvit

    return shvit.create_model(name, num_classes=num_classes, depth=(1, 1, 1))


def authors_to_timm_names(state_dict):
    """The authors' layout in timm's names (spec section 3), written independently of the loader."""
    slots = {"0.0": 0, "0.1": 1, "1": 2, "2.0": 3, "2.1": 4}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"blocks(\d)\.(\d+)\.(.*)$", key)
        if not m:
            out[key] = value
            continue
        stage, index, rest = int(m[1]), int(m[2]), m[3]
        if stage == 1:
            out[f"stages.0.blocks.{index}.{rest}"] = value
        elif index >= 3:
            out[f"stages.{stage - 1}.blocks.{index - 3}.{rest}"] = value
        else:
            sub = rest.split(".", 1)
            slot, rest = (f"{index}.{sub[0]}", sub[1]) if index in (0, 2) else (str(index), rest)
            out[f"stages.{stage - 1}.downsample.{slots[slot]}.{rest}"] = value
    return out
