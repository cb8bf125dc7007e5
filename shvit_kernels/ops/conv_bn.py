"""Conv + BatchNorm family: every convolution SHViT has (3x3 dense stride 2 stem, 3x3 depthwise stride 1/2, 1x1).

Two custom ops carry the work, each with a backward that is itself a custom op:

* ``shvit::conv_bias_act``  inference form, BN folded into (weight, bias):
  ``out = act(conv2d(x, weight, bias, stride, padding, groups) + residual)``
* ``shvit::conv_bn_train``  training form with batch statistics over (N, H, W), returned as fp32
  (mean, biased var) so the caller can update running statistics:
  ``out = act(bn_weight * (y - mean) / sqrt(var + eps) + bn_bias + residual)``, ``y = conv2d(x, weight)``;
  its backward recomputes ``y`` unless the forward was asked to keep it (``keep_conv_output``: more memory, no
  second convolution; :func:`keep_conv_outputs` sets which convs do)

The residual is added before the (optional) ReLU, as in ResNet blocks, so the ReLU mask is ``out > 0``.
SHViT itself never uses both at once. Eval-mode Conv+BN folds the running statistics on the fly (a few
differentiable elementwise ops on the weights) and calls the inference op.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Iterator, Optional

import torch

from .. import dispatch
from . import _common, _recompute
from ..tracing import untraced_check
from ._common import (
    acc_dtype,
    upcast,
    batch_norm_backward,
    check_activation,
    check_eps,
    check_param_dtype,
    check_tensor,
    conv_input_grad,
    conv2d,
    conv_weight_grad,
    define_op,
    register_autograd,
    new_output,
)
from .sync_batch_norm import sync_batch_norm

# ---------------------------------------------------------------------------------------------------------
# Reference kernels (the spec)
# ---------------------------------------------------------------------------------------------------------


def conv_bias_act_reference(x, weight, bias, stride, padding, groups, relu, residual):
    # In place on the fresh conv output: a new buffer per epilogue costs page faults on large stem maps.
    out = conv2d(x, weight, bias, stride, padding, groups)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def _normalise_reference(yf, bn_weight, bn_bias, mean, var, eps, dtype):
    scale = upcast(bn_weight) * torch.rsqrt(var + eps)
    shift = upcast(bn_bias) - mean * scale
    return (yf * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)


def batch_norm_train_reference(y, bn_weight, bn_bias, eps):
    """Batch-statistics BN in fp32 on top of a conv output in any dtype; returns (out, mean, var)."""
    yf = upcast(y)
    mean = yf.mean(dim=(0, 2, 3))
    var = yf.var(dim=(0, 2, 3), unbiased=False)
    return _normalise_reference(yf, bn_weight, bn_bias, mean, var, eps, y.dtype), mean, var


def conv_bn_train_output_reference(conv_output, bn_weight, bn_bias, mean, var, eps, relu, residual):
    # The forward's output from its conv output, statistics and residual, as the forward computed it.
    out = _normalise_reference(upcast(conv_output), bn_weight, bn_bias, mean, var, eps, conv_output.dtype)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def conv_bn_train_reference(x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual,
                            keep_conv_output=False):
    y = conv2d(x, weight, None, stride, padding, groups)
    out, mean, var = batch_norm_train_reference(y, bn_weight, bn_bias, eps)
    if residual is not None:
        out += residual
    if relu:
        out.relu_()
    # The conv output for the backward, or an empty tensor: the backward then recomputes it.
    return out, mean.detach(), var.detach(), y if keep_conv_output else y.new_empty((0,))


def conv_bias_act_backward_reference(grad_out, x, weight, bias, stride, padding, groups, relu, residual, out):
    acc = acc_dtype(x.dtype)
    g = (grad_out * (out > 0)) if relu else grad_out.clone()
    ga = g.to(acc)
    grad_x = conv_input_grad(x.shape, weight.to(acc), ga, stride, padding, groups)
    grad_w = conv_weight_grad(x.to(acc), weight.shape, ga, stride, padding, groups)
    grad_b = ga.sum(dim=(0, 2, 3))
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b.to(bias.dtype if bias is not None else weight.dtype), g


def conv_bn_train_backward_reference(
    grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding, groups, eps, relu, has_residual,
    input_grad=True, conv_output=None,
):
    # The conv output is the forward's kept one (conv_output) or recomputed; the residual is additive, so it only
    # shapes the ReLU mask, which ``out`` already holds. mean and var are the forward's statistics of that output; a
    # kernel may recompute them from it more precisely (the gradient is the forward's derivative: BatchNorm over a
    # few values per channel cancels to eps-sized terms that fp32 statistics' rounding would swamp).
    # Gradients nobody asked for come back empty (shape (0,)), not computed: the input gradient without input_grad
    # (x needs no gradient, as a network's first conv), the masked gradient g (the residual's) without has_residual.
    # Zeros of x's shape cost a fill and a conversion (1.4 ms of S1's stem backward in bf16 on two threads).
    acc = acc_dtype(x.dtype)
    g = (grad_out * (out > 0)) if relu else grad_out.clone()
    y = conv_output if conv_output is not None else conv2d(x, weight, None, stride, padding, groups)
    y = y.to(acc)
    invstd = torch.rsqrt(var.to(acc) + eps)
    x_hat = (y - mean.to(acc)[None, :, None, None]) * invstd[None, :, None, None]
    grad_y, grad_gamma, grad_beta = batch_norm_backward(g.to(acc), x_hat, bn_weight.to(acc), invstd, (0, 2, 3))
    if input_grad:
        grad_x = conv_input_grad(x.shape, weight.to(acc), grad_y, stride, padding, groups)
    else:
        grad_x = x.new_empty((0,))
    grad_w = conv_weight_grad(x.to(acc), weight.shape, grad_y, stride, padding, groups)
    return (
        grad_x.to(x.dtype),
        grad_w.to(weight.dtype),
        grad_gamma.to(bn_weight.dtype),
        grad_beta.to(bn_bias.dtype),
        g if has_residual else g.new_empty((0,)),
    )


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------


def conv_output_shape(x, weight, stride, padding):
    n, _, h, w = x.shape
    k_h, k_w = weight.shape[-2:]
    return (n, weight.shape[0], (h + 2 * padding - k_h) // stride + 1, (w + 2 * padding - k_w) // stride + 1)


def _conv_bias_act_fake(x, weight, bias, stride, padding, groups, relu, residual):
    return new_output(conv_output_shape(x, weight, stride, padding), x.dtype, (x, residual) if residual is not None else (x,), x.device)


def _conv_bias_act_backward_fake(grad_out, x, weight, bias, stride, padding, groups, relu, residual, out):
    args = (grad_out, x, weight)
    return (
        new_output(x.shape, x.dtype, args, x.device),
        new_output(weight.shape, weight.dtype, args, x.device),
        x.new_empty((weight.shape[0],), dtype=bias.dtype if bias is not None else weight.dtype),
        new_output(grad_out.shape, grad_out.dtype, args, x.device),
    )


def _conv_bn_train_fake(x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual,
                        keep_conv_output=False):
    shape = conv_output_shape(x, weight, stride, padding)
    c = weight.shape[0]
    out = new_output(shape, x.dtype, (x, residual) if residual is not None else (x,), x.device)
    y = new_output(shape, x.dtype, (x,), x.device) if keep_conv_output else x.new_empty((0,))
    return out, x.new_empty((c,), dtype=acc_dtype(x.dtype)), x.new_empty((c,), dtype=acc_dtype(x.dtype)), y


def _conv_bn_train_backward_fake(
    grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding, groups, eps, relu, has_residual,
    input_grad=True, conv_output=None,
):
    args = (grad_out, x, weight)
    return (
        new_output(x.shape, x.dtype, args, x.device) if input_grad else x.new_empty((0,)),
        new_output(weight.shape, weight.dtype, args, x.device),
        torch.empty_like(bn_weight, memory_format=torch.contiguous_format),
        torch.empty_like(bn_bias, memory_format=torch.contiguous_format),
        new_output(grad_out.shape, grad_out.dtype, args, x.device) if has_residual else grad_out.new_empty((0,)),
    )


def _conv_bn_train_output_fake(conv_output, bn_weight, bn_bias, mean, var, eps, relu, residual):
    return new_output(conv_output.shape, conv_output.dtype, (conv_output,), conv_output.device)


conv_bias_act_op = define_op(
    "conv_bias_act",
    "(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int groups, bool relu, Tensor? residual) -> Tensor",
    conv_bias_act_reference,
    _conv_bias_act_fake,
)
conv_bias_act_backward_op = define_op(
    "conv_bias_act_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int stride, int padding, int groups, bool relu, "
    "Tensor? residual, Tensor out) -> (Tensor, Tensor, Tensor, Tensor)",
    conv_bias_act_backward_reference,
    _conv_bias_act_backward_fake,
)
conv_bn_train_op = define_op(
    "conv_bn_train",
    "(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, int stride, int padding, int groups, float eps, "
    "bool relu, Tensor? residual, bool keep_conv_output=False) -> (Tensor, Tensor, Tensor, Tensor)",
    conv_bn_train_reference,
    _conv_bn_train_fake,
)
conv_bn_train_backward_op = define_op(
    "conv_bn_train_backward",
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
    "Tensor out, int stride, int padding, int groups, float eps, bool relu, bool has_residual, "
    "bool input_grad=True, Tensor? conv_output=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    conv_bn_train_backward_reference,
    _conv_bn_train_backward_fake,
)


# For the backward of a training Conv+BN that kept its conv output (see _recompute.recompute_cheap_tensors).
conv_bn_train_output_op = define_op(
    "conv_bn_train_output",
    "(Tensor conv_output, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, float eps, bool relu, "
    "Tensor? residual) -> Tensor",
    conv_bn_train_output_reference,
    _conv_bn_train_output_fake,
)


def _conv_bias_act_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, groups, relu, residual = inputs
    ctx.save_for_backward(x, weight, bias, residual, output)
    ctx.conv = (stride, padding, groups, relu)


def _conv_bias_act_backward(ctx, grad_out):
    x, weight, bias, residual, out = ctx.saved_tensors
    stride, padding, groups, relu = ctx.conv
    gx, gw, gb, gr = _common.call_backward_op(
        conv_bias_act_backward_op, grad_out, x, weight, bias, stride, padding, groups, relu, residual, out
    )
    return gx, gw, (gb if bias is not None else None), None, None, None, None, (gr if residual is not None else None)


def _conv_bn_train_setup(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual, keep_conv_output = inputs
    out, mean, var, y = output
    if keep_conv_output and _offer_output(out, y, bn_weight, bn_bias, mean, var, eps, relu, residual):
        if not relu:  # out only gives the backward its ReLU mask: the kept y (same shape and dtype) stands in
            out = y
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var, out, y if keep_conv_output else None)
    ctx.conv = (stride, padding, groups, eps, relu, residual is not None)
    ctx.mark_non_differentiable(mean, var, y)
    # No zero-filled gradients for the statistics and the kept conv output (that one is activation-sized: filling
    # it was 9 ms of S1's 230 ms training step with every output kept).
    ctx.set_materialize_grads(False)


def _conv_bn_train_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_y):
    if grad_out is None:  # no gradient reached out (gradcheck's undefined-gradient check)
        return (None,) * 11
    x, weight, bn_weight, bn_bias, mean, var, out, y = ctx.saved_tensors
    stride, padding, groups, eps, relu, has_residual = ctx.conv
    gx, gw, gg, gb, gr = _common.call_backward_op(
        conv_bn_train_backward_op, grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding, groups,
        eps, relu, has_residual, ctx.needs_input_grad[0], y,
    )
    gx = gx if ctx.needs_input_grad[0] else None  # empty: not computed
    return gx, gw, gg, gb, None, None, None, None, None, (gr if has_residual else None), None


register_autograd(conv_bias_act_op, _conv_bias_act_backward, _conv_bias_act_setup)
register_autograd(conv_bn_train_op, _conv_bn_train_backward, _conv_bn_train_setup)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------


@untraced_check
def check_conv_args(op, x, weight, stride, padding, groups, residual=None, bias=None):
    check_activation(op, x)
    check_tensor(op, "weight", weight, ndim=4, like=x, what="(C_out, C_in / groups, kH, kW)")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: 'groups' must be a positive int, got {groups!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{op}: 'stride' must be a positive int, got {stride!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op}: 'padding' must be a non-negative int, got {padding!r}")
    c_in = x.shape[1]
    if c_in % groups:
        raise ValueError(f"{op}: 'x' has {c_in} channels, which 'groups'={groups} does not divide")
    if weight.shape[0] % groups:
        raise ValueError(
            f"{op}: 'weight' {tuple(weight.shape)} has {weight.shape[0]} output channels, which 'groups'={groups} "
            "does not divide"
        )
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"{op}: 'x' has {c_in} channels but 'weight' {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups}"
        )
    out_shape = conv_output_shape(x, weight, stride, padding)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(
            f"{op}: input spatial size {tuple(x.shape[2:])} is smaller than the kernel {tuple(weight.shape[2:])} "
            f"with padding {padding}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), like=x)
    if residual is not None:
        check_tensor(op, "residual", residual, shape=out_shape, like=x, same_dtype=True, what="(the conv output's shape)")
    return out_shape


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    relu: bool = False,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(conv2d(x, weight, bias) + residual)``: a Conv+BN with the BN folded into weight and bias."""
    given = (x, weight, bias, stride, padding, groups, relu, residual)
    result = _common.remembered_call(conv_bias_act_op, given)
    if result is not _common.MISS:
        return result
    op = "shvit_kernels.conv_bias_act"
    x, weight, bias, residual = _common.cast_for_autocast(x, weight, bias, residual)
    check_conv_args(op, x, weight, stride, padding, groups, residual, bias)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: 'weight' has dtype {weight.dtype} but 'x' has {x.dtype}; they must match")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _common.call_op(conv_bias_act_op, x, weight, bias, stride, padding, groups, relu, residual, given=given)


def fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps, conv_bias=None):
    """Fold an eval-mode BatchNorm into the preceding conv: returns (weight', bias'). Differentiable."""
    scale = upcast(bn_weight) * torch.rsqrt(upcast(running_var) + eps)
    shift = upcast(bn_bias) - upcast(running_mean) * scale
    if conv_bias is not None:
        shift = shift + upcast(conv_bias) * scale
    w = (upcast(weight) * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    return w, shift.to(weight.dtype)


def conv_bn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
    residual: Optional[torch.Tensor] = None,
    process_group=None,
) -> torch.Tensor:
    """Conv2d (no bias) + BatchNorm2d (+ residual) (+ ReLU) in one op.

    ``training=True`` normalises with batch statistics and updates ``running_mean``/``running_var`` in place
    (momentum, unbiased variance, as ``nn.BatchNorm2d``); ``training=False`` uses the running statistics.
    ``process_group`` (training only): batch statistics over the batches of every process in the group
    (synchronised BatchNorm, see :func:`sync_batch_norm`); the conv still runs through the conv op.
    """
    op = "shvit_kernels.conv_bn"
    x, weight, residual = _common.cast_for_autocast(x, weight, residual)
    out_shape = check_conv_args(op, x, weight, stride, padding, groups, residual)
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: 'weight' has dtype {weight.dtype} but 'x' has {x.dtype}; they must match")
    c_out = weight.shape[0]
    check_eps(op, "eps", eps)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_tensor(op, name, t, shape=(c_out,), like=x)
        check_param_dtype(op, name, t, x)
    # Checked in training too, before anything runs: a failed call must leave the running statistics as they were.
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None and not training:
            raise ValueError(f"{op}: '{name}' is required when training=False")
        if t is not None:
            check_tensor(op, name, t, shape=(c_out,), like=x)
    if not training:
        w, b = fold_bn(weight, bn_weight, bn_bias, running_mean, running_var, eps)
        return _common.call_op(conv_bias_act_op, x, w, b, stride, padding, groups, relu, residual)
    if process_group is not None:
        y = conv_bias_act_op(x, weight, None, stride, padding, groups, False, None)
        out = sync_batch_norm(
            y, bn_weight, bn_bias, running_mean, running_var, momentum=momentum, eps=eps, process_group=process_group
        )
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    count = out_shape[0] * out_shape[2] * out_shape[3]
    if count < 2:
        raise ValueError(
            f"{op}: training BatchNorm needs more than one value per channel, got output shape {out_shape}"
        )
    if bn_weight.dtype != bn_bias.dtype:
        bn_bias = bn_bias.to(bn_weight.dtype)
    keep = _common.needs_autograd((x, weight, bn_weight, bn_bias, residual)) and keeps_conv_output(weight)
    out, mean, var, _ = _common.call_op(
        conv_bn_train_op, x, weight, bn_weight, bn_bias, stride, padding, groups, float(eps), relu, residual, keep
    )
    _common.bn_update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


