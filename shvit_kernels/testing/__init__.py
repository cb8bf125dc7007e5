"""Checking kernels: the project's tolerance rule, one kernel-vs-reference check, and the op case builders
(``shvit_kernels.testing.cases``) shared by the tests and the benchmarks.

The rule: a kernel's error against a float64 run of the reference may be at most about twice the error of
PyTorch's own eager result (the reference run in the kernel's dtype), plus a floor of a few ulps; root mean
squares instead of maxima where the exact result is ~0 and both results are rounding noise.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..ops import _common
from ..ops._common import _output_format

# Smallest error a well-implemented kernel can be held to, relative to the output's magnitude: a few ulps of
# the dtype. It only matters where PyTorch's own error happens to be ~0 (e.g. exact small sums).
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_to_fp64(got, eager, ref64, *, name="output", factor=2.0, unavoidable=None):
    """The project's tolerance rule: ``|got - ref64|`` at most about ``factor`` times ``|eager - ref64|``.

    ``eager`` is PyTorch's own result in got's dtype, ``ref64`` the same computation in float64. Both errors are
    max-abs over every element; a floor of a few ulps of the output's magnitude keeps exact cases meaningful.
    ``unavoidable``: optionally, float64 arithmetic on an intermediate as every kernel receives it rounded to got's
    dtype (an op input that is itself a rounded result); eager's error counts as at least this one's, since eager's
    own independent rounding can cancel part of it by chance (over a few values, often).
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype} != {eager.dtype}"
    if got.numel() == 0:  # e.g. an output slot left empty, as the reference leaves it
        return
    ref = ref64.double()
    err = (got.double() - ref).abs().max().item()
    base = (eager.double() - ref).abs().max().item()
    if unavoidable is not None:
        base = max(base, (unavoidable.double() - ref).abs().max().item())
    scale = max(ref.abs().max().item(), 1e-30)
    bound = factor * base + ERROR_FLOOR[got.dtype] * scale
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if err > bound and base >= scale:
        # Eager missed even the largest value's first digit: the exact result is ~0 (a gradient that cancels by
        # construction, e.g. a shift that batch statistics remove) and both results are rounding noise. The
        # maxima of two noise samples differ by 2-3x by chance (the H200 run, 2026-12-04); their root mean
        # squares do not, while a systematic error still shows in them.
        def rms(t):
            return (t.double() - ref).square().mean().sqrt().item()

        err_rms, base_rms = rms(got), rms(eager)
        assert err_rms <= factor * base_rms + ERROR_FLOOR[got.dtype] * scale, (
            f"{name}: rms error {err_rms:.3e} vs fp64 exceeds {factor:g}x eager's {base_rms:.3e} where the exact "
            f"values are ~0 (max error {err:.3e}, eager's {base:.3e}, scale {scale:.3e})")
        return
    assert err <= bound, f"{name}: max error {err:.3e} vs fp64 exceeds {bound:.3e} (eager error {base:.3e}, scale {scale:.3e})"


@contextlib.contextmanager
def allow_meta_tensors() -> Iterator[None]:
    """Let the ops take meta tensors (refused for users: they carry no data), so that a model's launchers can
    run on shapes alone, as the Triton ahead-of-time check does."""
    saved = _common.SUPPORTED_DEVICE_TYPES
    _common.SUPPORTED_DEVICE_TYPES = (*saved, "meta")
    try:
        yield
    finally:
        _common.SUPPORTED_DEVICE_TYPES = saved


def to_float64(args: Sequence) -> tuple:
    """The floating tensors of ``args`` in float64, everything else as it is."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def cast_args(args: Sequence, dtype: torch.dtype, channels_last: bool = False, keep_fp32_vectors: bool = False) -> tuple:
    """Floating tensors of ``args`` in ``dtype``, 4-D ones in NCHW or channels_last.

    ``keep_fp32_vectors``: 1-D fp32 tensors (normalisation parameters, statistics) stay fp32, as under mixed
    precision.
    """
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if not (keep_fp32_vectors and a.dim() == 1 and a.dtype == torch.float32 and dtype != torch.float64):
                a = a.to(dtype)
            if a.dim() == 4:
                a = a.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out.append(a)
    return tuple(out)


def _as_tuple(r) -> tuple:
    return r if isinstance(r, tuple) else (r,)


def check_kernel(
    kernel: Callable,
    reference: Callable,
    args: Sequence,
    *,
    name: str = "kernel",
    outputs: Optional[Sequence[Optional[str]]] = None,
    check_layout: Optional[int] = None,
    unavoidable_reference: Optional[Callable] = None,
    layout: Optional[torch.memory_format] = None,
) -> tuple:
    """Run ``kernel(*args)`` and hold every output to the tolerance rule against ``reference``; returns them.

    Each output must have the reference's shape, device and dtype, 4-D outputs the layout the ops' shared
    memory-format rule gives (the first 4-D input of the same shape, else the first 4-D input). ``outputs``
    names the outputs (None skips one, e.g. an output the reference does not define exactly);
    ``check_layout``: how many leading outputs must follow the layout rule (None: all; 0: none). The dispatcher
    lays out every output by the rule anyway, so a kernel may leave e.g. weight gradients to it.
    ``unavoidable_reference(*args)``: float64 outputs for :func:`assert_close_to_fp64`'s ``unavoidable``.
    ``layout``: the memory format the call asks for its 4-D outputs (an op's layout argument) instead of the rule's.
    """
    got = _as_tuple(kernel(*args))
    eager = _as_tuple(reference(*args))
    ref64 = _as_tuple(reference(*to_float64(args)))
    floors = _as_tuple(unavoidable_reference(*args)) if unavoidable_reference else (None,) * len(ref64)
    assert len(got) == len(eager), f"{name}: {len(got)} outputs, the reference has {len(eager)}"
    names = list(outputs) if outputs is not None else [f"output {i}" for i in range(len(got))]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for i, (label, g, e, r, f) in enumerate(zip(names, got, eager, ref64, floors)):
        if label is None:
            continue
        assert g.device == e.device, f"{name} {label}: on {g.device}, the reference's on {e.device}"
        if (check_layout is None or i < check_layout) and g.dim() == 4:
            fmt = layout or _output_format(g.shape, tensors)
            assert g.is_contiguous(memory_format=fmt), f"{name} {label}: not in {fmt} like its inputs"
        assert_close_to_fp64(g, e, r, name=f"{name} {label}", unavoidable=f)
    return got
