"""Triton kernels for the Conv+BN family (``conv_bias_act``, ``conv_bn_train`` and their backwards).

Two convolution kernels cover every SHViT conv, each with a ``TRANSPOSED`` mode that computes the input
gradient by gathering the output gradient (so forward and backward share one addressing scheme):

* ``_conv_gemm_kernel``: dense conv as an implicit GEMM over (taps x input channels); 1x1 convs are the
  one-tap case, the 3x3 stride-2 stem the nine-tap case.
* ``_conv_dw_kernel``: depthwise stencil on channel tiles (channels_last reads are contiguous per pixel).

Both share an epilogue that applies bias, residual and ReLU, or (training) writes the raw fp32 output and
this tile's per-channel sum and centred sum of squares. Weight gradients are split-M reductions whose
per-slice partials are summed on the host side (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    as_nchw_or_cl,
    chan_combine,
    check_dtype,
    empty_like_format,
    mma,
    num_splits,
    pix_offsets,
    pow2,
    strides4,
    tile_stats,
)
from .limits import conv_kind

OP = "shvit::conv"


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _gather(offs_m, m_mask, kh, kw, OH, OW, H, W, s_n, s_h, s_w,
            STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Offsets (and validity) of the source pixels that tap (kh, kw) of output pixels ``offs_m`` reads.

    Forward: source = input at (oh*S - PAD + kh). Transposed (input gradient): the destination pixel i gets
    the output-gradient pixel o with o*S - PAD + kh == i, which exists only when S divides i + PAD - kh.
    """
    n = offs_m // (OH * OW)
    r = offs_m % (OH * OW)
    oh = r // OW
    ow = r % OW
    if TRANSPOSED:
        th = oh + PAD - kh
        tw = ow + PAD - kw
        ih = th // STRIDE
        iw = tw // STRIDE
        ok = (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (ih < H) & (iw < W)
    else:
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return n * s_n + ih * s_h + iw * s_w, ok & m_mask


@triton.jit
def _conv_epilogue(acc, pid_m, offs_m, m_mask, offs_n, n_mask, OH, OW, CO,
                   b_ptr, r_ptr, o_ptr, ps_ptr, pm_ptr,
                   sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr):
    mask = m_mask[:, None] & n_mask[None, :]
    if STATS:
        # Training: BN needs the batch statistics first, so store the raw output and this tile's share.
        cnt = tl.sum(m_mask.to(tl.float32), axis=0)
        s, m2 = tile_stats(acc, mask, cnt)
        tl.store(ps_ptr + pid_m * CO + offs_n, s, mask=n_mask)
        tl.store(pm_ptr + pid_m * CO + offs_n, m2, mask=n_mask)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _residual_act_store(acc, offs_m, offs_n, mask, OH, OW, r_ptr, o_ptr, sr_n, sr_c, sr_h, sr_w,
                        so_n, so_c, so_h, so_w, HAS_RES, RELU)


@triton.jit
def _residual_act_store(v, offs_m, offs_c, mask, OH, OW, r_ptr, o_ptr, sr_n, sr_c, sr_h, sr_w,
                        so_n, so_c, so_h, so_w, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """out = act(v + residual), stored in out's dtype and layout."""
    if HAS_RES:
        ro = pix_offsets(offs_m, OH, OW, sr_n, sr_h, sr_w)
        v += tl.load(r_ptr + ro[:, None] + offs_c[None, :] * sr_c, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0)
    oo = pix_offsets(offs_m, OH, OW, so_n, so_h, so_w)
    tl.store(o_ptr + oo[:, None] + offs_c[None, :] * so_c, v.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_gemm_kernel(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, ps_ptr, pm_ptr,
                      M, CI, H, W, CO, OH, OW,
                      sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                      sw_k, sw_n, sw_h, sw_w,
                      KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                      TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                      RELU: tl.constexpr, STATS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # The weight is read in place through its strides: one (CI, CO) GEMM operand per tap, element (k, n) of
    # tap (kh, kw) at k * sw_k + n * sw_n + kh * sw_h + kw * sw_w (the transposed pass swaps sw_k and sw_n).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    n_mask = offs_n < CO
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in tl.static_range(KH * KW):
        xo, ok = _gather(offs_m, m_mask, t // KW, t % KW, OH, OW, H, W, sx_n, sx_h, sx_w, STRIDE, PAD, TRANSPOSED)
        for k0 in range(0, CI, BK):
            kk = k0 + offs_k
            k_mask = kk < CI
            a = tl.load(x_ptr + xo[:, None] + kk[None, :] * sx_c, mask=ok[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptr + (t // KW) * sw_h + (t % KW) * sw_w + kk[:, None] * sw_k + offs_n[None, :] * sw_n,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(a, b, acc)
    _conv_epilogue(acc, pid_m, offs_m, m_mask, offs_n, n_mask, OH, OW, CO, b_ptr, r_ptr, o_ptr, ps_ptr, pm_ptr,
                   sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w, HAS_BIAS, HAS_RES, RELU, STATS)


@triton.jit
def _conv_dw_kernel(x_ptr, w_ptr, b_ptr, r_ptr, o_ptr, ps_ptr, pm_ptr,
                    M, C, H, W, OH, OW,
                    sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                    sw_c, sw_h, sw_w,
                    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                    RELU: tl.constexpr, STATS: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    # The (C, 1, KH, KW) weight is read in place through its strides.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = pid_c * BC + tl.arange(0, BC)
    m_mask = offs_m < M
    c_mask = offs_c < C
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for t in tl.static_range(KH * KW):
        xo, ok = _gather(offs_m, m_mask, t // KW, t % KW, OH, OW, H, W, sx_n, sx_h, sx_w, STRIDE, PAD, TRANSPOSED)
        a = tl.load(x_ptr + xo[:, None] + offs_c[None, :] * sx_c, mask=ok[:, None] & c_mask[None, :], other=0.0)
        wv = tl.load(w_ptr + (t // KW) * sw_h + (t % KW) * sw_w + offs_c * sw_c, mask=c_mask, other=0.0)
        acc += a.to(tl.float32) * wv.to(tl.float32)[None, :]
    _conv_epilogue(acc, pid_m, offs_m, m_mask, offs_c, c_mask, OH, OW, C, b_ptr, r_ptr, o_ptr, ps_ptr, pm_ptr,
                   sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w, HAS_BIAS, HAS_RES, RELU, STATS)


@triton.jit
def _wgrad_gemm_kernel(x_ptr, g_ptr, part_ptr, M, CI, H, W, CO, OH, OW,
                       sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, m_per_split,
                       KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                       BM: tl.constexpr, BCI: tl.constexpr, BCO: tl.constexpr):
    """part[split, tap, ci, co] = sum over this split's output pixels of x(tap-shifted)[m, ci] * g[m, co]."""
    pid0 = tl.program_id(0)
    n_ci = tl.cdiv(CI, BCI)
    t = pid0 // n_ci
    offs_ci = (pid0 % n_ci) * BCI + tl.arange(0, BCI)
    offs_co = tl.program_id(1) * BCO + tl.arange(0, BCO)
    split = tl.program_id(2)
    ci_mask = offs_ci < CI
    co_mask = offs_co < CO
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BCI, BCO), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_mask = offs_m < m_hi
        xo, ok = _gather(offs_m, m_mask, t // KW, t % KW, OH, OW, H, W, sx_n, sx_h, sx_w, STRIDE, PAD, False)
        a = tl.load(x_ptr + xo[:, None] + offs_ci[None, :] * sx_c, mask=ok[:, None] & ci_mask[None, :], other=0.0)
        go = pix_offsets(offs_m, OH, OW, sg_n, sg_h, sg_w)
        b = tl.load(g_ptr + go[:, None] + offs_co[None, :] * sg_c, mask=m_mask[:, None] & co_mask[None, :], other=0.0)
        if a.dtype != b.dtype:  # mixed (activation, fp32 scratch): compute in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = mma(tl.trans(a), b, acc)
    po = ((split * KH * KW + t) * CI + offs_ci)[:, None] * CO + offs_co[None, :]
    tl.store(part_ptr + po, acc, mask=ci_mask[:, None] & co_mask[None, :])


@triton.jit
def _wgrad_dw_kernel(x_ptr, g_ptr, part_ptr, M, C, H, W, OH, OW,
                     sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, m_per_split,
                     KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                     TAPS: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """part[split, tap, c] = sum over this split's output pixels of x(tap-shifted)[m, c] * g[m, c]."""
    offs_c = tl.program_id(0) * BC + tl.arange(0, BC)
    split = tl.program_id(1)
    c_mask = offs_c < C
    taps = tl.arange(0, TAPS)
    m_lo = split * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((TAPS, BC), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_mask = offs_m < m_hi
        go = pix_offsets(offs_m, OH, OW, sg_n, sg_h, sg_w)
        g = tl.load(g_ptr + go[:, None] + offs_c[None, :] * sg_c, mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        g = g.to(tl.float32)
        for t in tl.static_range(KH * KW):
            xo, ok = _gather(offs_m, m_mask, t // KW, t % KW, OH, OW, H, W, sx_n, sx_h, sx_w, STRIDE, PAD, False)
            a = tl.load(x_ptr + xo[:, None] + offs_c[None, :] * sx_c, mask=ok[:, None] & c_mask[None, :], other=0.0)
            contrib = tl.sum(a.to(tl.float32) * g, axis=0)
            acc = tl.where(taps[:, None] == t, acc + contrib[None, :], acc)
    po = (split * KH * KW + taps)[:, None] * C + offs_c[None, :]
    tl.store(part_ptr + po, acc, mask=(taps < KH * KW)[:, None] & c_mask[None, :])


@triton.jit
def _bn_apply_kernel(y_ptr, scale_ptr, shift_ptr, r_ptr, o_ptr, M, C, OH, OW,
                     sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
                     HAS_RES: tl.constexpr, RELU: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """out = act(y * scale + shift + residual) from the raw fp32 conv output y (M, C)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    v = y * scale[None, :] + shift[None, :]
    if HAS_RES:  # the reference rounds the normalised value to the output dtype before adding the residual
        v = v.to(o_ptr.dtype.element_ty).to(tl.float32)
    _residual_act_store(v, offs_m, offs_c, mask, OH, OW, r_ptr, o_ptr, sr_n, sr_c, sr_h, sr_w,
                        so_n, so_c, so_h, so_w, HAS_RES, RELU)


@triton.jit
def _grad_prep_kernel(go_ptr, out_ptr, g_ptr, y_ptr, mean_ptr, invstd_ptr, ps_ptr, px_ptr, M, C, OH, OW,
                      s1_n, s1_c, s1_h, s1_w, s2_n, s2_c, s2_h, s2_w, s3_n, s3_c, s3_h, s3_w,
                      RELU: tl.constexpr, HAS_Y: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """g = grad_out * (out > 0), plus this tile's per-channel sum(g) and (BN) sum(g * x_hat)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    o1 = pix_offsets(offs_m, OH, OW, s1_n, s1_h, s1_w)
    g = tl.load(go_ptr + o1[:, None] + offs_c[None, :] * s1_c, mask=mask, other=0.0)
    if RELU:
        o2 = pix_offsets(offs_m, OH, OW, s2_n, s2_h, s2_w)
        out = tl.load(out_ptr + o2[:, None] + offs_c[None, :] * s2_c, mask=mask, other=0.0)
        g = tl.where(out > 0, g, tl.zeros_like(g))
    o3 = pix_offsets(offs_m, OH, OW, s3_n, s3_h, s3_w)
    tl.store(g_ptr + o3[:, None] + offs_c[None, :] * s3_c, g, mask=mask)
    gf = g.to(tl.float32)
    tl.store(ps_ptr + pid_m * C + offs_c, tl.sum(gf, axis=0), mask=c_mask)
    if HAS_Y:
        y = tl.load(y_ptr + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
        x_hat = (y - mean[None, :]) * invstd[None, :]
        tl.store(px_ptr + pid_m * C + offs_c, tl.sum(gf * x_hat, axis=0), mask=c_mask)


@triton.jit
def _bn_grad_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, a_ptr, b_ptr, d_ptr, gy_ptr, M, C, OH, OW,
                    sg_n, sg_c, sg_h, sg_w, BM: tl.constexpr, BC: tl.constexpr):
    """BN backward through batch statistics: gy = a * (g - b - x_hat * d), written as an (M, C) matrix in gy's
    dtype (the activations' dtype: the GEMMs after it take it on tensor cores, as PyTorch's autocast does)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    go = pix_offsets(offs_m, OH, OW, sg_n, sg_h, sg_w)
    g = tl.load(g_ptr + go[:, None] + offs_c[None, :] * sg_c, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
    a = tl.load(a_ptr + offs_c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0)
    d = tl.load(d_ptr + offs_c, mask=c_mask, other=0.0)
    x_hat = (y - mean[None, :]) * invstd[None, :]
    gy = a[None, :] * (g - b[None, :] - x_hat * d[None, :])
    tl.store(gy_ptr + offs_m[:, None] * C + offs_c[None, :], gy.to(gy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------
EW_BM, EW_BC = 64, 32  # elementwise (M, C) tiles


def check_conv_call(op, x, weight, stride, padding, groups, residual=None, bias=None):
    """Clear errors for calls the kernels cannot take (the functional API has already checked shapes)."""
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("bias", bias)):
        check_dtype(op, name, t)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op} (triton): 'x' and 'weight' must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if conv_kind(weight, groups, x.shape[1]) is None:
        raise ValueError(f"{op} (triton): 'groups'={groups} is neither 1 nor depthwise (groups == C_in == C_out)")
    if not isinstance(stride, int) or stride < 1 or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op} (triton): 'stride' must be >= 1 and 'padding' >= 0, got {stride!r}, {padding!r}")


def _out_hw(h, w, kh, kw, stride, pad):
    return (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1


def _scratch(shape, device, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def launch_conv(src, weight, out, *, stride, pad, depthwise, transposed=False, bias=None,
                residual=None, relu=False, stats=False):
    """Run one conv (or, transposed, the input gradient of one) from ``src`` into ``out``.

    ``weight`` has the conv's own shape (C_out, C_in/groups, kH, kW), in any strides (read in place: no
    per-call copy; it must already be in ``src``'s dtype). fp32 scratch buffers are channels-last 4-D tensors,
    so kernels can also index them as (M, C) matrices. Returns per-tile (sum, m2, count) when ``stats``.
    """
    nb, ci, h, w = src.shape
    kh, kw = weight.shape[2:]
    co, oh, ow = out.shape[1:]
    m = nb * oh * ow
    if weight.dtype != src.dtype:
        raise TypeError(f"{OP} (triton): the weight ({weight.dtype}) must be in the input's dtype ({src.dtype})")
    if depthwise:
        w_strides = (weight.stride(0), weight.stride(2), weight.stride(3))
        bm, bn = 32, min(64, pow2(co))
    else:  # GEMM K runs over the weight's input channels (its output channels when transposed)
        k_dim, n_dim = (0, 1) if transposed else (1, 0)
        w_strides = (weight.stride(k_dim), weight.stride(n_dim), weight.stride(2), weight.stride(3))
        bm, bn, bk = 64, min(64, pow2(co)), min(32, pow2(ci))
    grid = (triton.cdiv(m, bm), triton.cdiv(co, bn))
    ps = pm = None
    if stats:
        ps = torch.empty((grid[0], co), dtype=torch.float32, device=src.device)
        pm = torch.empty_like(ps)
    dummy = out  # never read when the matching flag is off
    common = (
        bias if bias is not None else dummy, residual if residual is not None else dummy, out,
        ps if stats else dummy, pm if stats else dummy,
    )
    tail = (*strides4(src), *strides4(residual), *out.stride(), *w_strides)
    flags = dict(KH=kh, KW=kw, STRIDE=stride, PAD=pad, TRANSPOSED=transposed, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None, RELU=relu, STATS=stats, num_warps=4)
    if depthwise:
        _conv_dw_kernel[grid](src, weight, *common, m, co, h, w, oh, ow, *tail, BM=bm, BC=bn, **flags)
    else:
        _conv_gemm_kernel[grid](src, weight, *common, m, ci, h, w, co, oh, ow, *tail, BM=bm, BN=bn, BK=bk, **flags)
    if stats:
        counts = torch.full((grid[0],), float(bm), dtype=torch.float32, device=src.device)
        counts[-1] = m - bm * (grid[0] - 1)
        return ps, pm, counts
    return None


def launch_wgrad(x, g, weight_shape, *, stride, pad, depthwise):
    """Weight gradient of a conv from its input ``x`` and output gradient ``g`` (any float dtypes), fp32."""
    nb, ci, h, w = x.shape
    co, oh, ow = g.shape[1:]
    kh, kw = weight_shape[2:]
    m = nb * oh * ow
    if depthwise:
        bm, bc = 32, min(64, pow2(co))
        c_blocks = triton.cdiv(co, bc)
        split = num_splits(triton.cdiv(m, bm), c_blocks)
        per = triton.cdiv(triton.cdiv(m, split), bm) * bm
        split = triton.cdiv(m, per)
        part = torch.empty((split, kh * kw, co), dtype=torch.float32, device=x.device)
        _wgrad_dw_kernel[(c_blocks, split)](
            x, g, part, m, co, h, w, oh, ow, *x.stride(), *g.stride(), per,
            KH=kh, KW=kw, STRIDE=stride, PAD=pad, TAPS=pow2(kh * kw, 1), BM=bm, BC=bc, num_warps=4)
        return part.sum(0).t().reshape(weight_shape).contiguous()
    bm, bci, bco = 64, min(32, pow2(ci)), min(64, pow2(co))
    tiles = kh * kw * triton.cdiv(ci, bci) * triton.cdiv(co, bco)
    split = num_splits(triton.cdiv(m, bm), tiles)
    per = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = triton.cdiv(m, per)
    part = torch.empty((split, kh * kw, ci, co), dtype=torch.float32, device=x.device)
    _wgrad_gemm_kernel[(kh * kw * triton.cdiv(ci, bci), triton.cdiv(co, bco), split)](
        x, g, part, m, ci, h, w, co, oh, ow, *x.stride(), *g.stride(), per,
        KH=kh, KW=kw, STRIDE=stride, PAD=pad, BM=bm, BCI=bci, BCO=bco, num_warps=4)
    return part.sum(0).reshape(kh, kw, ci, co).permute(3, 2, 0, 1).contiguous()


def _ew_grid(m, c):
    return (triton.cdiv(m, EW_BM), triton.cdiv(c, EW_BC))


def _grad_prep(grad_out, out, relu, y=None, mean=None, invstd=None):
    """(g, per-channel sum(g), per-channel sum(g * x_hat) or None)."""
    nb, c, oh, ow = grad_out.shape
    m = nb * oh * ow
    g = torch.empty_like(grad_out)  # keeps grad_out's layout
    grid = _ew_grid(m, c)
    ps = torch.empty((grid[0], c), dtype=torch.float32, device=g.device)
    px = torch.empty_like(ps) if y is not None else ps
    _grad_prep_kernel[grid](
        grad_out, out, g, y if y is not None else ps, mean if y is not None else ps,
        invstd if y is not None else ps, ps, px, m, c, oh, ow,
        *grad_out.stride(), *out.stride(), *g.stride(),
        RELU=relu, HAS_Y=y is not None, BM=EW_BM, BC=EW_BC, num_warps=4)
    return g, ps.sum(0), (px.sum(0) if y is not None else None)


# ---------------------------------------------------------------------------------------------------------
# Op implementations (same positional arguments and outputs as the custom ops)
# ---------------------------------------------------------------------------------------------------------
def conv_bias_act(x, weight, bias, stride, padding, groups, relu, residual):
    check_conv_call("conv_bias_act", x, weight, stride, padding, groups, residual, bias)
    x, residual = as_nchw_or_cl(x), as_nchw_or_cl(residual)
    nb, _, h, w = x.shape
    oh, ow = _out_hw(h, w, *weight.shape[2:], stride, padding)
    out = empty_like_format((nb, weight.shape[0], oh, ow), x.dtype, residual if residual is not None else x)
    launch_conv(x, weight, out, stride=stride, pad=padding, depthwise=groups != 1, bias=bias,
                residual=residual, relu=relu)
    return out


def _conv_raw_with_stats(x, weight, stride, padding, groups):
    """Raw conv output as an fp32 channels-last scratch, and its fp32 batch (mean, biased var)."""
    nb, _, h, w = x.shape
    co = weight.shape[0]
    oh, ow = _out_hw(h, w, *weight.shape[2:], stride, padding)
    y = _scratch((nb, co, oh, ow), x.device)
    ps, pm, counts = launch_conv(x, weight, y, stride=stride, pad=padding, depthwise=groups != 1, stats=True)
    mean, var = chan_combine(ps, pm, counts, nb * oh * ow)
    return y, mean, var, (nb, co, oh, ow)


def conv_bn_train(x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual, keep_conv_output=False):
    check_conv_call("conv_bn_train", x, weight, stride, padding, groups, residual)
    x, residual = as_nchw_or_cl(x), as_nchw_or_cl(residual)
    y, mean, var, shape = _conv_raw_with_stats(x, weight, stride, padding, groups)
    scale = bn_weight.float() * torch.rsqrt(var + eps)
    shift = bn_bias.float() - mean * scale
    out = empty_like_format(shape, x.dtype, residual if residual is not None else x)
    nb, co, oh, ow = shape
    _bn_apply_kernel[_ew_grid(nb * oh * ow, co)](
        y, scale, shift, residual if residual is not None else out, out, nb * oh * ow, co, oh, ow,
        *strides4(residual), *out.stride(), HAS_RES=residual is not None, RELU=relu, BM=EW_BM, BC=EW_BC,
        num_warps=4)
    # y lives in a reused scratch: a kept copy, in x's dtype as the reference keeps it.
    kept = empty_like_format(shape, x.dtype, x).copy_(y) if keep_conv_output else y.new_empty((0,), dtype=x.dtype)
    return out, mean, var, kept


def _conv_backward_from(gy, x, weight, stride, padding, groups, input_grad=True):
    """(grad_x in x's dtype and layout, empty when not input_grad; fp32 grad_w) from the conv-output gradient."""
    if input_grad:
        grad_x = empty_like_format(x.shape, x.dtype, x)
        launch_conv(gy, weight, grad_x, stride=stride, pad=padding, depthwise=groups != 1, transposed=True)
    else:
        grad_x = x.new_empty((0,))
    grad_w = launch_wgrad(x, gy, weight.shape, stride=stride, pad=padding, depthwise=groups != 1)
    return grad_x, grad_w


def conv_bias_act_backward(grad_out, x, weight, bias, stride, padding, groups, relu, residual, out):
    check_conv_call("conv_bias_act_backward", x, weight, stride, padding, groups, residual, bias)
    check_dtype("conv_bias_act_backward", "grad_out", grad_out)
    grad_out, x, out = as_nchw_or_cl(grad_out), as_nchw_or_cl(x), as_nchw_or_cl(out)
    g, gsum, _ = _grad_prep(grad_out, out, relu)
    gc = g.to(weight.dtype) if g.dtype != weight.dtype else g
    grad_x, grad_w = _conv_backward_from(gc, x, weight, stride, padding, groups)
    return grad_x, grad_w.to(weight.dtype), gsum.to(bias.dtype if bias is not None else weight.dtype), g


def conv_bn_train_backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding, groups, eps,
                           relu, has_residual, input_grad=True, conv_output=None):
    check_conv_call("conv_bn_train_backward", x, weight, stride, padding, groups)
    check_dtype("conv_bn_train_backward", "grad_out", grad_out)
    grad_out, x, out = as_nchw_or_cl(grad_out), as_nchw_or_cl(x), as_nchw_or_cl(out)
    nb, _, h, w = x.shape
    co = weight.shape[0]
    oh, ow = _out_hw(h, w, *weight.shape[2:], stride, padding)
    m = nb * oh * ow
    # the kept raw conv output, or recomputed
    y = _scratch((nb, co, oh, ow), x.device)
    if conv_output is not None:
        y.copy_(conv_output)
    else:
        launch_conv(x, weight, y, stride=stride, pad=padding, depthwise=groups != 1)
    mean, invstd = mean.float().contiguous(), torch.rsqrt(var.float() + eps).contiguous()
    g, sum_g, sum_gx = _grad_prep(grad_out, out, relu, y, mean, invstd)
    a = (bn_weight.float() * invstd).contiguous()
    # The conv-output gradient in x's dtype: in fp16/bf16 the input- and weight-gradient GEMMs run on tensor
    # cores (fp32 accumulation), as PyTorch's own mixed-precision backward does.
    gy = _scratch(y.shape, x.device, x.dtype)
    _bn_grad_kernel[_ew_grid(m, co)](
        g, y, mean, invstd, a, sum_g / m, sum_gx / m, gy, m, co, oh, ow, *g.stride(), BM=EW_BM, BC=EW_BC,
        num_warps=4)
    grad_x, grad_w = _conv_backward_from(gy, x, weight.to(x.dtype), stride, padding, groups, input_grad)
    g = g if has_residual else g.new_empty((0,))
    return grad_x, grad_w.to(weight.dtype), sum_gx.to(bn_weight.dtype), sum_g.to(bn_bias.dtype), g
