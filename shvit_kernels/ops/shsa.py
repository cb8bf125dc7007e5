"""SHSA family: single-head self-attention on the first P channels (SHViT's mixer, before its projection).

With ``xa = x[:, :P]`` flattened to (B, P, N) and Q the query/key dim (16 in SHViT), both ops return

    relu(cat([v @ softmax(scale * q^T k)^T, x[:, P:]], dim=1))        (B, C, H, W), scale = Q ** -0.5

so the projection's ReLU is applied here and the projection is an ordinary ``conv_bn`` with the residual.

* ``shvit::shsa_fused`` (inference): GroupNorm(1 group) and the qkv Conv+BN are folded into one affine map,
  ``qkv = (W' xa - mu * rowsum(W')) / sigma + b'`` with ``W' = W diag(gn_weight) * bn_scale`` and mu, sigma the
  per-image mean and std of ``xa`` over (P, N). Arguments: qkv_weight (2Q+P, P, 1, 1), qkv_bias (2Q+P,).
* ``shvit::shsa_train``: GroupNorm, then the qkv conv with BatchNorm batch statistics over (B, N), returning
  the fp32 batch (mean, biased var) of the raw qkv for the running-statistics update.

Statistics and the softmax are computed in fp32 whatever the input dtype, so fp16/bf16 inputs of magnitude
1e4 stay finite.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common
from ..tracing import untraced_check
from ._common import acc_dtype, upcast, batch_norm_backward, check_activation, check_eps, check_param_dtype, check_tensor, define_op, new_output, register_autograd
from .conv_bn import conv_bn, fold_bn

QK_DIM = 16


def group_norm_1(xa: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm with one group and no affine, statistics in fp32: xa (B, P, N) -> same dtype."""
    xf = upcast(xa)
    mean = xf.mean(dim=(1, 2), keepdim=True)
    var = (xf - mean).square().mean(dim=(1, 2), keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(xa.dtype)


def attend(qkv: torch.Tensor, x: torch.Tensor, qk_dim: int) -> torch.Tensor:
    """From qkv (B, 2Q+P, N) and x (B, C, H, W): relu(cat([v softmax(scale q^T k)^T, x[:, P:]]))."""
    b, c, h, w = x.shape
    p = qkv.shape[1] - 2 * qk_dim
    q, k, v = qkv.split([qk_dim, qk_dim, p], dim=1)
    scores = (q.transpose(1, 2) @ k) * (qk_dim ** -0.5)  # (B, N_query, N_key)
    attn = torch.softmax(upcast(scores), dim=-1).to(qkv.dtype)
    ya = (v @ attn.transpose(1, 2)).reshape(b, p, h, w)
    return torch.relu(torch.cat([ya, x[:, p:]], dim=1))


def shsa_fused_reference(x, qkv_weight, qkv_bias, qk_dim, gn_eps):
    b, c, h, w = x.shape
    p = qkv_weight.shape[1]
    xn = group_norm_1(x[:, :p].reshape(b, p, h * w), gn_eps)
    qkv = qkv_weight.reshape(qkv_weight.shape[0], p) @ xn + qkv_bias.to(x.dtype)[None, :, None]
    return attend(qkv, x, qk_dim)


def group_norm_affine(x, p, gn_weight, gn_bias, gn_eps):
    """GroupNorm(1) with its affine on the first ``p`` channels of x (B, C, H, W): returns (B, P, N), x's dtype."""
    b, c, h, w = x.shape
    xn = group_norm_1(x[:, :p].reshape(b, p, h * w), gn_eps)
    return (upcast(xn) * upcast(gn_weight)[None, :, None] + upcast(gn_bias)[None, :, None]).to(x.dtype)


def shsa_train_reference(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps):
    p = qkv_weight.shape[1]
    xn = group_norm_affine(x, p, gn_weight, gn_bias, gn_eps)
    raw = qkv_weight.reshape(qkv_weight.shape[0], p) @ xn  # (B, 2Q+P, N)
    rf = upcast(raw)
    mean = rf.mean(dim=(0, 2))
    var = rf.var(dim=(0, 2), unbiased=False)
    scale = upcast(bn_weight) * torch.rsqrt(var + bn_eps)
    qkv = (rf * scale[None, :, None] + (upcast(bn_bias) - mean * scale)[None, :, None]).to(x.dtype)
    return attend(qkv, x, qk_dim), mean.detach(), var.detach()


def _group_norm_1_parts(xa: torch.Tensor, eps: float):
    """(normalised xa, rstd) in xa's dtype, for the backwards."""
    mean = xa.mean(dim=(1, 2), keepdim=True)
    var = (xa - mean).square().mean(dim=(1, 2), keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (xa - mean) * rstd, rstd


def _group_norm_1_backward(grad_xn, xn, rstd):
    return rstd * (grad_xn - grad_xn.mean(dim=(1, 2), keepdim=True) - xn * (grad_xn * xn).mean(dim=(1, 2), keepdim=True))


def _attend_backward(grad_out, out, qkv, qk_dim):
    """Gradient of ``attend`` w.r.t. qkv and the pass-through channels, from the recomputed qkv."""
    p = qkv.shape[1] - 2 * qk_dim
    g = grad_out * (out > 0)
    b, c, h, w = g.shape
    g = g.to(qkv.dtype)
    g_ya = g[:, :p].reshape(b, p, h * w)
    q, k, v = qkv.split([qk_dim, qk_dim, p], dim=1)
    scale = qk_dim ** -0.5
    attn = torch.softmax((q.transpose(1, 2) @ k) * scale, dim=-1)  # (B, Nq, Nk)
    g_v = g_ya @ attn
    g_attn = g_ya.transpose(1, 2) @ v
    g_scores = attn * (g_attn - (g_attn * attn).sum(dim=-1, keepdim=True))
    g_q = scale * (k @ g_scores.transpose(1, 2))
    g_k = scale * (q @ g_scores)
    return torch.cat([g_q, g_k, g_v], dim=1), g[:, p:]


def shsa_fused_backward_reference(grad_out, x, qkv_weight, qkv_bias, out, qk_dim, gn_eps):
    acc = acc_dtype(x.dtype)
    b, c, h, w = x.shape
    p = qkv_weight.shape[1]
    w2 = qkv_weight.reshape(-1, p).to(acc)
    xn, rstd = _group_norm_1_parts(x[:, :p].reshape(b, p, h * w).to(acc), gn_eps)
    qkv = w2 @ xn + qkv_bias.to(acc)[None, :, None]
    g_qkv, g_rest = _attend_backward(grad_out, out, qkv, qk_dim)
    grad_w = (g_qkv @ xn.transpose(1, 2)).sum(0)
    grad_xa = _group_norm_1_backward(w2.t() @ g_qkv, xn, rstd).reshape(b, p, h, w)
    return (
        torch.cat([grad_xa, g_rest], dim=1).to(x.dtype),
        grad_w.reshape(qkv_weight.shape).to(qkv_weight.dtype),
        g_qkv.sum(dim=(0, 2)).to(qkv_bias.dtype),
    )


def shsa_train_backward_reference(
    grad_out, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, mean, var, out, qk_dim, gn_eps, bn_eps
):
    acc = acc_dtype(x.dtype)
    b, c, h, w = x.shape
    p = qkv_weight.shape[1]
    w2 = qkv_weight.reshape(-1, p).to(acc)
    xn, rstd = _group_norm_1_parts(x[:, :p].reshape(b, p, h * w).to(acc), gn_eps)
    xg = xn * gn_weight.to(acc)[None, :, None] + gn_bias.to(acc)[None, :, None]
    invstd = torch.rsqrt(var.to(acc) + bn_eps)
    r_hat = (w2 @ xg - mean.to(acc)[None, :, None]) * invstd[None, :, None]
    qkv = r_hat * bn_weight.to(acc)[None, :, None] + bn_bias.to(acc)[None, :, None]
    g_qkv, g_rest = _attend_backward(grad_out, out, qkv, qk_dim)
    g_raw, g_bn_w, g_bn_b = batch_norm_backward(g_qkv, r_hat, bn_weight.to(acc), invstd, (0, 2))
    grad_w = (g_raw @ xg.transpose(1, 2)).sum(0)
    g_xg = w2.t() @ g_raw
    g_gn_w = (g_xg * xn).sum(dim=(0, 2))
    g_gn_b = g_xg.sum(dim=(0, 2))
    grad_xa = _group_norm_1_backward(g_xg * gn_weight.to(acc)[None, :, None], xn, rstd).reshape(b, p, h, w)
    return (
        torch.cat([grad_xa, g_rest], dim=1).to(x.dtype),
        g_gn_w.to(gn_weight.dtype),
        g_gn_b.to(gn_bias.dtype),
        grad_w.reshape(qkv_weight.shape).to(qkv_weight.dtype),
        g_bn_w.to(bn_weight.dtype),
        g_bn_b.to(bn_bias.dtype),
    )


def _shsa_fused_fake(x, qkv_weight, qkv_bias, qk_dim, gn_eps):
    return new_output(x.shape, x.dtype, (x,), x.device)


def _shsa_fused_backward_fake(grad_out, x, qkv_weight, qkv_bias, out, qk_dim, gn_eps):
    return (
        new_output(x.shape, x.dtype, (grad_out, x), x.device),
        torch.empty_like(qkv_weight, memory_format=torch.contiguous_format),
        torch.empty_like(qkv_bias),
    )


def _shsa_train_fake(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps):
    n = qkv_weight.shape[0]
    stats = x.new_empty((n,), dtype=acc_dtype(x.dtype))
    return new_output(x.shape, x.dtype, (x,), x.device), stats, torch.empty_like(stats)


def _shsa_train_backward_fake(
    grad_out, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, mean, var, out, qk_dim, gn_eps, bn_eps
):
    return (new_output(x.shape, x.dtype, (grad_out, x), x.device),) + tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias)
    )


