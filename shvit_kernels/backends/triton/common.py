"""Helpers shared by the Triton kernels: layout strides, block-size choice, dots with fp32 accumulation.

Kernels address every 4-D activation through its (N, C, H, W) strides, so NCHW and channels_last inputs are
read in place; only layouts that are neither are copied (once). Everything here also runs on CPU tensors
under ``TRITON_INTERPRET=1`` so the kernels can be tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .limits import SUPPORTED_DTYPES


# Shared memory per block the launchers size tiles for when no CUDA device says (CPU tensors: the interpreter,
# or the ahead-of-time check, which sets its target's limit). sm_90's 227 KB by default.
_target_shared = [232448]


@contextlib.contextmanager
def target_shared_memory(nbytes: int):
    """Size tiles for ``nbytes`` of shared memory per block on non-CUDA tensors (the AOT check's target)."""
    _target_shared.append(int(nbytes))
    try:
        yield
    finally:
        _target_shared.pop()


@functools.lru_cache(maxsize=None)
def _device_shared(index: int) -> int:
    try:  # the value Triton itself checks launches against
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001  (older/other drivers: torch's property, else the CUDA minimum)
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one block may use on ``device`` (opt-in maximum on CUDA)."""
    if device.type == "cuda":
        return _device_shared(device.index if device.index is not None else torch.cuda.current_device())
    return _target_shared[-1]


INT32_LIMIT = 2 ** 31


def offset_reasons(*tensors):
    """The kernels address memory with int32 offsets: decline (instead of silently wrapping) any tensor whose
    furthest element, or the scratch the launchers derive from it, is 2**31 elements or more away."""
    for t in tensors:
        if t is not None and t.dim() > 0 and t.numel() > 0:
            span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
            if span >= INT32_LIMIT // 2:  # fp32 scratch of twice the channels (FFN hidden) must fit too
                return [f"the triton kernels use int32 offsets; a tensor of shape {tuple(t.shape)} spans {span} "
                        f"elements (limit {INT32_LIMIT // 2}, half of 2**31 for the derived scratch buffers)"]
    return []


def call_or_fall_back(op: str, kernel, fallback, *args):
    """Run ``kernel``; if Triton finds at launch that a specialization needs more shared memory or registers
    than the device has (``OutOfResources``, raised before the kernel runs, so no output is half-written),
    warn and run ``fallback`` (the reference kernel) instead of failing the call."""
    try:
        return kernel(*args)
    except OutOfResources as e:
        warnings.warn(f"shvit_kernels: {op} (triton) exceeds the device's resources ({e}); "
                      f"ran the reference kernel instead", RuntimeWarning, stacklevel=3)
        return fallback(*args)


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def as_nchw_or_cl(t):
    """``t`` itself when it is NCHW- or channels_last-contiguous, else an NCHW copy."""
    if t is None or t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def strides4(t):
    """(sN, sC, sH, sW) of a 4-D tensor, or zeros for a missing optional tensor."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def empty_like_format(shape, dtype, like):
    fmt = torch.channels_last if (like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def num_splits(m_blocks: int, tiles: int, target: int = 264) -> int:
    """How many slices a reduction over M is cut into so the grid fills the GPU (~2 programs per SM)."""
    return max(1, min(m_blocks, triton.cdiv(target, max(tiles, 1)), 64))


def check_dtype(op: str, name: str, t) -> None:
    if t is not None and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op} (triton): '{name}' must be float16, bfloat16 or float32, got {t.dtype}")


def chan_combine(psum, pm2, pcnt, count):
    """Chan's parallel merge of per-tile (sum, centred sum of squares, count) into (mean, biased var).

    Per-tile centring keeps the variance accurate when |mean| >> std, where sum/sum-of-squares would cancel.
    """
    mean = psum.sum(0) / count
    tile_mean = psum / pcnt[:, None]
    var = (pm2.sum(0) + (pcnt[:, None] * (tile_mean - mean) ** 2).sum(0)) / count
    return mean, var


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation; fp32 operands use exact fp32 products (no TF32)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mma_fp32(a, b, acc, TF32X3: tl.constexpr):
    """acc + a @ b for fp32 operands: exact fp32 products, or (TF32X3) three TF32 tensor-core products per
    term (the operands split into high and low TF32 parts; about fp32's accuracy at tensor-core speed). For the
    fp32 intermediates of an fp16/bf16 op's backward, where rounding them to the op's dtype loses too much."""
    if TF32X3:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def pix_offsets(offs_m, OH, OW, s_n, s_h, s_w):
    """Memory offsets of flattened output pixels m = (n, oh, ow) for a tensor with strides (s_n, s_h, s_w)."""
    n = offs_m // (OH * OW)
    r = offs_m % (OH * OW)
    return n * s_n + (r // OW) * s_h + (r % OW) * s_w


@triton.jit
def tile_stats(v, valid, cnt):
    """Per-column (sum, sum of squares about the tile mean) over the valid rows of a tile (fp32)."""
    v = tl.where(valid, v, 0.0)
    s = tl.sum(v, axis=0)
    d = tl.where(valid, v - (s / tl.maximum(cnt, 1.0))[None, :], 0.0)
    return s, tl.sum(d * d, axis=0)
