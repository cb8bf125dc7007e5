"""FFN family: ``x + pw2(relu(pw1(x)))`` with pw1 = 1x1 Conv+BN C -> H and pw2 = 1x1 Conv+BN H -> C.

* ``shvit::ffn_fused`` (inference, BN folded): one op, so a kernel can keep the hidden activation on chip.
  Weights keep the conv layout: w1 (H, C, 1, 1), b1 (H,), w2 (C, H, 1, 1), b2 (C,).
* Training uses two ``conv_bn`` calls (pw1 with ReLU, pw2 with the residual), since the second BatchNorm
  needs batch statistics of the whole hidden activation before it can normalise.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import _common
from ..tracing import untraced_check
from ._common import (acc_dtype, check_activation, check_bottleneck_args, check_eps, check_tensor, conv_input_grad,
                      conv_weight_grad, define_op, grads_like_inputs_fake, like_x_fake, register_inputs_autograd)
from .conv_bn import conv_bn, fold_bn


def ffn_fused_reference(x, w1, b1, w2, b2):
    hidden = torch.relu(F.conv2d(x, w1, b1))
    return x + F.conv2d(hidden, w2, b2)


def ffn_fused_backward_reference(grad_out, x, w1, b1, w2, b2):
    acc = acc_dtype(x.dtype)
    xa, w1a, w2a, g = x.to(acc), w1.to(acc), w2.to(acc), grad_out.to(acc)
    hidden = torch.relu(F.conv2d(x, w1, b1)).to(acc)  # recomputed in x's dtype, as the forward made it
    grad_w2 = conv_weight_grad(hidden, w2.shape, g, 1, 0, 1)
    grad_hidden = conv_input_grad(hidden.shape, w2a, g, 1, 0, 1) * (hidden > 0)
    grad_w1 = conv_weight_grad(xa, w1.shape, grad_hidden, 1, 0, 1)
    grad_x = g + conv_input_grad(x.shape, w1a, grad_hidden, 1, 0, 1)
    return (
        grad_x.to(x.dtype),
        grad_w1.to(w1.dtype),
        grad_hidden.sum(dim=(0, 2, 3)).to(b1.dtype),
        grad_w2.to(w2.dtype),
        g.sum(dim=(0, 2, 3)).to(b2.dtype),
    )


ffn_fused_op = define_op(
    "ffn_fused",
    "(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor",
    ffn_fused_reference,
    like_x_fake,
)
ffn_fused_backward_op = define_op(
    "ffn_fused_backward",
    "(Tensor grad_out, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    ffn_fused_backward_reference,
    grads_like_inputs_fake,
)
register_inputs_autograd(ffn_fused_op, ffn_fused_backward_op)


def ffn_fused(x, w1, b1, w2, b2) -> torch.Tensor:
    """``x + conv1x1(relu(conv1x1(x, w1, b1)), w2, b2)`` (BN already folded into w/b)."""
    given = (x, w1, b1, w2, b2)
    result = _common.remembered_call(ffn_fused_op, given)
    if result is not _common.MISS:
        return result
    op = "shvit_kernels.ffn_fused"
    x, w1, w2 = _common.cast_for_autocast(x, w1, w2)
    check_bottleneck_args(op, x, w1, b1, w2, b2)
    b1 = b1.to(x.dtype) if b1 is not None else x.new_zeros(w1.shape[0])
    b2 = b2.to(x.dtype) if b2 is not None else x.new_zeros(w2.shape[0])
    return _common.call_op(ffn_fused_op, x, w1, b1, w2, b2, given=given)


@untraced_check
def _check_ffn_weights(op, x, w1, w2):
    """The two 1x1 weights chain x's C channels through H and back (checked here, before the Conv+BN ops, whose
    errors would name their own arguments: a wrong pw2 weight surfaced as a bad 'residual')."""
    check_activation(op, x)
    check_tensor(op, "pw1[0] (weight)", w1, ndim=4, like=x, what="(H, C, 1, 1)")
    check_tensor(op, "pw2[0] (weight)", w2, ndim=4, like=x, what="(C, H, 1, 1)")
    c, hidden = x.shape[1], w1.shape[0]
    if tuple(w1.shape[1:]) != (c, 1, 1):
        raise ValueError(f"{op}: 'pw1[0] (weight)' must have shape ({hidden}, {c}, 1, 1) for x's {c} channels, "
                         f"got {tuple(w1.shape)}")
    if tuple(w2.shape) != (c, hidden, 1, 1):
        raise ValueError(f"{op}: 'pw2[0] (weight)' must have shape ({c}, {hidden}, 1, 1), got {tuple(w2.shape)}")


def _check_ffn_bn_params(op, x, pw1, pw2):
    """Eval-mode FFN: each BN vector must match its conv's output channels before the folding broadcasts them."""
    for which, p in (("pw1", pw1), ("pw2", pw2)):
        for i, part in enumerate(("bn_weight", "bn_bias", "running_mean", "running_var"), start=1):
            if p[i] is None:
                raise ValueError(f"{op}: '{which}[{i}] ({part})' is required when training=False")
            check_tensor(op, f"{which}[{i}] ({part})", p[i], shape=(p[0].shape[0],), like=x)


def ffn(
    x: torch.Tensor,
    pw1: tuple,
    pw2: tuple,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> torch.Tensor:
    """``x + pw2(relu(pw1(x)))`` where pw1/pw2 are (weight, bn_weight, bn_bias, running_mean, running_var).

    In eval mode both BatchNorms are folded and the fused op runs; in training two Conv+BN ops run with batch
    statistics and update the running statistics (over every process of ``process_group`` when it is set).
    """
    op = "shvit_kernels.ffn"
    for name, p in (("pw1", pw1), ("pw2", pw2)):
        if not isinstance(p, (tuple, list)) or len(p) != 5:
            raise TypeError(f"{op}: '{name}' must be (weight, bn_weight, bn_bias, running_mean, running_var)")
    check_eps(op, "eps", eps)
    _check_ffn_weights(op, x, pw1[0], pw2[0])
    if training:
        bn_args = dict(training=True, momentum=momentum, eps=eps, process_group=process_group)
        hidden = conv_bn(x, *pw1, relu=True, **bn_args)
        return conv_bn(hidden, *pw2, residual=x, **bn_args)
    _check_ffn_bn_params(op, x, pw1, pw2)
    w1, b1 = fold_bn(pw1[0], pw1[1], pw1[2], pw1[3], pw1[4], eps)
    w2, b2 = fold_bn(pw2[0], pw2[1], pw2[2], pw2[3], pw2[4], eps)
    return ffn_fused(x, w1, b1, w2, b2)
