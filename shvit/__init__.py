"""shvit: SHViT models (CVPR 2024) built on the fused ``shvit_kernels`` ops, with the authors' parameter names.

    model = shvit.create_model("shvit_s1", pretrained=True)   # or a path / URL
    fast = shvit.fuse(model)                                   # BatchNorms folded, for inference
"""

from shvit_kernels import __version__  # one version for both packages (they ship together)

from .accelerate import AccelerateError, accelerate
from .checkpoint import CheckpointError, LoadResult, load_checkpoint, save_checkpoint, timm_to_authors
from .factory import create_model, list_models, shvit_s1, shvit_s2, shvit_s3, shvit_s4
from .export import export_onnx
from .fuse import FusedConv2d, FusedFFN, FusedLinear, FusedSHSA, FusedSqueezeExcite, FusedStem, fuse
from .model import BN_Linear, BasicBlock, Conv2d_BN, FFN, PatchMerging, Residual, SHSA, SHViT, SqueezeExcite
from .sync_batchnorm import convert_sync_batchnorm
from .variants import MODEL_CONFIGS, PRETRAINED_CFGS

__all__ = [
    "AccelerateError",
    "accelerate",
    "export_onnx",
    "__version__",
    "CheckpointError",
    "LoadResult",
    "load_checkpoint",
    "save_checkpoint",
    "timm_to_authors",
    "convert_sync_batchnorm",
    "FusedConv2d",
    "FusedFFN",
    "FusedSHSA",
    "FusedSqueezeExcite",
    "FusedLinear",
    "FusedStem",
    "fuse",
    "BN_Linear",
    "BasicBlock",
    "Conv2d_BN",
    "FFN",
    "MODEL_CONFIGS",
    "PRETRAINED_CFGS",
    "PatchMerging",
    "Residual",
    "SHSA",
    "SHViT",
    "SqueezeExcite",
    "create_model",
    "list_models",
    "shvit_s1",
    "shvit_s2",
    "shvit_s3",
    "shvit_s4",
]
