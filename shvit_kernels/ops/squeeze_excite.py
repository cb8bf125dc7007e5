"""Squeeze-excite family: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` with fc1 / fc2 1x1 convs (with bias) on the
pooled (N, C, 1, 1) map, as in SHViT's patch merging.

* ``shvit::squeeze_excite``: one op, so a kernel can pool, gate and scale each image while it is in cache.
  Weights keep the conv layout: w1 (C_r, C, 1, 1), b1 (C_r,), w2 (C, C_r, 1, 1), b2 (C,).
* ``shvit::squeeze_excite_backward``: its gradients (the reference on every backend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import (acc_dtype, check_bottleneck_args, define_op, grads_like_inputs_fake, like_x_fake,
                      register_inputs_autograd)


def squeeze_excite_reference(x, w1, b1, w2, b2):
    pooled = x.mean((2, 3), keepdim=True)
    gate = F.conv2d(torch.relu(F.conv2d(pooled, w1, b1)), w2, b2)
    return x * torch.sigmoid(gate)


def squeeze_excite_backward_reference(grad_out, x, w1, b1, w2, b2):
    acc = acc_dtype(x.dtype)
    xa, g = x.to(acc), grad_out.to(acc)
    n, c = x.shape[:2]
    m1, m2 = w1.to(acc).reshape(w1.shape[0], c), w2.to(acc).reshape(c, w1.shape[0])
    mean = xa.mean((2, 3))
    hidden = torch.relu(mean @ m1.t() + b1.to(acc))
    gate = torch.sigmoid(hidden @ m2.t() + b2.to(acc))
    grad_z = (g * xa).sum((2, 3)) * gate * (1 - gate)  # through the sigmoid
    grad_hidden = (grad_z @ m2) * (hidden > 0)
    grad_mean = grad_hidden @ m1
    grad_x = g * gate[:, :, None, None] + (grad_mean / (x.shape[2] * x.shape[3]))[:, :, None, None]
    return (
        grad_x.to(x.dtype),
        (grad_hidden.t() @ mean).reshape(w1.shape).to(w1.dtype),
        grad_hidden.sum(0).to(b1.dtype),
        (grad_z.t() @ hidden).reshape(w2.shape).to(w2.dtype),
        grad_z.sum(0).to(b2.dtype),
    )


squeeze_excite_op = define_op(
    "squeeze_excite",
    "(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor",
    squeeze_excite_reference,
    like_x_fake,
)
squeeze_excite_backward_op = define_op(
    "squeeze_excite_backward",
    "(Tensor grad_out, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    squeeze_excite_backward_reference,
    grads_like_inputs_fake,
)
register_inputs_autograd(squeeze_excite_op, squeeze_excite_backward_op)


def squeeze_excite(x, w1, b1, w2, b2) -> torch.Tensor:
    """``x * sigmoid(conv1x1(relu(conv1x1(mean_hw(x), w1, b1)), w2, b2))``: a squeeze-excite gate applied to x
    (biases None: zero)."""
    given = (x, w1, b1, w2, b2)
    result = _common.remembered_call(squeeze_excite_op, given)
    if result is not _common.MISS:
        return result
    op = "shvit_kernels.squeeze_excite"
    x, w1, w2 = _common.cast_for_autocast(x, w1, w2)
    check_bottleneck_args(op, x, w1, b1, w2, b2, hidden="C_r")
    b1 = b1.to(x.dtype) if b1 is not None else x.new_zeros(w1.shape[0])
    b2 = b2.to(x.dtype) if b2 is not None else x.new_zeros(w2.shape[0])
    return _common.call_op(squeeze_excite_op, x, w1, b1, w2, b2, given=given)
