"""Building models by name, timm-style: ``create_model``, ``list_models`` and one constructor per variant."""

from __future__ import annotations

import fnmatch
from typing import List, Union

from .checkpoint import load_pretrained
from .model import SHViT
from .variants import MODEL_CONFIGS, PRETRAINED_CFGS

__all__ = ["create_model", "list_models", "shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"]


def list_models(pattern: str = "*") -> List[str]:
    """Names of the available variants, optionally filtered by a shell-style pattern (``"*s1*"``)."""
    return sorted(name for name in MODEL_CONFIGS if fnmatch.fnmatch(name, pattern))


def create_model(
    model_name: str,
    pretrained: Union[None, bool, str] = None,
    num_classes: int = 1000,
    distillation: bool = False,
    **kwargs,
) -> SHViT:
    """Build a variant by name, timm-style.

    ``pretrained``: None/False for random weights; True for the authors' release; a local path or a URL
    (http(s):// or file://; downloads are cached under $TORCH_HOME/hub/checkpoints). When ``num_classes``
    differs from the checkpoint's, the checkpoint's head is dropped and the new head keeps its initialisation.
    Other keyword arguments go to :class:`SHViT` (for example ``in_chans``), except timm's
    ``features_only=True`` (and ``out_indices``), which return a backbone giving the stage maps
    (:class:`shvit.features.SHViTFeatures`).
    """
    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown SHViT model {model_name!r}; valid names: {', '.join(list_models())}")
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", None)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the maps of a features_only=True model; pass features_only=True")
    config = {**MODEL_CONFIGS[model_name], **kwargs}
    model = SHViT(num_classes=num_classes, distillation=distillation, **config)
    model.variant = model_name
    model.pretrained_cfg = dict(PRETRAINED_CFGS[model_name])
    if pretrained:
        source = PRETRAINED_CFGS[model_name]["url"] if pretrained is True else pretrained
        load_pretrained(model, source)
    if features_only:  # timm's convention: a backbone returning the stage maps (see shvit.features)
        from .features import SHViTFeatures

        return SHViTFeatures(model, out_indices)
    return model


def _variant_constructor(name: str):
    def constructor(pretrained: Union[None, bool, str] = None, **kwargs) -> SHViT:
        return create_model(name, pretrained=pretrained, **kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = f"{name}: {MODEL_CONFIGS[name]}. See :func:`create_model` for the arguments."
    return constructor


shvit_s1 = _variant_constructor("shvit_s1")
shvit_s2 = _variant_constructor("shvit_s2")
shvit_s3 = _variant_constructor("shvit_s3")
shvit_s4 = _variant_constructor("shvit_s4")