shsa_fused_op = define_op(
    "shsa_fused",
    "(Tensor x, Tensor qkv_weight, Tensor qkv_bias, int qk_dim, float gn_eps) -> Tensor",
    shsa_fused_reference,
    _shsa_fused_fake,
)
shsa_fused_backward_op = define_op(
    "shsa_fused_backward",
    "(Tensor grad_out, Tensor x, Tensor qkv_weight, Tensor qkv_bias, Tensor out, int qk_dim, float gn_eps) "
    "-> (Tensor, Tensor, Tensor)",
    shsa_fused_backward_reference,
    _shsa_fused_backward_fake,
)
shsa_train_op = define_op(
    "shsa_train",
    "(Tensor x, Tensor gn_weight, Tensor gn_bias, Tensor qkv_weight, Tensor bn_weight, Tensor bn_bias, int qk_dim, "
    "float gn_eps, float bn_eps) -> (Tensor, Tensor, Tensor)",
    shsa_train_reference,
    _shsa_train_fake,
)
shsa_train_backward_op = define_op(
    "shsa_train_backward",
    "(Tensor grad_out, Tensor x, Tensor gn_weight, Tensor gn_bias, Tensor qkv_weight, Tensor bn_weight, "
    "Tensor bn_bias, Tensor mean, Tensor var, Tensor out, int qk_dim, float gn_eps, float bn_eps) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    shsa_train_backward_reference,
    _shsa_train_backward_fake,
)


