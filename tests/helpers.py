"""Shared test helpers: running an op case forward and backward on a backend, and comparing backends.

The tolerance rule and the kernel-vs-reference check are in ``shvit_kernels.testing``; the case builders in
``shvit_kernels.testing.cases``.
"""

from __future__ import annotations

import pytest
import torch

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
