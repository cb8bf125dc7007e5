"""Triton kernels for the SHSA mixer (``shsa_fused``, ``shsa_train`` and their backwards).

Layout: the attending slice x[b, :P] is read in place as a (P, N) matrix through the channel and token
strides (NCHW and channels_last both have a single token stride), so nothing is copied or transposed.

Forward, one program per (image, block of queries): GroupNorm statistics of the image (fp32, mean subtracted
before squaring), the normalised query tile, q = W_q xn, then a loop over key blocks that recomputes k and v
from x with an online softmax (exp2, fp32 running max and sum), and finally ReLU(cat(ya, x[:, P:])). With
N <= 128 there is one query block and one key block: the whole image stays on chip. The qkv affine is applied
per output row after the projection GEMM: (bias) for inference, the BatchNorm scale/shift for training.

Training forward adds a statistics pass (per-program per-channel sum and centred sum of squares of the raw
qkv, merged on the host) before the attention pass. The backward recomputes qkv in fp32 into scratch, then
runs a flash-attention style dq pass and dk/dv pass, and a per-image pass for the projection, BatchNorm and
GroupNorm backwards (GroupNorm couples all of an image's values, so it needs the image-wide sums first).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .common import (as_nchw_or_cl, chan_combine, check_dtype, empty_like_format, mma, mma_fp32, pow2,
                     shared_memory_limit)
from .limits import SHSA_MAX_P, SHSA_MAX_QK_DIM

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _gn_stats(xb, P, N, s_c, s_t, eps, PP: tl.constexpr, BN: tl.constexpr):
    """Mean and 1/std over the (P, N) slice of one image, two-pass in fp32."""
    offs_p = tl.arange(0, PP)
    p_mask = offs_p < P
    acc = tl.zeros((PP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask = p_mask[:, None] & (offs_n < N)[None, :]
        v = tl.load(xb + offs_p[:, None] * s_c + offs_n[None, :] * s_t, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=1)
    count = P * N * 1.0  # (works whether P, N arrive as tensors or specialised constants)
    mean = tl.sum(acc, axis=0) / count
    acc = tl.zeros((PP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask = p_mask[:, None] & (offs_n < N)[None, :]
        v = tl.load(xb + offs_p[:, None] * s_c + offs_n[None, :] * s_t, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - mean, 0.0)
        acc += tl.sum(d * d, axis=1)
    return mean, tl.rsqrt(tl.sum(acc, axis=0) / count + eps)


@triton.jit
def _load_xn(xb, offs_p, p_mask, offs_n, n_mask, s_c, s_t, mean, rstd, gw_ptr, gb_ptr,
             AFFINE: tl.constexpr, EXACT: tl.constexpr):
    """(xn, GEMM operand): xn = GroupNorm(x) tile in fp32; the operand adds the GroupNorm affine and is
    rounded to x's dtype as the reference forward rounds it, or stays fp32 (EXACT, for the backward)."""
    mask = p_mask[:, None] & n_mask[None, :]
    v = tl.load(xb + offs_p[:, None] * s_c + offs_n[None, :] * s_t, mask=mask, other=0.0)
    xn = tl.where(mask, (v.to(tl.float32) - mean) * rstd, 0.0)
    if EXACT:
        op = xn
    else:
        op = xn.to(v.dtype)
    if AFFINE:
        gw = tl.load(gw_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        op = tl.where(mask, op.to(tl.float32) * gw[:, None] + gb[:, None], 0.0)
        if not EXACT:
            op = op.to(v.dtype)
    return xn, op


@triton.jit
def _project(w_ptr, r0, NR, P, offs_p, p_mask, xop, RP: tl.constexpr, TC: tl.constexpr):
    """Rows r0 .. r0+NR of W (2Q+P, P) times the (P, tokens) operand: (RP, tokens) fp32. TC: fp32 operands on
    tensor cores (tf32x3)."""
    offs_r = tl.arange(0, RP)
    wt = tl.load(w_ptr + (r0 + offs_r)[:, None] * P + offs_p[None, :],
                 mask=(offs_r < NR)[:, None] & p_mask[None, :], other=0.0)
    if xop.dtype == tl.float32:
        return mma_fp32(wt.to(tl.float32), xop, tl.zeros((RP, xop.shape[1]), dtype=tl.float32), TC)
    return mma(wt.to(xop.dtype), xop, tl.zeros((RP, xop.shape[1]), dtype=tl.float32))


@triton.jit
def _row_affine(v, cs_ptr, csh_ptr, r0, NR, RP: tl.constexpr):
    """v * scale + shift per row; a null ``cs_ptr`` is a scale of one (inference: the qkv bias only)."""
    offs_r = tl.arange(0, RP)
    r_mask = offs_r < NR
    if cs_ptr is not None:
        v = v * tl.load(cs_ptr + r0 + offs_r, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    return v + tl.load(csh_ptr + r0 + offs_r, mask=r_mask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _load_rows(base, r0, NR, N, offs_n, n_mask, RP: tl.constexpr):
    """Rows r0 .. r0+NR of an fp32 (rows, N) scratch matrix at the given tokens."""
    offs_r = tl.arange(0, RP)
    mask = (offs_r < NR)[:, None] & n_mask[None, :]
    return tl.load(base + (r0 + offs_r)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, v, r0, NR, N, offs_n, n_mask, RP: tl.constexpr):
    offs_r = tl.arange(0, RP)
    mask = (offs_r < NR)[:, None] & n_mask[None, :]
    tl.store(base + (r0 + offs_r)[:, None] * N + offs_n[None, :], v, mask=mask)


@triton.jit
def _masked_grad(go_b, out_b, offs_c, c_mask, offs_n, n_mask, sg_c, sg_t, so_c, so_t):
    """grad_out * (out > 0) as an fp32 (channels, tokens) tile."""
    mask = c_mask[:, None] & n_mask[None, :]
    g = tl.load(go_b + offs_c[:, None] * sg_c + offs_n[None, :] * sg_t, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_b + offs_c[:, None] * so_c + offs_n[None, :] * so_t, mask=mask, other=0.0)
    return tl.where(o > 0, g, 0.0)


@triton.jit
def _online_attention(q, kv_src, N, BK: tl.constexpr, qk_scale,
                      xb, offs_p, p_mask, s_c, s_t, mean, rstd, gw_ptr, gb_ptr, w_ptr, P, QK,
                      pre_b, cs_ptr, csh_ptr,
                      FROM_PRE: tl.constexpr, AFFINE: tl.constexpr, EXACT: tl.constexpr,
                      QP: tl.constexpr, PP: tl.constexpr, TC: tl.constexpr):
    """softmax(q^T k) v^T for one query tile against all keys: returns (ya (PP, BQ) fp32, log2-sum-exp).

    k and v come from x (recomputed per key block) or, in the backward, from the fp32 pre-affine scratch.
    """
    BQ: tl.constexpr = q.shape[1]
    m_i = tl.full((BQ,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BQ,), dtype=tl.float32)
    acc = tl.zeros((PP, BQ), dtype=tl.float32)
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < N
        k, v = _keys_values(offs_k, k_mask, N, xb, offs_p, p_mask, s_c, s_t, mean, rstd, gw_ptr, gb_ptr, w_ptr,
                            P, QK, pre_b, cs_ptr, csh_ptr, FROM_PRE, AFFINE, EXACT, QP, PP, TC)
        if EXACT:
            s = mma_fp32(tl.trans(q), k, tl.zeros((BQ, BK), dtype=tl.float32), TC) * qk_scale
        else:
            s = mma(tl.trans(q), k.to(q.dtype), tl.zeros((BQ, BK), dtype=tl.float32)) * qk_scale
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EXACT:
            acc = mma_fp32(v, tl.trans(p), acc * alpha[None, :], TC)
        else:
            acc = mma(v, tl.trans(p.to(v.dtype)), acc * alpha[None, :])
        m_i = m_new
    return acc / l_i[None, :], m_i + tl.log2(l_i)


@triton.jit
def _keys_values(offs_k, k_mask, N, xb, offs_p, p_mask, s_c, s_t, mean, rstd, gw_ptr, gb_ptr, w_ptr, P, QK,
                 pre_b, cs_ptr, csh_ptr, FROM_PRE: tl.constexpr, AFFINE: tl.constexpr, EXACT: tl.constexpr,
                 QP: tl.constexpr, PP: tl.constexpr, TC: tl.constexpr):
    if FROM_PRE:
        k = _load_rows(pre_b, QK, QK, N, offs_k, k_mask, QP)
        v = _load_rows(pre_b, 2 * QK, P, N, offs_k, k_mask, PP)
    else:
        _, xop = _load_xn(xb, offs_p, p_mask, offs_k, k_mask, s_c, s_t, mean, rstd, gw_ptr, gb_ptr, AFFINE, EXACT)
        k = _project(w_ptr, QK, QK, P, offs_p, p_mask, xop, QP, TC)
        v = _project(w_ptr, 2 * QK, P, P, offs_p, p_mask, xop, PP, TC)
    k = _row_affine(k, cs_ptr, csh_ptr, QK, QK, QP)
    v = _row_affine(v, cs_ptr, csh_ptr, 2 * QK, P, PP)
    if not EXACT:  # the reference forward holds qkv in x's dtype
        k = k.to(xb.dtype.element_ty)
        v = v.to(xb.dtype.element_ty)
    return k, v


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _shsa_fwd_kernel(x_ptr, w_ptr, cs_ptr, csh_ptr, gw_ptr, gb_ptr, o_ptr,
                     C, P, N, QK, sx_b, sx_c, sx_t, so_b, so_c, so_t, gn_eps, qk_scale,
                     AFFINE: tl.constexpr, QP: tl.constexpr, PP: tl.constexpr,
                     BQ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(0)
    xb = x_ptr + b * sx_b
    ob = o_ptr + b * so_b
    mean, rstd = _gn_stats(xb, P, N, sx_c, sx_t, gn_eps, PP, BK)
    offs_p = tl.arange(0, PP)
    p_mask = offs_p < P
    offs_q = tl.program_id(1) * BQ + tl.arange(0, BQ)
    q_mask = offs_q < N
    _, xop = _load_xn(xb, offs_p, p_mask, offs_q, q_mask, sx_c, sx_t, mean, rstd, gw_ptr, gb_ptr, AFFINE, False)
    q = _row_affine(_project(w_ptr, 0, QK, P, offs_p, p_mask, xop, QP, False), cs_ptr, csh_ptr, 0, QK, QP)
    q = q.to(x_ptr.dtype.element_ty)
    ya, _ = _online_attention(q, 0, N, BK, qk_scale, xb, offs_p, p_mask, sx_c, sx_t, mean, rstd, gw_ptr, gb_ptr,
                              w_ptr, P, QK, w_ptr, cs_ptr, csh_ptr, False, AFFINE, False, QP, PP, False)
    ya = tl.maximum(ya, 0.0)
    tl.store(ob + offs_p[:, None] * so_c + offs_q[None, :] * so_t, ya.to(o_ptr.dtype.element_ty),
             mask=p_mask[:, None] & q_mask[None, :])
    for c0 in range(P, C, BC):  # untouched channels: ReLU only
        offs_c = c0 + tl.arange(0, BC)
        mask = (offs_c < C)[:, None] & q_mask[None, :]
        v = tl.load(xb + offs_c[:, None] * sx_c + offs_q[None, :] * sx_t, mask=mask, other=0.0)
        tl.store(ob + offs_c[:, None] * so_c + offs_q[None, :] * so_t, tl.maximum(v, 0.0), mask=mask)


@triton.jit
def _row_stats(v, valid, ps_ptr, pm_ptr, row, r0, NR, RP: tl.constexpr):
    """Store per-row (sum, sum of squares about the tile mean) over the valid tokens of a (RP, tokens) tile."""
    cnt = tl.sum(valid.to(tl.float32), axis=0)
    s = tl.sum(tl.where(valid[None, :], v, 0.0), axis=1)
    d = tl.where(valid[None, :], v - (s / cnt)[:, None], 0.0)
    offs_r = tl.arange(0, RP)
    r_mask = offs_r < NR
    tl.store(ps_ptr + row + r0 + offs_r, s, mask=r_mask)
    tl.store(pm_ptr + row + r0 + offs_r, tl.sum(d * d, axis=1), mask=r_mask)


@triton.jit
def _shsa_proj_kernel(x_ptr, w_ptr, gw_ptr, gb_ptr, pre_ptr, xn_ptr, rstd_ptr, ps_ptr, pm_ptr,
                      P, N, QK, R, sx_b, sx_c, sx_t, gn_eps,
                      AFFINE: tl.constexpr, STORE: tl.constexpr, QP: tl.constexpr, PP: tl.constexpr,
                      BN: tl.constexpr, TC: tl.constexpr):
    """Raw qkv = W GroupNorm(x) for one token block: per-row statistics (training forward, x's dtype as the
    reference rounds) or, STORE, the exact fp32 qkv, xn and 1/std written to scratch (backward)."""
    b = tl.program_id(0)
    nb = tl.program_id(1)
    xb = x_ptr + b * sx_b
    mean, rstd = _gn_stats(xb, P, N, sx_c, sx_t, gn_eps, PP, BN)
    offs_p = tl.arange(0, PP)
    p_mask = offs_p < P
    offs_n = nb * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    xn, xop = _load_xn(xb, offs_p, p_mask, offs_n, n_mask, sx_c, sx_t, mean, rstd, gw_ptr, gb_ptr, AFFINE, STORE)
    pq = _project(w_ptr, 0, QK, P, offs_p, p_mask, xop, QP, TC)
    pk = _project(w_ptr, QK, QK, P, offs_p, p_mask, xop, QP, TC)
    pv = _project(w_ptr, 2 * QK, P, P, offs_p, p_mask, xop, PP, TC)
    if STORE:
        pre_b = pre_ptr + b * R * N
        _store_rows(pre_b, pq, 0, QK, N, offs_n, n_mask, QP)
        _store_rows(pre_b, pk, QK, QK, N, offs_n, n_mask, QP)
        _store_rows(pre_b, pv, 2 * QK, P, N, offs_n, n_mask, PP)
        _store_rows(xn_ptr + b * P * N, xn, 0, P, N, offs_n, n_mask, PP)
        tl.store(rstd_ptr + b, rstd, mask=nb == 0)
    else:
        row = (b * tl.num_programs(1) + nb) * R
        _row_stats(pq, n_mask, ps_ptr, pm_ptr, row, 0, QK, QP)
        _row_stats(pk, n_mask, ps_ptr, pm_ptr, row, QK, QK, QP)
        _row_stats(pv, n_mask, ps_ptr, pm_ptr, row, 2 * QK, P, PP)


@triton.jit
def _bwd_block(pre_ptr, R, N, P, PP: tl.constexpr, BLK: tl.constexpr):
    """(image, its qkv scratch, channel offsets/mask, this program's token block offsets/mask)."""
    b = tl.program_id(0)
    offs_p = tl.arange(0, PP)
    offs = tl.program_id(1) * BLK + tl.arange(0, BLK)
    return b, pre_ptr + b * R * N, offs_p, offs_p < P, offs, offs < N


@triton.jit
def _scratch_kv(pre_b, offs_k, k_mask, N, offs_p, p_mask, cs_ptr, csh_ptr, P, QK, QP: tl.constexpr, PP: tl.constexpr):
    """Exact fp32 k and v for a key block, from the backward's pre-affine qkv scratch."""
    return _keys_values(offs_k, k_mask, N, pre_b, offs_p, p_mask, 0, 0, 0.0, 1.0, cs_ptr, cs_ptr, cs_ptr, P, QK,
                        pre_b, cs_ptr, csh_ptr, True, False, True, QP, PP, False)


@triton.jit
def _shsa_bwd_q_kernel(pre_ptr, cs_ptr, csh_ptr, go_ptr, out_ptr, gqkv_ptr, lse_ptr, dd_ptr,
                       P, N, QK, R, sg_b, sg_c, sg_t, so_b, so_c, so_t, qk_scale, sm_scale,
                       QP: tl.constexpr, PP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr):
    """dq for one query block; also stores its log2-sum-exp and D = sum_c g * ya for the dk/dv pass."""
    b, pre_b, offs_p, p_mask, offs_q, q_mask = _bwd_block(pre_ptr, R, N, P, PP, BQ)
    q = _row_affine(_load_rows(pre_b, 0, QK, N, offs_q, q_mask, QP), cs_ptr, csh_ptr, 0, QK, QP)
    g = _masked_grad(go_ptr + b * sg_b, out_ptr + b * so_b, offs_p, p_mask, offs_q, q_mask, sg_c, sg_t, so_c, so_t)
    ya, lse = _online_attention(q, 0, N, BK, qk_scale, pre_b, offs_p, p_mask, 0, 0, 0.0, 1.0, cs_ptr, cs_ptr,
                                cs_ptr, P, QK, pre_b, cs_ptr, csh_ptr, True, False, True, QP, PP, TC)
    dd = tl.sum(g * ya, axis=0)
    dq = tl.zeros((QP, BQ), dtype=tl.float32)
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < N
        k, v = _scratch_kv(pre_b, offs_k, k_mask, N, offs_p, p_mask, cs_ptr, csh_ptr, P, QK, QP, PP)
        s = mma_fp32(tl.trans(q), k, tl.zeros((BQ, BK), dtype=tl.float32), TC) * qk_scale
        p = tl.where(k_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        g_attn = mma_fp32(tl.trans(g), v, tl.zeros((BQ, BK), dtype=tl.float32), TC)
        dq = mma_fp32(k, tl.trans(p * (g_attn - dd[:, None])), dq, TC)
    _store_rows(gqkv_ptr + b * R * N, dq * sm_scale, 0, QK, N, offs_q, q_mask, QP)
    tl.store(lse_ptr + b * N + offs_q, lse, mask=q_mask)
    tl.store(dd_ptr + b * N + offs_q, dd, mask=q_mask)


@triton.jit
def _shsa_bwd_kv_kernel(pre_ptr, cs_ptr, csh_ptr, go_ptr, out_ptr, gqkv_ptr, lse_ptr, dd_ptr,
                        P, N, QK, R, sg_b, sg_c, sg_t, so_b, so_c, so_t, qk_scale, sm_scale,
                        QP: tl.constexpr, PP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr):
    """dk and dv for one key block, looping over all query blocks."""
    b, pre_b, offs_p, p_mask, offs_k, k_mask = _bwd_block(pre_ptr, R, N, P, PP, BK)
    k, v = _scratch_kv(pre_b, offs_k, k_mask, N, offs_p, p_mask, cs_ptr, csh_ptr, P, QK, QP, PP)
    dk = tl.zeros((QP, BK), dtype=tl.float32)
    dv = tl.zeros((PP, BK), dtype=tl.float32)
    for q0 in range(0, N, BQ):
        offs_q = q0 + tl.arange(0, BQ)
        q_mask = offs_q < N
        q = _row_affine(_load_rows(pre_b, 0, QK, N, offs_q, q_mask, QP), cs_ptr, csh_ptr, 0, QK, QP)
        g = _masked_grad(go_ptr + b * sg_b, out_ptr + b * so_b, offs_p, p_mask, offs_q, q_mask, sg_c, sg_t, so_c, so_t)
        # padded queries get lse = +inf, so their probabilities are exactly 0
        lse = tl.load(lse_ptr + b * N + offs_q, mask=q_mask, other=float("inf"))
        dd = tl.load(dd_ptr + b * N + offs_q, mask=q_mask, other=0.0)
        s = mma_fp32(tl.trans(q), k, tl.zeros((BQ, BK), dtype=tl.float32), TC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        dv = mma_fp32(g, p, dv, TC)
        g_attn = mma_fp32(tl.trans(g), v, tl.zeros((BQ, BK), dtype=tl.float32), TC)
        dk = mma_fp32(q, p * (g_attn - dd[:, None]), dk, TC)
    g_b = gqkv_ptr + b * R * N
    _store_rows(g_b, dk * sm_scale, QK, QK, N, offs_k, k_mask, QP)
    _store_rows(g_b, dv, 2 * QK, P, N, offs_k, k_mask, PP)


@triton.jit
def _graw_rows(g_b, pre_b, r0, NR, R, N, offs_n, n_mask, bn_ptr, TRAIN: tl.constexpr, RP: tl.constexpr):
    """Gradient w.r.t. raw (pre-BatchNorm) qkv rows. bn_ptr is an fp32 (5, R) table (a, b, d, mean, invstd)
    of the batch-statistics BN backward g_raw = a * (g - b - r_hat * d); without TRAIN the rows pass through."""
    g = _load_rows(g_b, r0, NR, N, offs_n, n_mask, RP)
    if TRAIN:
        offs_r = r0 + tl.arange(0, RP)
        r_mask = offs_r < r0 + NR
        a = tl.load(bn_ptr + offs_r, mask=r_mask, other=0.0)
        bb = tl.load(bn_ptr + R + offs_r, mask=r_mask, other=0.0)
        d = tl.load(bn_ptr + 2 * R + offs_r, mask=r_mask, other=0.0)
        mu = tl.load(bn_ptr + 3 * R + offs_r, mask=r_mask, other=0.0)
        inv = tl.load(bn_ptr + 4 * R + offs_r, mask=r_mask, other=0.0)
        r_hat = (_load_rows(pre_b, r0, NR, N, offs_n, n_mask, RP) - mu[:, None]) * inv[:, None]
        g = tl.where(r_mask[:, None] & n_mask[None, :], a[:, None] * (g - bb[:, None] - r_hat * d[:, None]), 0.0)
    return g


@triton.jit
def _input_grad_tile(g_b, pre_b, xn_b, w_ptr, bn_ptr, gw, gb, offs_p, p_mask, offs_n, n_mask, P, N, QK, R,
                     TRAIN: tl.constexpr, QP: tl.constexpr, PP: tl.constexpr, TC: tl.constexpr):
    """For one token block: xn, the GEMM input xg, the raw-qkv gradients and g_xg = W^T g_raw (all fp32)."""
    xn = _load_rows(xn_b, 0, P, N, offs_n, n_mask, PP)
    # also without TRAIN (gw = 1, gb = 0): on the H200 the loaded xn as this GEMM operand gave wrong weight
    # gradients at 16-token blocks in tf32x3, while the computed operand of the training path was right
    xg = tl.where(p_mask[:, None] & n_mask[None, :], xn * gw[:, None] + gb[:, None], 0.0)
    gq = _graw_rows(g_b, pre_b, 0, QK, R, N, offs_n, n_mask, bn_ptr, TRAIN, QP)
    gk = _graw_rows(g_b, pre_b, QK, QK, R, N, offs_n, n_mask, bn_ptr, TRAIN, QP)
    gv = _graw_rows(g_b, pre_b, 2 * QK, P, R, N, offs_n, n_mask, bn_ptr, TRAIN, PP)
    # W^T g_raw, as three row groups of W (fp32)
    offs_qr = tl.arange(0, QP)
    wq = tl.load(w_ptr + offs_qr[:, None] * P + offs_p[None, :], mask=(offs_qr < QK)[:, None] & p_mask[None, :], other=0.0)
    wk = tl.load(w_ptr + (QK + offs_qr)[:, None] * P + offs_p[None, :], mask=(offs_qr < QK)[:, None] & p_mask[None, :], other=0.0)
    wv = tl.load(w_ptr + (2 * QK + offs_p)[:, None] * P + offs_p[None, :], mask=p_mask[:, None] & p_mask[None, :], other=0.0)
    gxg = mma_fp32(tl.trans(wq), gq, tl.zeros((PP, offs_n.shape[0]), dtype=tl.float32), TC)
    gxg = mma_fp32(tl.trans(wk), gk, gxg, TC)
    gxg = mma_fp32(tl.trans(wv), gv, gxg, TC)
    return xn, xg, gq, gk, gv, gxg


@triton.jit
def _shsa_bwd_in_kernel(gqkv_ptr, pre_ptr, xn_ptr, rstd_ptr, w_ptr, gw_ptr, gb_ptr, bn_ptr,
                        go_ptr, out_ptr, gx_ptr, pw_ptr, pr_ptr, pgw_ptr, pgb_ptr,
                        C, P, N, QK, R, sg_b, sg_c, sg_t, so_b, so_c, so_t, sx_b, sx_c, sx_t,
                        TRAIN: tl.constexpr, QP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr,
                        BC: tl.constexpr, TC: tl.constexpr):
    """Per image: projection backward (grad W partials, W^T g), GroupNorm backward, pass-through channels."""
    b = tl.program_id(0)
    g_b = gqkv_ptr + b * R * N
    pre_b = pre_ptr + b * R * N
    xn_b = xn_ptr + b * P * N
    offs_p = tl.arange(0, PP)
    p_mask = offs_p < P
    if TRAIN:
        gw = tl.load(gw_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
    else:
        gw = tl.full((PP,), 1.0, dtype=tl.float32)
        gb = tl.zeros((PP,), dtype=tl.float32)
    acc_q = tl.zeros((QP, PP), dtype=tl.float32)
    acc_k = tl.zeros((QP, PP), dtype=tl.float32)
    acc_v = tl.zeros((PP, PP), dtype=tl.float32)
    sum_q = tl.zeros((QP,), dtype=tl.float32)
    sum_k = tl.zeros((QP,), dtype=tl.float32)
    sum_v = tl.zeros((PP,), dtype=tl.float32)
    s1 = tl.zeros((PP,), dtype=tl.float32)
    s2 = tl.zeros((PP,), dtype=tl.float32)
    t_gw = tl.zeros((PP,), dtype=tl.float32)
    t_gb = tl.zeros((PP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < N
        xn, xg, gq, gk, gv, gxg = _input_grad_tile(g_b, pre_b, xn_b, w_ptr, bn_ptr, gw, gb, offs_p, p_mask, offs_n,
                                                   n_mask, P, N, QK, R, TRAIN, QP, PP, TC)
        acc_q = mma_fp32(gq, tl.trans(xg), acc_q, TC)
        acc_k = mma_fp32(gk, tl.trans(xg), acc_k, TC)
        acc_v = mma_fp32(gv, tl.trans(xg), acc_v, TC)
        sum_q += tl.sum(gq, axis=1)
        sum_k += tl.sum(gk, axis=1)
        sum_v += tl.sum(gv, axis=1)
        t_gw += tl.sum(gxg * xn, axis=1)
        t_gb += tl.sum(gxg, axis=1)
        gxn = gxg * gw[:, None]
        s1 += tl.sum(gxn, axis=1)
        s2 += tl.sum(gxn * xn, axis=1)
    count = P * N * 1.0
    m1 = tl.sum(s1, axis=0) / count
    m2 = tl.sum(s2, axis=0) / count
    rstd = tl.load(rstd_ptr + b)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < N
        xn, xg, gq, gk, gv, gxg = _input_grad_tile(g_b, pre_b, xn_b, w_ptr, bn_ptr, gw, gb, offs_p, p_mask, offs_n,
                                                   n_mask, P, N, QK, R, TRAIN, QP, PP, TC)
        gx = rstd * (gxg * gw[:, None] - m1 - xn * m2)
        tl.store(gx_ptr + b * sx_b + offs_p[:, None] * sx_c + offs_n[None, :] * sx_t, gx.to(gx_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & n_mask[None, :])
    for c0 in range(P, C, BC):  # pass-through channels: only the ReLU mask
        offs_c = c0 + tl.arange(0, BC)
        c_mask = offs_c < C
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_mask = offs_n < N
            g = _masked_grad(go_ptr + b * sg_b, out_ptr + b * so_b, offs_c, c_mask, offs_n, n_mask, sg_c, sg_t, so_c, so_t)
            tl.store(gx_ptr + b * sx_b + offs_c[:, None] * sx_c + offs_n[None, :] * sx_t, g.to(gx_ptr.dtype.element_ty),
                     mask=c_mask[:, None] & n_mask[None, :])
    pw_b = pw_ptr + b * R * P
    _store_rows(pw_b, acc_q, 0, QK, P, offs_p, p_mask, QP)
    _store_rows(pw_b, acc_k, QK, QK, P, offs_p, p_mask, QP)
    _store_rows(pw_b, acc_v, 2 * QK, P, P, offs_p, p_mask, PP)
    offs_qr = tl.arange(0, QP)
    tl.store(pr_ptr + b * R + offs_qr, sum_q, mask=offs_qr < QK)
    tl.store(pr_ptr + b * R + QK + offs_qr, sum_k, mask=offs_qr < QK)
    tl.store(pr_ptr + b * R + 2 * QK + offs_p, sum_v, mask=p_mask)
    tl.store(pgw_ptr + b * P + offs_p, t_gw, mask=p_mask)
    tl.store(pgb_ptr + b * P + offs_p, t_gb, mask=p_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------
def _token_stride(t):
    # tokens are h*W + w; both supported layouts have stride(H) == W * stride(W) when W > 1
    return t.stride(2) if t.shape[3] == 1 else t.stride(3)


def _check(op, x, qkv_weight, qk_dim, tensors=()):
    check_dtype(op, "x", x)
    for name, t in tensors:
        check_dtype(op, name, t)
    if x.dim() != 4 or qkv_weight.dim() != 4:
        raise ValueError(f"{op} (triton): 'x' and 'qkv_weight' must be 4-D, got {tuple(x.shape)}, {tuple(qkv_weight.shape)}")
    p = qkv_weight.shape[1]
    if not isinstance(qk_dim, int) or qk_dim < 1 or qkv_weight.shape[0] != 2 * qk_dim + p:
        raise ValueError(f"{op} (triton): 'qkv_weight' {tuple(qkv_weight.shape)} must be (2*qk_dim + P, P, 1, 1) "
                         f"with qk_dim={qk_dim!r}")
    if p > SHSA_MAX_P or p > x.shape[1]:
        raise ValueError(f"{op} (triton): partial dim P={p} must be <= {SHSA_MAX_P} and <= the channels of 'x' ({x.shape[1]})")
    if qk_dim > SHSA_MAX_QK_DIM:
        raise ValueError(f"{op} (triton): 'qk_dim'={qk_dim} exceeds {SHSA_MAX_QK_DIM}")


class _Dims:
    def __init__(self, x, qkv_weight, qk_dim):
        self.b, self.c, h, w = x.shape
        self.n = h * w
        self.p = qkv_weight.shape[1]
        self.q = qk_dim
        self.r = 2 * qk_dim + self.p
        self.pp, self.qp = pow2(self.p), pow2(qk_dim)
        # one block (the whole image) up to 128 tokens, else 64-token blocks with the online softmax; at PP=128
        # 32-token blocks: the (PP x block) fp32 tiles of x, v and the accumulator next to the (PP x PP) weight
        # tile otherwise exceed 255 registers per thread (the sm_90 compile spilled 37 KB per thread at 64)
        big = self.pp >= 128
        # fp32 at PP=128: 16-token blocks (32 spilled 14-17 KB per thread in the projection and forward kernels)
        wide = 16 if big and x.element_size() == 4 else (32 if big else 64)
        self.blk = pow2(self.n) if self.n <= (wide if big else 128) else wide
        self.nblk = triton.cdiv(self.n, self.blk)
        # the backward's attention passes hold more fp32 tiles (q, k, v, g, p, dq or dk/dv) than the forward:
        # at most 32 tokens (16 at PP=128) per block (64 spilled ~1 KB per thread at PP=64)
        self.bwd_blk = min(self.blk, 16 if big else 32)
        self.bwd_nblk = triton.cdiv(self.n, self.bwd_blk)
        # 8 warps once a (PP x PP) weight tile or a (PP x block) tile would crowd 4 warps' registers (spills)
        self.warps = 4 if max(self.blk, self.pp) * self.pp < 64 * 64 else 8  # PP=64 x 64 tokens spilled 44 KB at 4
        # the input-gradient pass holds three fp32 (rows x PP) weight-gradient accumulators plus the W groups:
        # shorter token blocks and no pipelining keep its staged tiles within shared memory and registers
        self.in_blk = min(self.blk, 16) if self.pp >= 128 else min(self.blk, 32)
        self.in_stages = 1 if self.pp >= 128 else 2
        # ... and at PP=128 its (PP x PP) fp32 accumulator alone is 64 registers per thread at 8 warps: 16 warps
        self.in_warps = 16 if self.pp >= 128 else self.warps
        # tf32x3 in that pass needs sm_90's resources: on sm_80 (164 KB per block) it needed 198,656 bytes of shared
        # memory at PP=128 and spilled 18 KB per thread at PP=64; there it takes exact fp32 products instead
        self.in_tc = shared_memory_limit(x.device) >= 200 * 1024
        self.sm_scale = qk_dim ** -0.5


def _xs(t):
    return (t.stride(0), t.stride(1), _token_stride(t))


def _attention_forward(x, qkv_weight, cs, csh, gw, gb, d, gn_eps):
    out = empty_like_format(x.shape, x.dtype, x)
    w2 = qkv_weight.reshape(d.r, d.p).to(x.dtype).contiguous()
    _shsa_fwd_kernel[(d.b, d.nblk)](
        x, w2, cs, csh, gw if gw is not None else csh, gb if gb is not None else csh, out,
        d.c, d.p, d.n, d.q, *_xs(x), *_xs(out), float(gn_eps), d.sm_scale * LOG2E,
        AFFINE=gw is not None, QP=d.qp, PP=d.pp, BQ=d.blk, BK=d.blk, BC=32, num_warps=d.warps)
    return out


def shsa_fused(x, qkv_weight, qkv_bias, qk_dim, gn_eps):
    _check("shsa_fused", x, qkv_weight, qk_dim, (("qkv_weight", qkv_weight), ("qkv_bias", qkv_bias)))
    x = as_nchw_or_cl(x)
    d = _Dims(x, qkv_weight, qk_dim)
    # no scale (None) and the bias in its own dtype: nothing is allocated, filled or cast per call
    return _attention_forward(x, qkv_weight, None, qkv_bias.contiguous(), None, None, d, gn_eps)


def shsa_train(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps):
    _check("shsa_train", x, qkv_weight, qk_dim, (("gn_weight", gn_weight), ("gn_bias", gn_bias),
                                                 ("bn_weight", bn_weight), ("bn_bias", bn_bias)))
    x = as_nchw_or_cl(x)
    d = _Dims(x, qkv_weight, qk_dim)
    w2 = qkv_weight.reshape(d.r, d.p).to(x.dtype).contiguous()
    gw, gb = gn_weight.contiguous(), gn_bias.contiguous()
    ps = torch.empty((d.b * d.nblk, d.r), dtype=torch.float32, device=x.device)
    pm = torch.empty_like(ps)
    _shsa_proj_kernel[(d.b, d.nblk)](
        x, w2, gw, gb, ps, ps, ps, ps, pm, d.p, d.n, d.q, d.r, *_xs(x), float(gn_eps),
        AFFINE=True, STORE=False, QP=d.qp, PP=d.pp, BN=d.blk, TC=False, num_warps=d.warps)
    counts = torch.full((d.nblk,), float(d.blk), dtype=torch.float32, device=x.device)
    counts[-1] = d.n - d.blk * (d.nblk - 1)
    mean, var = chan_combine(ps, pm, counts.repeat(d.b), d.b * d.n)
    cs = bn_weight.float() * torch.rsqrt(var + bn_eps)
    csh = bn_bias.float() - mean * cs
    out = _attention_forward(x, qkv_weight, cs.contiguous(), csh.contiguous(), gw, gb, d, gn_eps)
    return out, mean, var


def _backward(grad_out, x, qkv_weight, out, d, gn_eps, cs, csh, gw=None, gb=None, bn=None):
    """Shared backward; ``bn`` = (bn_weight, mean, var, bn_eps) for training. Returns the per-image partials
    summed over the batch: (grad_x, grad_W, sum of raw-qkv grads, grad_gn_w, grad_gn_b, grad_bn_w, grad_bn_b)."""
    dev, f32 = x.device, torch.float32
    train = bn is not None
    # The backward's GEMMs take exact fp32 intermediates (qkv, softmax gradients): rounded to fp16/bf16 they
    # missed the tolerance rule 3-8x (emulated tensor-core rounding on the CPU). For an fp16/bf16 op they run as
    # tf32x3 on tensor cores (about fp32's accuracy); for an fp32 op as exact fp32 products.
    tc = x.dtype != torch.float32
    w32 = qkv_weight.reshape(d.r, d.p).float().contiguous()
    pre = torch.empty((d.b, d.r, d.n), dtype=f32, device=dev)
    xn = torch.empty((d.b, d.p, d.n), dtype=f32, device=dev)
    rstd = torch.empty((d.b,), dtype=f32, device=dev)
    gwp = gw if train else cs
    gbp = gb if train else cs
    _shsa_proj_kernel[(d.b, d.bwd_nblk)](  # exact fp32 operands: the backward's (smaller) blocks
        x, w32, gwp, gbp, pre, xn, rstd, pre, pre, d.p, d.n, d.q, d.r, *_xs(x), float(gn_eps),
        AFFINE=train, STORE=True, QP=d.qp, PP=d.pp, BN=d.bwd_blk, TC=tc, num_warps=d.warps)
    gqkv = torch.empty_like(pre)
    lse = torch.empty((d.b, d.n), dtype=f32, device=dev)
    dd = torch.empty_like(lse)
    args = (pre, cs, csh, grad_out, out, gqkv, lse, dd, d.p, d.n, d.q, d.r, *_xs(grad_out), *_xs(out),
            d.sm_scale * LOG2E, d.sm_scale)
    meta = dict(QP=d.qp, PP=d.pp, BQ=d.bwd_blk, BK=d.bwd_blk, TC=tc, num_warps=d.warps)
    _shsa_bwd_q_kernel[(d.b, d.bwd_nblk)](*args, **meta)
    _shsa_bwd_kv_kernel[(d.b, d.bwd_nblk)](*args, **meta)
    s1 = s2 = None
    if train:
        bn_weight, mean, var, bn_eps = bn
        count = d.b * d.n
        invstd = torch.rsqrt(var.float() + bn_eps)
        r_hat = (pre - mean.float()[None, :, None]) * invstd[None, :, None]
        s1 = gqkv.sum(dim=(0, 2))
        s2 = (gqkv * r_hat).sum(dim=(0, 2))
        table = torch.stack([bn_weight.float() * invstd, s1 / count, s2 / count, mean.float(), invstd]).contiguous()
    else:
        table = cs
    grad_x = empty_like_format(x.shape, x.dtype, x)
    pw = torch.empty((d.b, d.r, d.p), dtype=f32, device=dev)
    pr = torch.empty((d.b, d.r), dtype=f32, device=dev)
    pgw = torch.empty((d.b, d.p), dtype=f32, device=dev)
    pgb = torch.empty_like(pgw)
    _shsa_bwd_in_kernel[(d.b,)](
        gqkv, pre, xn, rstd, w32, gwp, gbp, table, grad_out, out, grad_x, pw, pr, pgw, pgb,
        d.c, d.p, d.n, d.q, d.r, *_xs(grad_out), *_xs(out), *_xs(grad_x),
        TRAIN=train, QP=d.qp, PP=d.pp, BN=d.in_blk, BC=32, TC=tc and d.in_tc, num_warps=d.in_warps,
        num_stages=d.in_stages)
    return grad_x, pw.sum(0), pr.sum(0), pgw.sum(0), pgb.sum(0), s2, s1


def shsa_fused_backward(grad_out, x, qkv_weight, qkv_bias, out, qk_dim, gn_eps):
    _check("shsa_fused_backward", x, qkv_weight, qk_dim, (("grad_out", grad_out), ("qkv_bias", qkv_bias)))
    grad_out, x, out = as_nchw_or_cl(grad_out), as_nchw_or_cl(x), as_nchw_or_cl(out)
    d = _Dims(x, qkv_weight, qk_dim)
    cs = torch.ones(d.r, dtype=torch.float32, device=x.device)
    gx, gw, gb, *_ = _backward(grad_out, x, qkv_weight, out, d, gn_eps, cs, qkv_bias.float().contiguous())
    return gx, gw.reshape(qkv_weight.shape).to(qkv_weight.dtype), gb.to(qkv_bias.dtype)


def shsa_train_backward(grad_out, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, mean, var, out, qk_dim,
                        gn_eps, bn_eps):
    _check("shsa_train_backward", x, qkv_weight, qk_dim, (("grad_out", grad_out), ("gn_weight", gn_weight),
                                                          ("bn_weight", bn_weight)))
    grad_out, x, out = as_nchw_or_cl(grad_out), as_nchw_or_cl(x), as_nchw_or_cl(out)
    d = _Dims(x, qkv_weight, qk_dim)
    invstd = torch.rsqrt(var.float() + bn_eps)
    cs = (bn_weight.float() * invstd).contiguous()
    csh = (bn_bias.float() - mean.float() * cs).contiguous()
    gx, gw, _, g_gn_w, g_gn_b, g_bn_w, g_bn_b = _backward(
        grad_out, x, qkv_weight, out, d, gn_eps, cs, csh, gn_weight.contiguous(), gn_bias.contiguous(),
        (bn_weight, mean, var, bn_eps))
    return (gx, g_gn_w.to(gn_weight.dtype), g_gn_b.to(gn_bias.dtype),
            gw.reshape(qkv_weight.shape).to(qkv_weight.dtype), g_bn_w.to(bn_weight.dtype), g_bn_b.to(bn_bias.dtype))