# Training Conv+BN keeps its conv output for the backward pass when one output value costs at least this many
# multiply-adds (C_in / groups x kH x kW); cheaper outputs are recomputed there. 128 keeps every 1x1 and dense conv
# of SHViT but a 3-channel first conv, and recomputes the depthwise ones. AMD Zen 5, batch 16, one thread, 2026-12-02
# (interleaved in one process): S1's step 1.06x and S4's 1.05x the speed of the previous 256, keeping all 1.09x /
# 1.06x. Peak memory of a step (Xeon with AMX, 2026-12-03): about eager PyTorch's (S1 bf16 1.12x, fp32 1.00x; S4
# 0.96x); recomputing every output: 0.65-0.90x eager's, at 1.17-1.22x the step time.
DEFAULT_KEEP_MIN_MACS = 128.0
_KEEP_ENV = "SHVIT_KERNELS_KEEP_CONV_OUTPUTS"


def _parse_keep(value, source: str) -> float:
    """The threshold ``value`` names ('all', 'none' or a number >= 0, also as a string)."""
    number = value
    if isinstance(value, str):
        number = {"all": 0.0, "none": math.inf}.get(value.strip().lower(), value)
        try:
            number = float(number)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number) or number < 0:
        raise ValueError(f"{source}: expected 'all', 'none' or a number of multiply-adds >= 0, got {value!r}")
    return float(number)


