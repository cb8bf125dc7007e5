"""SHViT as a detection / segmentation backbone: ``create_model(name, features_only=True, out_indices=...)``.

timm's convention: the model returns a list of stage maps (strides 16, 32, 64), ``feature_info`` describes
them (``channels()``, ``reduction()``, ``module_name()``), and stages after the last requested one and the
classifier are dropped. Module names stay the authors' (``patch_embed``, ``blocks1..3``), so their
checkpoints (minus the head) load with ``shvit.load_checkpoint(..., strict=False)`` and ``shvit.fuse`` works.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .model import SHViT

__all__ = ["FeatureInfo", "SHViTFeatures", "resolve_out_indices"]

NUM_STAGES = 3


def resolve_out_indices(out_indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's rule: None for all stages, an int n for the last n, else stage indices (negative from the end)."""
    if out_indices is None:
        return list(range(NUM_STAGES))
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= NUM_STAGES:
            raise ValueError(f"out_indices as an int is the number of last stages to return (1..{NUM_STAGES}), got {out_indices}")
        return list(range(NUM_STAGES - out_indices, NUM_STAGES))
    try:
        indices = [int(i) for i in out_indices]
    except TypeError:
        raise TypeError(f"out_indices must be an int or a sequence of stage indices, got {out_indices!r}") from None
    if not indices or any(not -NUM_STAGES <= i < NUM_STAGES for i in indices):
        raise ValueError(f"out_indices must be stage indices in 0..{NUM_STAGES - 1} (or negative from the end), got {list(out_indices)}")
    resolved = sorted({i % NUM_STAGES for i in indices})
    if len(resolved) != len(indices):
        raise ValueError(f"out_indices must not repeat a stage, got {list(out_indices)}")
    return resolved


class FeatureInfo:
    """timm-style description of the returned maps: one dict (num_chs, reduction, module, index) per map."""

    def __init__(self, infos: List[dict]):
        self.info = [dict(d) for d in infos]

    def _get(self, key: str, idx=None):
        if idx is None:
            return [d[key] for d in self.info]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None):
        chosen = self.info if idx is None else [self.info[i] for i in ([idx] if isinstance(idx, int) else idx)]
        return [d if keys is None else {k: d[k] for k in keys} for d in chosen]

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self):
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"


class SHViTFeatures(nn.Module):
    """The stem and stages of an :class:`SHViT` up to the last of ``out_indices``; forward returns their maps."""

    def __init__(self, model: SHViT, out_indices: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        if not isinstance(model, SHViT):
            raise TypeError(f"SHViTFeatures wraps an shvit.SHViT, got {type(model).__name__}")
        self.out_indices = tuple(resolve_out_indices(out_indices))
        self.in_chans = model.in_chans
        self.variant = getattr(model, "variant", None)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)
        self.is_fused = getattr(model, "is_fused", False)
        self.patch_embed = model.patch_embed
        last = max(self.out_indices)
        for i in range(last + 1):
            self.add_module(f"blocks{i + 1}", getattr(model, f"blocks{i + 1}"))
        self.feature_info = FeatureInfo([dict(model.feature_info[i], index=i) for i in self.out_indices])
        self.train(model.training)

    check_input = SHViT.check_input  # same input rule (B, in_chans, H, W), H and W multiples of 16, >= 64

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        x = self.patch_embed(x)
        features = []
        for i in range(max(self.out_indices) + 1):
            x = getattr(self, f"blocks{i + 1}")(x)
            if i in self.out_indices:
                features.append(x)
        return features

    def fuse(self) -> "SHViTFeatures":
        """A new eval-mode feature model with every BatchNorm folded (see ``shvit.fuse``)."""
        from .fuse import fuse

        fused = fuse(self)
        fused.is_fused = True
        return fused
