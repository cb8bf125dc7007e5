"""Training: ``python -m shvit train`` (one process, or ``torchrun --nproc_per_node N -m shvit train`` for DDP).

Defaults follow the authors' recipe (ysj9909/SHViT ``main.py`` and README, which follow DeiT/LeViT): AdamW
(eps 1e-8), lr 1e-3 x total batch / 512, 5 warm-up epochs from 1e-6 then cosine to 1e-5, 300 epochs of
batch 256 per process, weight decay 0.025 / 0.032 / 0.035 / 0.03 for S1 / S2 / S3 / S4 (none on biases
and norm parameters, as timm's optimizer factory does), adaptive gradient clipping at 0.02, label
smoothing 0.1, mixup 0.8 / cutmix 1.0, EMA of the weights (decay 0.99996), and with ``--distillation hard
--teacher ...`` DeiT hard distillation through the distillation head (``shvit.distill``; the authors used a
RegNetY-160 teacher). Not reproduced: RandAugment, random erasing, repeated augmentation. The schedule is
stepped per iteration instead of per epoch.

Without ``--data-dir`` the built-in synthetic dataset is used, so the command runs anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import shvit_kernels

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained, read_checkpoint, save_checkpoint
from .distill import Distiller, add_distillation_arguments, build_teacher, split_outputs
from .data import DatasetError, EpochSampler, ImageFolder, SyntheticDataset, collate
from .factory import create_model
from .sync_batchnorm import convert_sync_batchnorm
from .variants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MODEL_CONFIGS, PRETRAINED_CFGS

__all__ = ["add_train_arguments", "convert_sync_batchnorm", "main", "train", "WEIGHT_DECAY"]

WEIGHT_DECAY = {"shvit_s1": 0.025, "shvit_s2": 0.032, "shvit_s3": 0.035, "shvit_s4": 0.03}
LR_REFERENCE_BATCH = 512
CHECKPOINT_NAME = "checkpoint.pth"


# --------------------------------------------------------------------------------------------------------
# Recipe pieces
# --------------------------------------------------------------------------------------------------------
class WarmupCosine:
    """Per-step learning rate: linear warm-up from ``warmup_lr``, then cosine from ``base_lr`` to ``min_lr``."""

    def __init__(self, optimizer, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float):
        self.optimizer, self.base_lr, self.total_steps = optimizer, base_lr, max(total_steps, 1)
        self.warmup_steps, self.warmup_lr, self.min_lr = warmup_steps, warmup_lr, min_lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


class ModelEma:
    """Exponential moving average of a model's state (parameters and buffers), kept for evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.lerp_(v.to(ema_v.dtype), 1.0 - self.decay)
            else:
                ema_v.copy_(v)


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """No weight decay on biases and normalisation parameters (every tensor of at most one dimension)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(groups: List[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW, as one fused kernel per step where torch has one for the device: the per-parameter
    loop took 36 ms of a 400 ms S1 step (batch 16, one CPU thread) against 12 ms fused (Intel Xeon family 6 model
    207, 2026-12-01). Fused AdamW rounds differently in the last bits, nothing more."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, eps=1e-8, fused=fused or None)


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)) if t.ndim > 1 else None, keepdim=t.ndim > 1)


def _unitwise_norms(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """``[_unitwise_norm(t) for t in tensors]``, the whole-tensor norms (tensors of at most one dimension) in one
    ``_foreach_norm`` call per dtype and device."""
    norms: List[Optional[torch.Tensor]] = [None] * len(tensors)
    groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
    for i, t in enumerate(tensors):
        if t.ndim > 1:
            norms[i] = _unitwise_norm(t)
        else:
            groups.setdefault((t.dtype, t.device), []).append(i)
    for indices in groups.values():
        for i, n in zip(indices, torch._foreach_norm([tensors[i] for i in indices])):
            norms[i] = n
    return norms


@torch.no_grad()
def clip_gradients(params, max_value: float, mode: str) -> None:
    """``norm``: global norm clipping. ``agc`` (the authors'): each output unit's gradient norm is capped at
    ``max_value`` times the unit's weight norm (at least 1e-3), so the update is relative to the weights.
    """
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_value)
    elif mode == "agc" and params:
        # scale = min(max(|w|, 1e-3) * max_value / max(|g|, 1e-6), 1) per unit, through list ops: S1's 249
        # parameters one op at a time took 24 ms per step against 12 ms (one CPU thread, fresh gradients; Intel
        # Xeon family 6 model 207, 2026-12-01), with the same result bit for bit.
        grads = [p.grad for p in params]
        scales = _unitwise_norms(params)
        grad_norms = _unitwise_norms(grads)
        torch._foreach_clamp_min_(scales, 1e-3)
        torch._foreach_mul_(scales, max_value)
        torch._foreach_clamp_min_(grad_norms, 1e-6)
        torch._foreach_div_(scales, grad_norms)
        torch._foreach_clamp_max_(scales, 1.0)
        torch._foreach_mul_(grads, scales)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, args) -> tuple:
    """Mixup or CutMix of the batch with its reverse (timm's batch mode); returns (images, soft targets).

    Random draws come from NumPy's global generator, whose state the checkpoints keep.
    """
    smooth = args.smoothing
    onehot = torch.full((labels.shape[0], num_classes), smooth / num_classes, device=images.device)
    onehot.scatter_(1, labels[:, None], 1.0 - smooth + smooth / num_classes)
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or np.random.rand() < 0.5)
    if use_cutmix:
        lam = float(np.random.beta(args.cutmix, args.cutmix))
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cy, cx = np.random.randint(h), np.random.randint(w)
        y0, y1 = int(np.clip(cy - h * cut / 2, 0, h)), int(np.clip(cy + h * cut / 2, 0, h))
        x0, x1 = int(np.clip(cx - w * cut / 2, 0, w)), int(np.clip(cx + w * cut / 2, 0, w))
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = float(np.random.beta(args.mixup, args.mixup))
        images = images * lam + images.flip(0) * (1.0 - lam)
    return images, onehot * lam + onehot.flip(0) * (1.0 - lam)


# --------------------------------------------------------------------------------------------------------
# Checkpoints (this project's format plus a "train_state" entry; shvit.load_checkpoint reads the weights)
# --------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: str, model, optimizer, scheduler, scaler, ema, epoch: int, step_in_epoch: int, args, history) -> None:
    tmp = path + ".tmp"
    save_checkpoint(model, tmp)
    obj = torch.load(tmp, map_location="cpu", weights_only=True)
    obj["train_state"] = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.module.state_dict().items()},
        "rng": rng_state(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "history": history,
    }
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash while writing never leaves a truncated checkpoint behind


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default="shvit_s1", help=f"variant: {', '.join(MODEL_CONFIGS)}")
    m.add_argument("--num-classes", type=int, default=None, help="default: the dataset's number of classes")
    m.add_argument("--img-size", type=int, default=None, help="default: the paper's resolution (224, S4: 256)")
    m.add_argument("--depth", type=int, nargs=3, default=None, metavar=("D1", "D2", "D3"), help="blocks per stage (smaller test models)")
    m.add_argument("--finetune", default=None, metavar="PATH", help="start from these weights; a head of another size is re-initialised")
    m.add_argument("--resume", default=None, metavar="PATH", help="continue a run exactly from its training checkpoint")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (or validation/); default: synthetic data")
    d.add_argument("--synthetic-size", type=int, nargs=2, default=(1280, 256), metavar=("TRAIN", "VAL"), help="synthetic images per split")
    d.add_argument("--synthetic-classes", type=int, default=10)
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    o = p.add_argument_group("optimisation (defaults: the authors' recipe)")
    o.add_argument("--epochs", type=int, default=300)
    o.add_argument("--steps", type=int, default=None, help="stop (with a checkpoint) after this many optimizer steps in total")
    o.add_argument("--batch-size", type=int, default=256, help="per process")
    o.add_argument("--lr", type=float, default=1e-3, help=f"base lr, scaled by total batch / {LR_REFERENCE_BATCH}")
    o.add_argument("--no-lr-scaling", action="store_true", help="use --lr as it is")
    o.add_argument("--warmup-epochs", type=float, default=5)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--weight-decay", type=float, default=None, help="default per variant: " + ", ".join(f"{k[-2:]} {v}" for k, v in WEIGHT_DECAY.items()))
    o.add_argument("--clip-grad", type=float, default=0.02, help="0 disables")
    o.add_argument("--clip-mode", default="agc", choices=["agc", "norm"])
    o.add_argument("--smoothing", type=float, default=0.1)
    o.add_argument("--mixup", type=float, default=0.8, help="Beta alpha; 0 disables")
    o.add_argument("--cutmix", type=float, default=1.0, help="Beta alpha; 0 disables")
    o.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    o.add_argument("--ema-decay", type=float, default=0.99996)
    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"], help="auto: bf16 on CUDA, none on CPU")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend default: inductor; aot_eager skips code generation)")
    s.add_argument("--backend", default=None, help=f"prefer this shvit_kernels backend ({', '.join(shvit_kernels.BACKENDS)}); ops it lacks run on the reference")
    s.add_argument("--keep-conv-outputs", default=None, metavar="all|none|MACS",
                   help="which Conv+BN ops keep their conv output for backward instead of recomputing it: all (fastest, "
                        "most memory), none (least memory), or those costing at least MACS multiply-adds per output "
                        "value (default: shvit_kernels' threshold)")
    s.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (DDP)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    s.add_argument("--output-dir", default="output/train", help="checkpoint.pth and log.jsonl go here")
    s.add_argument("--save-authors", action="store_true", help="also write the final weights as model_authors.pth in the authors' layout")
    s.add_argument("--log-interval", type=int, default=20, help="steps between progress lines when stderr is not a terminal")
    add_distillation_arguments(p)


def check_args(args) -> None:
    def bad(message):
        raise ValueError(message)

    if args.model not in MODEL_CONFIGS:
        bad(f"--model must be one of {', '.join(MODEL_CONFIGS)}, got {args.model!r}")
    if args.num_classes is not None and args.num_classes < 1:
        bad(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.img_size is not None and (args.img_size < 64 or args.img_size % 16):
        bad(f"--img-size must be a multiple of 16 and at least 64, got {args.img_size}")
    if args.depth is not None and min(args.depth) < 1:
        bad(f"--depth needs three positive numbers, got {args.depth}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        bad(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        bad(f"--threads must be at least 1, got {args.threads}")
    if args.workers < 0:
        bad(f"--workers must be at least 0, got {args.workers}")
    if args.log_interval < 1:
        bad(f"--log-interval must be at least 1 (steps), got {args.log_interval}")
    if not 0 <= args.ema_decay <= 1:
        bad(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if not 0 <= args.smoothing < 1:
        bad(f"--smoothing must be in [0, 1), got {args.smoothing}")
    for name in ("warmup_epochs", "clip_grad", "warmup_lr", "min_lr", "mixup", "cutmix"):
        value = getattr(args, name)
        if not 0 <= value < math.inf:
            bad(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.lr < math.inf:
        bad(f"--lr must be a finite number >= 0, got {args.lr}")
    if args.weight_decay is not None and not 0 <= args.weight_decay < math.inf:
        bad(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.finetune and args.resume:
        bad("--finetune and --resume exclude each other: --resume continues a run, --finetune starts a new one")
    for name in ("finetune", "resume"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            bad(f"--{name}: checkpoint file not found: {path!r}")
    if args.backend is not None and args.backend not in shvit_kernels.BACKENDS:
        bad(f"--backend must be one of {', '.join(shvit_kernels.BACKENDS)}, got {args.backend!r}")
    if args.keep_conv_outputs is not None:
        try:
            with shvit_kernels.keep_conv_outputs(args.keep_conv_outputs):  # validates, then restores
                pass
        except ValueError:
            bad(f"--keep-conv-outputs must be all, none or a number of multiply-adds >= 0, got {args.keep_conv_outputs!r}")
    if min(args.synthetic_size) < 1 or args.synthetic_classes < 1:
        bad("--synthetic-size and --synthetic-classes must be positive")
    if args.compile is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in known:
            bad(f"--compile: unknown torch.compile backend {args.compile!r} (known: {', '.join(known)})")


# --------------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------------
def setup_distributed(device_arg: str):
    """(rank, world size, device); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {device_arg!r}")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return rank, world, device


def build_datasets(args):
    if args.data_dir is None:
        n = args.num_classes or args.synthetic_classes
        train_set = SyntheticDataset(args.synthetic_size[0], n, args.img_size, train=True, seed=args.seed)
        val_set = SyntheticDataset(args.synthetic_size[1], n, args.img_size, train=False, seed=args.seed)
        return train_set, val_set
    if not os.path.isdir(args.data_dir):
        raise DatasetError(f"--data-dir: dataset folder not found: {args.data_dir!r}")
    train_dir = os.path.join(args.data_dir, "train")
    val_dir = next((os.path.join(args.data_dir, v) for v in ("val", "validation") if os.path.isdir(os.path.join(args.data_dir, v))), None)
    if not os.path.isdir(train_dir) or val_dir is None:
        raise DatasetError(f"--data-dir: {args.data_dir!r} must contain train/ and val/ (or validation/) folders")
    train_set = ImageFolder(train_dir, args.img_size, train=True, seed=args.seed, what="--data-dir train/")
    val_set = ImageFolder(val_dir, args.img_size, train=False, seed=args.seed, classes=train_set.classes, what="--data-dir val/")
    return train_set, val_set


def resolve_defaults(args) -> None:
    if args.img_size is None:
        args.img_size = PRETRAINED_CFGS[args.model]["input_size"][-1]
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY[args.model]
    if args.amp == "auto":
        args.amp = "bf16" if args.device != "cpu" and torch.cuda.is_available() else "none"


# --------------------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------------------
class Progress:
    """Training progress on stderr: a tqdm bar over the run's steps with ETA on a terminal, else one line with
    the ETA every ``interval`` steps (logs stay readable)."""

    def __init__(self, enabled: bool, interval: int, total_steps: int = 0, done_steps: int = 0):
        self.enabled, self.interval = enabled, interval
        self.tty = enabled and sys.stderr.isatty()
        self.total, self.start_done, self.t0 = total_steps, done_steps, time.perf_counter()
        self.bar = None
        if self.tty and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, text: str, step: int, last: bool, global_step: int = 0) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
            self.bar.update(global_step - self.bar.n)
            if global_step >= self.total:
                self.bar.close()
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text + ("\n" if last else ""))  # \x1b[K: clear the rest of the line
        elif last or step % self.interval == 0:
            sys.stderr.write(text + self._eta(global_step) + "\n")
        sys.stderr.flush()

    def _eta(self, global_step: int) -> str:
        done = global_step - self.start_done
        if not self.total or done <= 0:
            return ""
        from tqdm import tqdm

        remaining = (time.perf_counter() - self.t0) / done * (self.total - global_step)
        return f" [{global_step}/{self.total} steps, ETA {tqdm.format_interval(remaining)}]"

    def write(self, line: str) -> None:
        """A line of its own on stderr (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def to_device(images: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
    x = (images.to(device, non_blocking=True).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def autocast(device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, args, world: int) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole validation set (summed over processes)."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, skipped
    for images, labels, skipped in loader:
        totals[4] += skipped
        if images is None:
            continue
        labels = labels.to(device)
        with autocast(device, args.amp):
            logits = model(to_device(images, device, args.channels_last)).float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.shape[0]
    if world > 1:
        dist.all_reduce(totals)
    n = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / n, "top1": 100 * totals[1].item() / n, "top5": 100 * totals[2].item() / n,
            "images": int(totals[3].item()), "skipped": int(totals[4].item())}


def train(args) -> dict:
    """Run training as configured by ``args`` (the parsed ``train`` arguments).

    Returns ``{"losses": [per-step training loss of this process], "metrics": [per-epoch dicts],
    "model": the trained model (unwrapped), "checkpoint": path of the last checkpoint}``.
    """
    check_args(args)
    resolve_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    main_process = rank == 0
    try:
        keep = args.keep_conv_outputs
        with shvit_kernels.prefer_backend(args.backend), (
            shvit_kernels.keep_conv_outputs(keep) if keep is not None else contextlib.nullcontext()
        ):
            result = _train(args, rank, world, device, main_process)
        if world > 1:
            # Leave together: a gloo peer torn down while the other still talks to it can abort that process
            # ("terminate called without an active exception" at exit).
            dist.barrier()
        return result
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world, device, main_process) -> dict:
    torch.manual_seed(args.seed)  # identical initial weights in every process
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    train_set, val_set = build_datasets(args)
    data_classes = len(train_set.classes)
    if args.num_classes is not None and args.data_dir is not None and args.num_classes != data_classes:
        raise ValueError(f"--num-classes {args.num_classes} but the dataset has {data_classes} classes")
    num_classes = data_classes

    overrides = {"depth": tuple(args.depth)} if args.depth else {}
    model = create_model(args.model, num_classes=num_classes, distillation=getattr(args, "distillation", "none") != "none", **overrides)
    teacher = build_teacher(args, num_classes, device)
    distiller = None if teacher is None else Distiller(
        teacher, args.distillation, args.distillation_alpha, args.distillation_tau, args.channels_last, lambda: autocast(device, args.amp)
    )
    if args.finetune:
        load_pretrained(model, args.finetune)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, args.ema_decay) if args.ema else None
    if args.sync_bn:
        if world > 1:
            convert_sync_batchnorm(model)
        elif main_process:
            warnings.warn("--sync-bn has no effect in a single process (its batch statistics are already global)")

    lr = args.lr if args.no_lr_scaling else args.lr * args.batch_size * world / LR_REFERENCE_BATCH
    optimizer = build_optimizer(param_groups(model, args.weight_decay), lr, device)
    train_sampler = EpochSampler(len(train_set), rank, world, shuffle=True, seed=args.seed)
    steps_per_epoch = len(train_sampler) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} is larger than this process's share of the training set ({len(train_sampler)} images)")
    total_steps = args.epochs * steps_per_epoch
    scheduler = WarmupCosine(optimizer, lr, total_steps, int(args.warmup_epochs * steps_per_epoch), args.warmup_lr, args.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, start_step, history = 0, 0, {"losses": [], "metrics": []}

    if args.resume:
        obj = read_checkpoint(args.resume)
        state = obj.get("train_state") if hasattr(obj, "get") else None
        if state is None:
            raise CheckpointError(f"--resume: {args.resume!r} is not a training checkpoint (to start from its weights use --finetune)")
        saved_batch = state.get("args", {}).get("batch_size", args.batch_size)
        if saved_batch != args.batch_size:
            # Steps per epoch, the schedule and the data order all depend on it: resuming would not be exact.
            raise ValueError(f"--resume: the run used --batch-size {saved_batch}, got {args.batch_size}; "
                             "resume with the same batch size (or start a new run with --finetune)")
        load_checkpoint(model, obj)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        start_epoch, start_step, history = state["epoch"], state["step_in_epoch"], state["history"]
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net, backend=args.compile)

    loader_args = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=True, **loader_args)
    val_sampler = EpochSampler(len(val_set), rank, world, shuffle=False, pad=False)
    val_loader = DataLoader(val_set, sampler=val_sampler, **loader_args)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    run_steps = min(args.steps, total_steps) if args.steps else total_steps
    progress = Progress(main_process, args.log_interval, run_steps, start_epoch * steps_per_epoch + start_step)
    params = [p for p in model.parameters() if p.requires_grad]
    global_step = start_epoch * steps_per_epoch + start_step

    for epoch in range(start_epoch, args.epochs):
        train_set.set_epoch(epoch)
        train_sampler.set_epoch(epoch, start=start_step * args.batch_size)
        net.train()
        epoch_losses, skipped, t_last, seen = [], 0, time.perf_counter(), 0
        step = start_step
        for images, labels, n_skipped in train_loader:
            skipped += n_skipped
            if images is None:
                raise DatasetError(f"every image of a training batch was unreadable (epoch {epoch}, step {step}): check the dataset")
            x, labels = to_device(images, device, args.channels_last), labels.to(device)
            if args.mixup > 0 or args.cutmix > 0:
                x, target = mix_batch(x, labels, num_classes, args)
            with autocast(device, args.amp):
                logits, logits_dist = split_outputs(net(x))
            if args.mixup > 0 or args.cutmix > 0:
                loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=args.smoothing)
            if distiller is not None:
                loss = distiller(loss, logits_dist, x)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                clip_gradients(params, args.clip_grad, args.clip_mode)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            epoch_losses.append(loss.detach())
            step += 1
            global_step += 1
            seen += labels.shape[0] * world
            last = step == steps_per_epoch or global_step == args.steps
            if progress.tty or last or step % args.log_interval == 0:
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss is {value} at epoch {epoch} step {step}: lower --lr, or use --amp bf16 / none")
                now = time.perf_counter()
                progress.update(
                    f"epoch {epoch + 1}/{args.epochs} step {step}/{steps_per_epoch} loss {value:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.2e} {seen / max(now - t_last, 1e-9):.1f} img/s",
                    step, last, global_step=global_step,
                )
                t_last, seen = now, 0
            if global_step == args.steps:
                break
        history["losses"] += torch.stack(epoch_losses).tolist() if epoch_losses else []
        finished_epoch = step == steps_per_epoch
        if skipped and main_process:
            warnings.warn(f"epoch {epoch + 1}: skipped {skipped} unreadable training images in this process")
        record = {"epoch": epoch + 1, "steps": step, "lr": optimizer.param_groups[0]["lr"], "train_skipped": skipped}
        if finished_epoch:
            record["val"] = evaluate(model, val_loader, device, args, world)
            if ema is not None:
                record["val_ema"] = evaluate(ema.module, val_loader, device, args, world)
            if main_process:
                v = record["val"]
                progress.write(f"epoch {epoch + 1}: val loss {v['loss']:.4f} top-1 {v['top1']:.2f}% top-5 {v['top5']:.2f}% ({v['images']} images)")
        history["metrics"].append(record)
        if main_process:
            save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, ema, epoch, step, args, history)
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        start_step = 0
        if global_step == args.steps:
            break
    progress.close()
    if main_process and args.save_authors:
        save_checkpoint(model, os.path.join(args.output_dir, "model_authors.pth"), layout="authors")
    return {"losses": history["losses"], "metrics": history["metrics"], "model": model, "checkpoint": ckpt_path}


def main(args) -> int:
    """Entry point of ``python -m shvit train``: exit status 0, or 2 with a message for bad input."""
    try:
        train(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:  # CheckpointError, DatasetError: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