def _keep_from_env() -> float:
    value = os.environ.get(_KEEP_ENV)
    if value is None:
        return DEFAULT_KEEP_MIN_MACS
    try:
        return _parse_keep(value, _KEEP_ENV)
    except ValueError as e:
        warnings.warn(f"{e}; using the default {DEFAULT_KEEP_MIN_MACS:g}", RuntimeWarning, stacklevel=2)
        return DEFAULT_KEEP_MIN_MACS


_keep_min_macs = _keep_from_env()


def keeps_conv_output(weight: torch.Tensor) -> bool:
    """Whether a training Conv+BN with this weight (C_out, C_in / groups, kH, kW) keeps its conv output for the
    backward pass under the current :func:`set_keep_conv_outputs` threshold."""
    return weight.shape[1] * weight.shape[2] * weight.shape[3] >= _keep_min_macs


def set_keep_conv_outputs(min_macs) -> float:
    """Which training Conv+BN ops keep their conv output for the backward pass instead of recomputing it.

    ``min_macs``: keep an output when one of its values costs at least this many multiply-adds
    (``C_in / groups x kH x kW``); ``"all"`` (or 0) keeps every one (fastest backward, most memory), ``"none"`` (or
    ``math.inf``) recomputes every one (least memory). Returns the previous threshold. Default
    ``DEFAULT_KEEP_MIN_MACS``, or env ``SHVIT_KERNELS_KEEP_CONV_OUTPUTS``.
    """
    global _keep_min_macs
    previous, _keep_min_macs = _keep_min_macs, _parse_keep(min_macs, "shvit_kernels.set_keep_conv_outputs")
    return previous


