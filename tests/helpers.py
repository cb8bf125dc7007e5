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


def forward(fn, tensors, backend, strict=True):
    """``fn(**tensors)`` on ``backend`` with fresh differentiable leaves: (leaves, out).

    ``strict=False`` lets ops the backend declines run on the usual order instead.
    """
    leaves = {k: v.detach().clone().requires_grad_(k not in NOT_DIFFERENTIABLE) for k, v in tensors.items()}
    with K.use_backend(backend, strict=strict):
        out = fn(**leaves)
    return leaves, out


def backward(leaves, out, grad_out, backend, strict=True):
    """Gradients of ``out`` (from :func:`forward`) for ``grad_out``: (grads dict, running stats)."""
    diff = [k for k in leaves if leaves[k].requires_grad]
    with K.use_backend(backend, strict=strict):
        grads = torch.autograd.grad(out, [leaves[k] for k in diff], grad_out)
    return dict(zip(diff, grads)), {k: leaves[k] for k in NOT_DIFFERENTIABLE if k in leaves}


def run(fn, tensors, backend, grad_out=None, strict=True):
    """Forward + backward of ``fn(**tensors)`` on ``backend``; returns (out, grads dict, running stats, grad_out)."""
    leaves, out = forward(fn, tensors, backend, strict)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
    grads, stats = backward(leaves, out, grad_out, backend, strict)
    return out, grads, stats, grad_out


def grad_out_off_kinks(out64, *outs):
    """A random upstream gradient in ``outs``' dtype, zero wherever one of ``outs`` and the float64 ``out64``
    disagree about ``out > 0``.

    There the output is within rounding distance of a ReLU's kink and rounding decides the side: one result's
    gradient through that element is 0, the other's the full upstream value, an error of order one that says
    nothing about the kernels (the H200 run flagged four cases this way: backends and PyTorch's own run
    flipped different elements). A kernel that drops or misplaces its ReLU mask still fails: its forward
    disagrees far from the kink, and elements away from the kink keep their upstream gradient.
    """
    flips = torch.zeros(out64.shape, dtype=torch.bool, device=out64.device)
    for o in outs:
        flips |= (o.detach().double() > 0) != (out64 > 0)
    grad = torch.randn(out64.shape, dtype=torch.float64, device=out64.device)
    return grad.masked_fill(flips, 0.0).to(outs[0].dtype)


def backend_vs_fp64(build, dtype, device, channels_last, backend):
    """One case on ``backend`` (ops it declines on the usual order), on the reference in ``dtype`` (PyTorch's
    own error) and on the reference in float64, with one upstream gradient kept off ReLU kinks.

    Returns (calls recorded on ``backend``'s run, {check name: (got, eager, ref64)}) for the output, every
    gradient and every running statistic, or (calls, None) when ``backend`` ran none of the ops.
    """
    fn, tensors = build(dtype, device, channels_last)
    tensors64 = {k: v.double() for k, v in tensors.items()}
    ref_leaves, ref_out = forward(fn, tensors64, "reference")
    eager_leaves, eager_out = forward(fn, tensors, "reference")
    with dispatch.record() as calls:
        got_leaves, got_out = forward(fn, tensors, backend, strict=False)
        grad_out = grad_out_off_kinks(ref_out.detach(), eager_out, got_out)
        got_grads, got_stats = backward(got_leaves, got_out, grad_out, backend, strict=False)
    if all(call.backend != backend for call in calls):
        return calls, None
    eager_grads, eager_stats = backward(eager_leaves, eager_out, grad_out, "reference")
    ref_grads, ref_stats = backward(ref_leaves, ref_out, grad_out.double(), "reference")
    checks = {"forward": (got_out, eager_out, ref_out)}
    checks.update({f"grad {k}": (got_grads[k], eager_grads[k], ref_grads[k]) for k in ref_grads})
    checks.update({k: (got_stats[k], eager_stats[k], ref_stats[k]) for k in ref_stats})
    return calls, checks


def compare_backend(build, dtype, device, channels_last, backend):
    """Compare ``backend`` with the fp64 reference on one case under the tolerance rule; a case where it runs
    none of the ops is skipped with the backend's reasons."""
    calls, checks = backend_vs_fp64(build, dtype, device, channels_last, backend)
    if checks is None:
        reasons = {r for call in calls for r in dispatch.explain(call.op, *call.args).not_supported[backend]}
        pytest.skip(f"{backend} runs no op of this case: " + "; ".join(sorted(reasons)))
    got_out = checks["forward"][0]
    if channels_last and got_out.dim() == 4:  # a map; pooled_linear returns (N, K)
        assert got_out.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last layout"
    for name, (got, eager, ref) in checks.items():
        assert_close_to_fp64(got, eager, ref, name=name)


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