def _shsa_fused_setup(ctx, inputs, output):
    x, w, b, qk_dim, gn_eps = inputs
    ctx.save_for_backward(x, w, b, output)
    ctx.attrs = (qk_dim, gn_eps)


def _shsa_fused_backward(ctx, grad_out):
    x, w, b, out = ctx.saved_tensors
    gx, gw, gb = _common.call_backward_op(shsa_fused_backward_op, grad_out, x, w, b, out, *ctx.attrs)
    return gx, gw, gb, None, None


def _shsa_train_setup(ctx, inputs, output):
    x, gn_w, gn_b, w, bn_w, bn_b, qk_dim, gn_eps, bn_eps = inputs
    out, mean, var = output
    ctx.save_for_backward(x, gn_w, gn_b, w, bn_w, bn_b, mean, var, out)
    ctx.attrs = (qk_dim, gn_eps, bn_eps)
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _shsa_train_backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # no gradient reached out (gradcheck's undefined-gradient check)
        return (None,) * 9
    grads = _common.call_backward_op(shsa_train_backward_op, grad_out, *ctx.saved_tensors, *ctx.attrs)
    return (*grads, None, None, None)


register_autograd(shsa_fused_op, _shsa_fused_backward, _shsa_fused_setup)
register_autograd(shsa_train_op, _shsa_train_backward, _shsa_train_setup)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------


@untraced_check
def check_shsa_args(op, x, qkv_weight, qk_dim):
    check_activation(op, x)
    check_tensor(op, "qkv_weight", qkv_weight, ndim=4, like=x, same_dtype=True, what="(2*qk_dim + P, P, 1, 1)")
    if not isinstance(qk_dim, int) or qk_dim < 1:
        raise ValueError(f"{op}: 'qk_dim' must be a positive int, got {qk_dim!r}")
    p = qkv_weight.shape[1]
    c = x.shape[1]
    if p > c:
        raise ValueError(f"{op}: partial dim P={p} (qkv_weight.shape[1]) exceeds the channels of 'x' ({c})")
    check_tensor(op, "qkv_weight", qkv_weight, shape=(2 * qk_dim + p, p, 1, 1), what=f"= (2*qk_dim + P, P, 1, 1) with qk_dim={qk_dim}, P={p}")
    return p