@contextlib.contextmanager
def keep_conv_outputs(min_macs) -> Iterator[None]:
    """:func:`set_keep_conv_outputs` for the block, then the previous threshold again."""
    previous = set_keep_conv_outputs(min_macs)
    try:
        yield
    finally:
        set_keep_conv_outputs(previous)


class _RecomputedOutput(_recompute.Recipe):
    """A training Conv+BN's output from its kept conv output, the forward's statistics and its residual (a tensor,
    None, or the recipe of a residual recomputed in turn)."""

    __slots__ = ("conv_output", "bn_weight", "bn_bias", "mean", "var", "eps", "relu", "residual", "forcing")

    def __init__(self, conv_output, bn_weight, bn_bias, mean, var, eps, relu, residual):
        super().__init__()
        self.conv_output, self.mean, self.var, self.eps, self.relu = conv_output, mean, var, eps, relu
        self.residual = residual
        # Copies: a BatchNorm parameter changed in place before the backward must not change the output.
        self.bn_weight, self.bn_bias = bn_weight.detach().clone(), bn_bias.detach().clone()
        self.forcing = dispatch.current_forcing()

    def make(self) -> torch.Tensor:
        residual = self.residual.get() if isinstance(self.residual, _recompute.Recipe) else self.residual
        with dispatch.forcing(self.forcing):
            return _common.call_op(conv_bn_train_output_op, self.conv_output, self.bn_weight, self.bn_bias,
                                   self.mean, self.var, self.eps, self.relu, residual)


def _offer_output(out, conv_output, bn_weight, bn_bias, mean, var, eps, relu, residual) -> bool:
    """Offer a training Conv+BN's output for recomputation (see recompute_cheap_tensors); whether it was taken.

    A residual that is itself offered is recomputed in turn, from a residual held as it is: longer chains are
    refused, as they would recompute a whole residual stream at the backward's first use and hold it."""
    if not _recompute.offers.active or torch.compiler.is_compiling():  # traced: the graph saves what it saves
        return False
    if conv_output.stride() != out.stride() or conv_output.dtype != out.dtype:
        return False
    if residual is not None:
        if residual.stride() != out.stride():
            return False
        saved = _recompute.offers.pack(residual)
        if saved is not residual:
            if not isinstance(saved, _RecomputedOutput) or isinstance(saved.residual, _recompute.Recipe):
                return False
            residual = saved
    recipe = _RecomputedOutput(conv_output, bn_weight, bn_bias, mean, var, eps, relu, residual)
    return _recompute.offers.offer(out, recipe)
