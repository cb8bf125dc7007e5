"""Triton kernels for ``ffn_fused`` (C -> 2C -> ReLU -> C, residual) and its backward.

Forward: one program per tile of tokens keeps its (tokens x C) input tile and a (tokens x C) fp32 output
accumulator on chip and walks the hidden dimension in chunks, so the hidden activation never reaches memory.
Backward: one pass recomputes the hidden chunks, accumulates grad_x on chip and writes the hidden activation
and its gradient (scratch in x's dtype) for the two weight-gradient reductions, which reuse the conv kernels.
Every GEMM takes its operands in x's dtype with fp32 accumulation (tensor cores in fp16/bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_nchw_or_cl, check_dtype, empty_like_format, mma, pix_offsets, pow2, shared_memory_limit
from .conv_bn import launch_wgrad
from .limits import FFN_MAX_C


@triton.jit
def _ffn_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, o_ptr, M, C, HID, H, W,
                    sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                    BM: tl.constexpr, CP: tl.constexpr, BH: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_c = tl.arange(0, CP)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    xo = pix_offsets(offs_m, H, W, sx_n, sx_h, sx_w)
    x = tl.load(x_ptr + xo[:, None] + offs_c[None, :] * sx_c, mask=mask, other=0.0)
    acc = tl.zeros((BM, CP), dtype=tl.float32)
    for h0 in range(0, HID, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_mask = offs_h < HID
        w1c = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None], mask=c_mask[:, None] & h_mask[None, :], other=0.0)
        hid = mma(x, w1c, tl.zeros((BM, BH), dtype=tl.float32))
        hid += tl.load(b1_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        hid = tl.maximum(hid, 0.0).to(x.dtype)  # the hidden activation in x's dtype, as the reference has it
        w2c = tl.load(w2_ptr + offs_c[None, :] * HID + offs_h[:, None], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        acc = mma(hid, w2c, acc)
    acc += tl.load(b2_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc += x.to(tl.float32)
    oo = pix_offsets(offs_m, H, W, so_n, so_h, so_w)
    tl.store(o_ptr + oo[:, None] + offs_c[None, :] * so_c, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ffn_bwd_kernel(x_ptr, g_ptr, w1_ptr, b1_ptr, w2_ptr, h_ptr, gh_ptr, gx_ptr, pb1_ptr, pb2_ptr,
                    M, C, HID, H, W, sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
                    BM: tl.constexpr, CP: tl.constexpr, BH: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_c = tl.arange(0, CP)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + pix_offsets(offs_m, H, W, sx_n, sx_h, sx_w)[:, None] + offs_c[None, :] * sx_c,
                mask=mask, other=0.0)
    g = tl.load(g_ptr + pix_offsets(offs_m, H, W, sg_n, sg_h, sg_w)[:, None] + offs_c[None, :] * sg_c,
                mask=mask, other=0.0)
    g_op = g.to(x.dtype)  # GEMM operands in x's dtype: tensor cores in fp16/bf16, exact fp32 products in fp32
    acc = g.to(tl.float32)  # the residual path
    for h0 in range(0, HID, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_mask = offs_h < HID
        hm = m_mask[:, None] & h_mask[None, :]
        w1c = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None], mask=c_mask[:, None] & h_mask[None, :], other=0.0)
        hid = mma(x, w1c, tl.zeros((BM, BH), dtype=tl.float32))
        hid += tl.load(b1_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        hid = tl.maximum(hid, 0.0).to(x.dtype)  # as the forward rounds it
        w2c = tl.load(w2_ptr + offs_c[:, None] * HID + offs_h[None, :], mask=c_mask[:, None] & h_mask[None, :],
                      other=0.0)
        gh = mma(g_op, w2c, tl.zeros((BM, BH), dtype=tl.float32))
        gh = tl.where((hid > 0) & hm, gh, 0.0)
        so = offs_m[:, None] * HID + offs_h[None, :]
        tl.store(h_ptr + so, hid, mask=hm)
        tl.store(gh_ptr + so, gh.to(gh_ptr.dtype.element_ty), mask=hm)
        tl.store(pb1_ptr + pid * HID + offs_h, tl.sum(gh, axis=0), mask=h_mask)
        w1r = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :],
                      other=0.0)
        acc = mma(gh.to(x.dtype), w1r, acc)
    tl.store(pb2_ptr + pid * C + offs_c, tl.sum(g.to(tl.float32), axis=0), mask=c_mask)
    oo = pix_offsets(offs_m, H, W, so_n, so_h, so_w)
    tl.store(gx_ptr + oo[:, None] + offs_c[None, :] * so_c, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _check(op, x, w1, b1, w2, b2, grad_out=None):
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("grad_out", grad_out)):
        check_dtype(op, name, t)
    if x.dim() != 4 or w1.dim() != 4 or w2.dim() != 4:
        raise ValueError(f"{op} (triton): 'x', 'w1' and 'w2' must be 4-D")
    c, hid = x.shape[1], w1.shape[0]
    if tuple(w1.shape) != (hid, c, 1, 1) or tuple(w2.shape) != (c, hid, 1, 1):
        raise ValueError(f"{op} (triton): 'w1' must be (hidden, {c}, 1, 1) and 'w2' ({c}, hidden, 1, 1), got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    if c > FFN_MAX_C:
        raise ValueError(f"{op} (triton): 'x' has {c} channels; the on-chip tile holds at most {FFN_MAX_C}")



def _blocks(c, backward, dtype, limit):
    """(token tile, padded C, hidden chunk, pipeline stages) whose shared memory fits ``limit`` bytes, or None.

    The hidden loop's weight chunks are what Triton stages in shared memory: (stages - 1) buffers of two
    (forward) or three (backward: w1, w2, and w1 again for grad_x) (CP x BH) chunks, plus the (BM x CP) dot
    operand tiles (x; the backward's grad_out too: without it the fp32 C=256 backward needed 233,472 bytes).
    Wide C gets shorter token tiles (tl.dot needs >= 16 rows), fewer stages, then narrower chunks.
    """
    cp = pow2(c)
    elt = torch.empty((), dtype=dtype).element_size()  # both passes stage their operands in x's dtype
    # 16-token tiles from 256 channels in fp32 or the backward (32 x 256 fp32 tiles spilled 9.5 KB per thread)
    bm = 32 if cp <= (256 if elt == 2 and not backward else 128) else 16
    chunks = 3 if backward else 2
    tiles = 2 if backward else 1  # (BM x CP) dot operands: x, and the backward's grad_out
    for stages, bh in ((3, 32), (2, 32), (2, 16), (1, 16)):
        need = (max(stages - 1, 1) * chunks * cp * bh + tiles * bm * cp) * elt + _SMEM_MARGIN
        if need <= limit:
            return bm, cp, bh, stages
    return None


_SMEM_MARGIN = 8192  # layout-conversion scratch and barriers on top of the staged operands


def size_reasons(x, backward=False):
    """Why the FFN kernels cannot take ``x`` on its device (for the backend's not_supported_reasons)."""
    c = x.shape[1]
    if c > FFN_MAX_C:
        return [f"ffn_fused keeps a (tokens x C) tile on chip; C={c} exceeds {FFN_MAX_C}"]
    limit = shared_memory_limit(x.device)
    if _blocks(c, backward, x.dtype, limit) is None:
        return [f"ffn_fused{'_backward' if backward else ''}: no tile for C={c} in {x.dtype} fits the device's "
                f"{limit} bytes of shared memory per block"]
    return []


def _config(op, x, backward):
    cfg = _blocks(x.shape[1], backward, x.dtype, shared_memory_limit(x.device))
    if cfg is None:
        raise ValueError(f"{op} (triton): " + size_reasons(x, backward)[0])
    return cfg


def ffn_fused(x, w1, b1, w2, b2):
    _check("ffn_fused", x, w1, b1, w2, b2)
    x = as_nchw_or_cl(x)
    nb, c, h, w = x.shape
    hid = w1.shape[0]
    m = nb * h * w
    bm, cp, bh, stages = _config("ffn_fused", x, False)
    out = empty_like_format(x.shape, x.dtype, x)
    wd = x.dtype
    _ffn_fwd_kernel[(triton.cdiv(m, bm),)](
        x, w1.reshape(hid, c).to(wd).contiguous(), b1.contiguous(), w2.reshape(c, hid).to(wd).contiguous(),
        b2.contiguous(), out, m, c, hid, h, w, *x.stride(), *out.stride(), BM=bm, CP=cp, BH=bh,
        num_warps=4 if cp <= 128 else 8, num_stages=stages)
    return out


def ffn_fused_backward(grad_out, x, w1, b1, w2, b2):
    _check("ffn_fused_backward", x, w1, b1, w2, b2, grad_out)
    grad_out, x = as_nchw_or_cl(grad_out), as_nchw_or_cl(x)
    nb, c, h, w = x.shape
    hid = w1.shape[0]
    m = nb * h * w
    bm, cp, bh, stages = _config("ffn_fused_backward", x, True)
    grid = triton.cdiv(m, bm)
    # Channels-last scratch for the hidden activation (exact in x's dtype, as the forward rounds it) and its
    # gradient, in x's dtype: the weight-gradient GEMMs then run on tensor cores in fp16/bf16.
    hbuf = torch.empty((nb, hid, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    ghbuf = torch.empty_like(hbuf)
    pb1 = torch.empty((grid, hid), dtype=torch.float32, device=x.device)
    pb2 = torch.empty((grid, c), dtype=torch.float32, device=x.device)
    grad_x = empty_like_format(x.shape, x.dtype, x)
    _ffn_bwd_kernel[(grid,)](
        x, grad_out, w1.reshape(hid, c).to(x.dtype).contiguous(), b1.contiguous(),
        w2.reshape(c, hid).to(x.dtype).contiguous(),
        hbuf, ghbuf, grad_x, pb1, pb2, m, c, hid, h, w, *x.stride(), *grad_out.stride(), *grad_x.stride(),
        BM=bm, CP=cp, BH=bh, num_warps=4 if cp <= 128 else 8, num_stages=stages)
    grad_w1 = launch_wgrad(x, ghbuf, w1.shape, stride=1, pad=0, depthwise=False)
    grad_w2 = launch_wgrad(hbuf, grad_out, w2.shape, stride=1, pad=0, depthwise=False)
    return grad_x, grad_w1.to(w1.dtype), pb1.sum(0).to(b1.dtype), grad_w2.to(w2.dtype), pb2.sum(0).to(b2.dtype)
