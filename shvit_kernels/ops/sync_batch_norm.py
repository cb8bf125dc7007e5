"""Synchronised BatchNorm for multi-process training: batch statistics over every process of a group.

``conv_bn`` and ``shsa`` use it when given a ``process_group``; the conv itself still runs through the conv op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._common import bn_update_running_stats, check_tensor, upcast


class _SyncBatchNorm(torch.autograd.Function):
    """Training BN over the batches of every process in a group: one all-reduce forward, one backward.

    Forward all-reduces per-channel (sum, sum of squares, count), accumulated in fp64 so that
    E[y^2] - E[y]^2 does not cancel; backward all-reduces sum(dy) and sum(dy * x_hat). The weight and bias
    gradients stay local (DistributedDataParallel averages them like every other gradient).
    """

    @staticmethod
    def forward(ctx, y, bn_weight, bn_bias, running_mean, running_var, momentum, eps, group):
        c = y.shape[1]
        dims = [0, *range(2, y.dim())]
        yf = upcast(y)
        sums = torch.cat([
            yf.sum(dims, dtype=torch.float64),
            yf.square().sum(dims, dtype=torch.float64),
            yf.new_full((1,), y.numel() // c, dtype=torch.float64),
        ])
        dist.all_reduce(sums, group=group)
        count = int(sums[-1].item())
        if count < 2:
            raise ValueError(
                f"shvit_kernels.conv_bn: training BatchNorm needs more than one value per channel over the process "
                f"group, got {count}"
            )
        mean64 = sums[:c] / count
        mean = mean64.to(yf.dtype)
        var = (sums[c:2 * c] / count - mean64.square()).clamp_min(0).to(yf.dtype)
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (y.dim() - 2)
        x_hat = (yf - mean.reshape(shape)) * invstd.reshape(shape)
        out = x_hat * upcast(bn_weight).reshape(shape) + upcast(bn_bias).reshape(shape)
        bn_update_running_stats(running_mean, running_var, mean, var, count, momentum)
        ctx.save_for_backward(y, bn_weight, mean, invstd)
        ctx.group, ctx.count, ctx.bias_dtype = group, count, bn_bias.dtype
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        y, bn_weight, mean, invstd = ctx.saved_tensors
        c = y.shape[1]
        dims = [0, *range(2, y.dim())]
        shape = [1, c] + [1] * (y.dim() - 2)
        g = upcast(grad_out)
        x_hat = (upcast(y) - mean.reshape(shape)) * invstd.reshape(shape)
        local = torch.cat([g.sum(dims), (g * x_hat).sum(dims)])
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        mean_dy, mean_dy_xhat = (total / ctx.count).split(c)
        grad_y = (upcast(bn_weight) * invstd).reshape(shape) * (
            g - mean_dy.reshape(shape) - x_hat * mean_dy_xhat.reshape(shape)
        )
        grad_bias, grad_weight = local.split(c)
        return grad_y.to(y.dtype), grad_weight.to(bn_weight.dtype), grad_bias.to(ctx.bias_dtype), None, None, None, None, None


def sync_batch_norm(
    y: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group,
) -> torch.Tensor:
    """Training BatchNorm of ``y`` (N, C, *) with statistics over every process in ``process_group``.

    Collective: every process of the group must call it in the same order. Updates the running statistics
    (unbiased variance over the global count) in place, like ``nn.BatchNorm``.
    """
    op = "shvit_kernels.sync_batch_norm"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: 'process_group' is set but torch.distributed is not initialised")
    if not isinstance(y, torch.Tensor) or y.dim() < 2:
        raise ValueError(f"{op}: 'y' must be a tensor of shape (N, C, *)")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_tensor(op, name, t, shape=(y.shape[1],), like=y)
    return _SyncBatchNorm.apply(y, bn_weight, bn_bias, running_mean, running_var, float(momentum), float(eps), process_group)
