"""Pieces the model modules and their fused stand-ins share: the residual-in-forward mixin, the BN step and the
spatial mean."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


def bn_step(bn: nn.modules.batchnorm._BatchNorm, training: bool) -> Tuple[bool, float]:
    """(use batch statistics, momentum) for one forward of ``bn``, counting the step as nn.BatchNorm does.

    ``momentum=None`` means a cumulative moving average, i.e. momentum 1 / num_batches_tracked.
    """
    use_batch_stats = training or bn.running_mean is None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return use_batch_stats, momentum


class ResidualInForward:
    """Mixin for modules whose forward takes ``residual=``: the residual add happens inside their last op."""

    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, residual=x)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W, (N, C, H, W) -> (N, C). A channels_last x is pooled as the (N, H, W, C) array it is, so
    its gradient comes back channels_last: pooled in NCHW order the gradient came back NCHW, and every fused
    backward downstream (the whole last stage, from the head's pooling) copied it to channels_last first."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).mean((1, 2))
    return x.mean((2, 3))
