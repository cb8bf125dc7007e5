"""Pooled-linear family: ``linear(mean_hw(x), weight, bias)``, global average pooling then a linear layer: the
classifier head of a fused model.

* ``shvit::pooled_linear``: one op, so a fused forward's head is one kernel (the pooling and the product without
  the Python and ATen calls between them) and a step of its replayed kernel chain. weight (K, C), bias (K,).
* ``shvit::pooled_linear_backward``: its gradients (the reference on every backend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import (acc_dtype, check_activation, check_tensor, define_op, grads_like_inputs_fake, memory_format_of,
                      register_inputs_autograd)


def pooled_linear_reference(x, weight, bias):
    return F.linear(x.mean((2, 3)), weight, bias)


def pooled_linear_backward_reference(grad_out, x, weight, bias):
    acc = acc_dtype(x.dtype)
    g = grad_out.to(acc)
    pooled = x.mean((2, 3)).to(acc)  # in x's dtype, as the forward made it
    n, c, h, w = x.shape
    grad_pooled = (g @ weight.to(acc)) / (h * w)
    grad_x = grad_pooled[:, :, None, None].expand(n, c, h, w).to(x.dtype).contiguous(memory_format=memory_format_of(x))
    return grad_x, (g.t() @ pooled).to(weight.dtype), g.sum(0).to(bias.dtype)


def _pooled_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


pooled_linear_op = define_op(
    "pooled_linear",
    "(Tensor x, Tensor weight, Tensor bias) -> Tensor",
    pooled_linear_reference,
    _pooled_linear_fake,
)
pooled_linear_backward_op = define_op(
    "pooled_linear_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor, Tensor)",
    pooled_linear_backward_reference,
    grads_like_inputs_fake,
)
register_inputs_autograd(pooled_linear_op, pooled_linear_backward_op)


def pooled_linear(x, weight, bias=None) -> torch.Tensor:
    """``linear(x.mean((2, 3)), weight, bias)``: x (N, C, H, W) averaged over H and W, then weight (K, C) and bias
    (K,) (None: zero); returns (N, K)."""
    given = (x, weight, bias)
    result = _common.remembered_call(pooled_linear_op, given)
    if result is not _common.MISS:
        return result
    op = "shvit_kernels.pooled_linear"
    x, weight = _common.cast_for_autocast(x, weight)
    check_activation(op, x)
    # No f-string of a size here: under tracing a size is a tensor or a symbol, and formatting it reads its value.
    check_tensor(op, "weight", weight, ndim=2, like=x, same_dtype=True, what="(K, C)")
    check_tensor(op, "weight", weight, shape=(None, x.shape[1]), what="(K, C) for x's C channels")
    if bias is None:
        bias = x.new_zeros(weight.shape[0])
    else:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), like=x)
        bias = bias.to(x.dtype)
    return _common.call_op(pooled_linear_op, x, weight, bias, given=given)
