"""Synchronised BatchNorm for multi-process training of SHViT models (``convert_sync_batchnorm``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from shvit_kernels import sync_batch_norm

from .layers import bn_step
from .model import FFN, SHSA, Conv2d_BN

__all__ = ["SyncBatchNorm1d", "convert_sync_batchnorm"]


class SyncBatchNorm1d(nn.BatchNorm1d):
    """The classifier's BatchNorm1d with batch statistics over a process group (same state_dict names)."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.process_group is None:
            return super().forward(x)
        _, momentum = bn_step(self, True)
        return sync_batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var,
            momentum=momentum, eps=self.eps, process_group=self.process_group,
        )


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every BatchNorm of an SHViT model use batch statistics over ``process_group`` in training.

    ``None`` means the default (world) group; torch.distributed must be initialised. The Conv+BN, FFN and
    SHSA ops get the group through their modules' ``process_group``; plain ``nn.BatchNorm1d`` layers (the
    classifier) become :class:`SyncBatchNorm1d`. Parameters and state_dict names are unchanged.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("convert_sync_batchnorm: torch.distributed is not initialised (run under torchrun, or pass a process_group)")
        process_group = dist.group.WORLD
    for module in list(model.modules()):
        if isinstance(module, (Conv2d_BN, FFN, SHSA)):
            module.process_group = process_group
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm1d:
                synced = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                synced.load_state_dict(child.state_dict())
                synced.to(child.weight.device if child.affine else child.running_mean.device)
                synced.train(child.training)
                synced.process_group = process_group
                setattr(module, name, synced)
    return model
