"""Shared test helpers: the tolerance rule and input builders."""

from __future__ import annotations

import contextlib

import torch

from shvit_kernels import _dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Smallest error a well-implemented kernel can be held to, relative to the output's magnitude: a few ulps of
# the dtype. It only matters where PyTorch's own error happens to be ~0 (e.g. exact small sums).
_FLOOR = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_to_fp64(got, eager, ref64, *, name="output", factor=2.0):
    """The project's tolerance rule: ``|got - ref64|`` at most about ``factor`` times ``|eager - ref64|``.

    ``eager`` is PyTorch's own result in got's dtype, ``ref64`` the same computation in float64. Both errors are
    max-abs over every element; a floor of a few ulps of the output's magnitude keeps exact cases meaningful.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype} != {eager.dtype}"
    ref = ref64.double()
    err = (got.double() - ref).abs().max().item()
    base = (eager.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    bound = factor * base + _FLOOR[got.dtype] * scale
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= bound, f"{name}: max error {err:.3e} vs fp64 exceeds {bound:.3e} (eager error {base:.3e}, scale {scale:.3e})"


def usable_backends(device_type: str, include_reference: bool = False):
    """Backends whose kernels can run on this device type at all (per-call limits are checked per call)."""
    names = []
    for name in _dispatch.BACKENDS:
        if name == "reference" and not include_reference:
            continue
        b = _dispatch.backend(name)
        if b.kernels and not b.unavailable_reasons():
            names.append(name)
    return names


@contextlib.contextmanager
def record_dispatch():
    """Collect (op, backend that ran it, args) for every custom-op call inside the block."""
    calls = []
    real_select = _dispatch.select

    def recording_select(op, device_type, *args, **kwargs):
        kernel = real_select(op, device_type, *args, **kwargs)
        name = next(n for n in _dispatch.BACKENDS if _dispatch.backend(n).kernels.get(op) is kernel)
        calls.append((op, name, args))
        return kernel

    _dispatch.select = recording_select
    try:
        yield calls
    finally:
        _dispatch.select = real_select
