"""Knowledge distillation as in the authors' recipe (DeiT, Touvron et al. 2021, which SHViT's main.py follows).

The student is built with ``distillation=True``: in training it returns (class-head logits, distillation-head
logits); the class head learns from the labels (after mixup/cutmix and label smoothing), the distillation
head from the teacher, and evaluation averages the two heads. With ``--distillation hard`` the distillation
target is the teacher's arg-max class; ``soft`` uses the KL divergence at temperature ``tau``. The loss is
``(1 - alpha) * base + alpha * distillation`` (the authors' default alpha 0.5, tau 1.0). The teacher sees
the same (mixed) images as the student, in eval mode, without gradients.

Teachers (``--teacher``): a local checkpoint of an SHViT (any format ``shvit.load_checkpoint`` reads); an
SHViT variant name or a timm model name with ``--teacher-weights PATH`` (a state_dict, or ``{'model': ...}``
as DeiT's RegNetY-160 release is). Weights are never downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Distiller", "add_distillation_arguments", "build_teacher", "distillation_loss", "split_outputs"]

MODES = ("none", "soft", "hard")


def add_distillation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation (the authors' recipe: DeiT hard distillation, alpha 0.5)")
    g.add_argument("--distillation", default="none", choices=MODES, help="train the distillation head from a teacher")
    g.add_argument("--teacher", default=None, metavar="PATH_OR_NAME",
                   help="an SHViT checkpoint file, or a model name (shvit_s1..s4 or timm's) with --teacher-weights")
    g.add_argument("--teacher-weights", default=None, metavar="PATH", help="local weights for a --teacher given by name")
    g.add_argument("--distillation-alpha", type=float, default=0.5, help="weight of the distillation loss")
    g.add_argument("--distillation-tau", type=float, default=1.0, help="temperature (soft distillation)")


def check_distillation_args(args) -> None:
    mode = getattr(args, "distillation", "none")
    if mode not in MODES:
        raise ValueError(f"--distillation must be one of {', '.join(MODES)}, got {mode!r}")
    teacher, weights = getattr(args, "teacher", None), getattr(args, "teacher_weights", None)
    if mode == "none":
        if teacher or weights:
            raise ValueError("--teacher / --teacher-weights need --distillation hard or soft")
        return
    if not args.teacher:
        raise ValueError(f"--distillation {mode} needs --teacher PATH_OR_NAME")
    if not 0.0 <= args.distillation_alpha <= 1.0:
        raise ValueError(f"--distillation-alpha must be in [0, 1], got {args.distillation_alpha}")
    if args.distillation_tau <= 0:
        raise ValueError(f"--distillation-tau must be positive, got {args.distillation_tau}")
    if args.teacher_weights is not None and not os.path.isfile(args.teacher_weights):
        raise FileNotFoundError(f"--teacher-weights: file not found: {args.teacher_weights!r}")
    if os.path.isfile(args.teacher):
        if args.teacher_weights:
            raise ValueError("--teacher is a checkpoint file already; --teacher-weights goes with a model name")
    elif os.sep in args.teacher or args.teacher.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"--teacher: checkpoint file not found: {args.teacher!r}")
    elif not args.teacher_weights:
        raise ValueError(f"--teacher {args.teacher!r} is a model name: give its local weights with --teacher-weights PATH")


def _state_dict(obj) -> dict:
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def build_teacher(args, num_classes: int, device: torch.device) -> Optional[nn.Module]:
    """The teacher for ``args`` in eval mode without gradients on ``device``, or None without distillation."""
    from .checkpoint import _unpack, guess_variant, load_checkpoint, read_checkpoint
    from .factory import create_model
    from .variants import MODEL_CONFIGS

    check_distillation_args(args)
    if args.distillation == "none":
        return None
    if os.path.isfile(args.teacher):
        state, meta = _unpack(read_checkpoint(args.teacher))
        variant = meta.get("variant") or guess_variant(state)
        if variant is None:
            raise ValueError(
                f"--teacher {args.teacher!r} is not an SHViT checkpoint (variant unknown); for another architecture "
                "pass its timm name as --teacher and the file as --teacher-weights"
            )
        head = state.get("head.l.weight")
        teacher = create_model(variant, num_classes=int(head.shape[0]) if head is not None else 0,
                               distillation="head_dist.l.weight" in state)
        load_checkpoint(teacher, state)
    elif args.teacher in MODEL_CONFIGS:
        teacher = create_model(args.teacher, num_classes=num_classes)
        load_checkpoint(teacher, args.teacher_weights)
    else:
        try:
            import timm
        except ImportError:
            raise ImportError(f"--teacher {args.teacher!r}: not an SHViT variant, and timm (for other models) is not installed") from None
        if not timm.is_model(args.teacher):
            raise ValueError(f"--teacher {args.teacher!r}: not a file, an SHViT variant or a timm model name")
        teacher = timm.create_model(args.teacher, pretrained=False, num_classes=num_classes)
        state = _state_dict(torch.load(args.teacher_weights, map_location="cpu", weights_only=True))
        try:
            teacher.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"--teacher-weights {args.teacher_weights!r} do not fit timm's {args.teacher}: {e}") from None
    classes = getattr(teacher, "num_classes", num_classes)
    if classes != num_classes:
        raise ValueError(f"--teacher predicts {classes} classes but the student is trained on {num_classes}")
    teacher.to(device).eval().requires_grad_(False)
    return teacher


def split_outputs(outputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(class logits, distillation logits or None), both fp32, from a model's training output."""
    if isinstance(outputs, (tuple, list)):
        return outputs[0].float(), outputs[1].float()
    return outputs.float(), None


def distillation_loss(logits_dist: torch.Tensor, teacher_logits: torch.Tensor, mode: str, tau: float = 1.0) -> torch.Tensor:
    """DeiT's distillation term: cross-entropy to the teacher's class (hard) or KL at temperature tau (soft)."""
    teacher_logits = teacher_logits.float()
    if mode == "hard":
        return F.cross_entropy(logits_dist, teacher_logits.argmax(dim=1))
    if mode == "soft":
        return F.kl_div(
            F.log_softmax(logits_dist / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
            reduction="sum", log_target=True,
        ) * (tau * tau) / logits_dist.numel()
    raise ValueError(f"distillation mode must be 'hard' or 'soft', got {mode!r}")


class Distiller:
    """Combines the base loss with the teacher's term: ``(1 - alpha) * base + alpha * distillation``."""

    def __init__(self, teacher: nn.Module, mode: str, alpha: float, tau: float, channels_last: bool = False,
                 autocast=contextlib.nullcontext):
        self.teacher, self.mode, self.alpha, self.tau, self.autocast = teacher, mode, alpha, tau, autocast
        if channels_last:
            teacher.to(memory_format=torch.channels_last)

    def __call__(self, base_loss: torch.Tensor, logits_dist: Optional[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        if logits_dist is None:
            raise RuntimeError("distillation needs the student's distillation head (create_model(..., distillation=True)) in training mode")
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(images)
        return base_loss * (1 - self.alpha) + distillation_loss(logits_dist, teacher_logits, self.mode, self.tau) * self.alpha
