"""The SHViT variants: their configurations and the authors' released checkpoints (no model code here)."""

from __future__ import annotations

from typing import Dict

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RELEASE_URL = "https://github.com/ysj9909/SHViT/releases/download/v1.0/{name}.pth"

# Stage-1 partial dims are the authors' values; stage 1 has no attention, so they are unused.
MODEL_CONFIGS: Dict[str, dict] = {
    "shvit_s1": dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68), types=("i", "s", "s")),
    "shvit_s2": dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96), types=("i", "s", "s")),
    "shvit_s3": dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96), types=("i", "s", "s")),
    "shvit_s4": dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96), types=("i", "s", "s")),
}

PRETRAINED_CFGS: Dict[str, dict] = {
    name: dict(
        url=RELEASE_URL.format(name=name),
        num_classes=1000,
        input_size=(3, 256, 256) if name == "shvit_s4" else (3, 224, 224),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    for name in MODEL_CONFIGS
}