def fold_shsa(gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, running_mean, running_var, bn_eps):
    """Fold GroupNorm's affine and the eval-mode qkv BatchNorm into (W', b') for ``shsa_fused``. Differentiable."""
    w, b = fold_bn(qkv_weight, bn_weight, bn_bias, running_mean, running_var, bn_eps)
    w2 = upcast(w.reshape(w.shape[0], w.shape[1]))
    b_folded = upcast(b) + w2 @ upcast(gn_bias)
    w_folded = (w2 * upcast(gn_weight)[None, :]).to(qkv_weight.dtype).reshape(qkv_weight.shape)
    return w_folded, b_folded.to(qkv_weight.dtype)


def shsa_fused(x, qkv_weight, qkv_bias, *, qk_dim: int = QK_DIM, gn_eps: float = 1e-5) -> torch.Tensor:
    """Inference SHSA with GroupNorm and BN folded into (qkv_weight, qkv_bias); see the module docstring."""
    given = (x, qkv_weight, qkv_bias, qk_dim, gn_eps)
    result = _common.remembered_call(shsa_fused_op, given)
    if result is not _common.MISS:
        return result
    op = "shvit_kernels.shsa_fused"
    x, qkv_weight = _common.cast_for_autocast(x, qkv_weight)
    p = check_shsa_args(op, x, qkv_weight, qk_dim)
    check_tensor(op, "qkv_bias", qkv_bias, shape=(2 * qk_dim + p,), like=x)
    check_eps(op, "gn_eps", gn_eps)
    return _common.call_op(shsa_fused_op, x, qkv_weight, qkv_bias.to(x.dtype), qk_dim, float(gn_eps), given=given)


def shsa(
    x: torch.Tensor,
    gn_weight: torch.Tensor,
    gn_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    qk_dim: int = QK_DIM,
    training: bool = False,
    momentum: float = 0.1,
    gn_eps: float = 1e-5,
    bn_eps: float = 1e-5,
    process_group=None,
) -> torch.Tensor:
    """SHSA mixer up to (and including) the projection's ReLU, from the unfused parameters.

    ``training=True`` uses batch statistics for the qkv BatchNorm and updates its running statistics.
    With ``process_group`` (training only) those statistics cover every process of the group: GroupNorm,
    a synchronised ``conv_bn`` for qkv and :func:`attend` then run as separate steps instead of ``shsa_train``.
    """
    op = "shvit_kernels.shsa"
    x, qkv_weight = _common.cast_for_autocast(x, qkv_weight)
    p = check_shsa_args(op, x, qkv_weight, qk_dim)
    n_qkv = 2 * qk_dim + p
    for name, t, n in (("gn_weight", gn_weight, p), ("gn_bias", gn_bias, p), ("bn_weight", bn_weight, n_qkv), ("bn_bias", bn_bias, n_qkv)):
        check_tensor(op, name, t, shape=(n,), like=x)
        check_param_dtype(op, name, t, x)
    check_eps(op, "gn_eps", gn_eps)
    check_eps(op, "bn_eps", bn_eps)
    # Checked in training too, before anything runs: a failed call must leave the running statistics as they were.
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None and not training:
            raise ValueError(f"{op}: '{name}' is required when training=False")
        if t is not None:
            check_tensor(op, name, t, shape=(n_qkv,), like=x)
    if not training:
        w, b = fold_shsa(gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, running_mean, running_var, bn_eps)
        return _common.call_op(shsa_fused_op, x, w, b, qk_dim, float(gn_eps))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if count < 2:
        raise ValueError(f"{op}: training BatchNorm needs more than one value per channel, got input shape {tuple(x.shape)}")
    gn_bias = gn_bias.to(gn_weight.dtype)
    bn_bias = bn_bias.to(bn_weight.dtype)
    if process_group is not None:
        b, c, h, w = x.shape
        xn = group_norm_affine(x, p, gn_weight, gn_bias, gn_eps).reshape(b, p, h, w)
        qkv = conv_bn(
            xn, qkv_weight, bn_weight, bn_bias, running_mean, running_var,
            training=True, momentum=momentum, eps=bn_eps, process_group=process_group,
        )
        return attend(qkv.reshape(b, n_qkv, h * w), x, qk_dim)
    out, mean, var = _common.call_op(
        shsa_train_op, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, float(gn_eps), float(bn_eps)
    )
    _common.bn_update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out
