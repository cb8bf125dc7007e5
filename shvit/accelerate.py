"""Put an existing SHViT on the fused kernels: ``fast = shvit.accelerate(model)``.

Accepted: timm's ``timm.models.shvit.SHViT`` and models with the authors' module tree (ysj9909/SHViT:
``patch_embed``, ``blocks1..3``, ``head``, optional ``head_dist``), unfused. The result is a new
:class:`shvit.SHViT` with the same configuration, weights, running statistics, BatchNorm/GroupNorm settings
(eps, momentum), per-module train/eval flags and ``requires_grad`` flags, on the same device and dtype. The
source model is left untouched; build the optimizer for the new model's parameters.

Anything that the kernels would compute differently is refused with an error naming the module: other
activations or norms, stochastic depth, head dropout, another pooling, a fused (BN-folded) source model.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn as nn

from .checkpoint import guess_variant, timm_to_authors
from .model import FFN, SHSA, Conv2d_BN, SHViT
from .variants import PRETRAINED_CFGS

__all__ = ["AccelerateError", "accelerate"]

# Containers the two implementations build SHViT from (by class name, so neither needs to be imported here).
_CONTAINERS = {
    "SHViT", "Sequential", "Residual", "Conv2d_BN", "Conv2dNorm", "BN_Linear", "NormLinear", "PatchMerging", "FFN",
    "SHSA", "BasicBlock", "StageBlock", "SqueezeExcite", "SEModule", "SelectAdaptivePool2d",
}
_LEAVES = (
    nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear, nn.GroupNorm, nn.ReLU, nn.Identity, nn.Sigmoid,
    nn.Flatten, nn.AdaptiveAvgPool2d, nn.Dropout,
)


def _is_timm_sigmoid(m: nn.Module) -> bool:
    """timm's squeeze-excite gate (``timm.layers.activations.Sigmoid``: ``x.sigmoid()``)."""
    return type(m).__name__ == "Sigmoid" and type(m).__module__.startswith("timm.layers")


class AccelerateError(TypeError):
    """The model is not an SHViT that shvit.accelerate can reproduce exactly."""


def _kind(model: nn.Module) -> str:
    cls = type(model)
    if cls.__name__ == "SHViT" and cls.__module__.startswith("timm."):
        return "timm"
    if cls.__name__ == "SHViT" and all(hasattr(model, n) for n in ("patch_embed", "blocks1", "blocks2", "blocks3", "head")):
        return "authors"
    hint = ""
    for wrapper_attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, wrapper_attr, None), nn.Module):
            hint = f" (it wraps one in .{wrapper_attr}: pass model.{wrapper_attr})"
    raise AccelerateError(
        "shvit.accelerate expects an SHViT from timm (timm.models.shvit.SHViT) or one with the authors' module tree "
        f"(patch_embed, blocks1..3, head), got {cls.__module__}.{cls.__qualname__}{hint}"
    )


def _check_modules(model: nn.Module, kind: str) -> None:
    """Every module must be one the kernels reproduce exactly; raise naming the first that is not."""
    for name, m in model.named_modules():
        where = f"module {name or '(root)'!r} ({type(m).__name__})"
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or m.dilation != (1, 1)):
            raise AccelerateError(f"shvit.accelerate: {where} uses padding_mode={m.padding_mode!r}, dilation={m.dilation}; SHViT's convs use zeros / 1")
        if isinstance(m, nn.GroupNorm) and m.num_groups != 1:
            raise AccelerateError(f"shvit.accelerate: {where} has {m.num_groups} groups; SHSA's pre_norm has one")
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise AccelerateError(f"shvit.accelerate: {where} has dropout p={m.p}, which SHViT here does not have")
        if isinstance(m, _LEAVES) or _is_timm_sigmoid(m):
            continue
        if type(m).__name__ not in _CONTAINERS:
            raise AccelerateError(
                f"shvit.accelerate: {where} is not part of SHViT as timm and the authors build it "
                "(other activations, norms or layers are not supported)"
            )
        if type(m).__name__ == "Residual" and float(getattr(m, "drop", 0.0) or 0.0) > 0:
            raise AccelerateError(f"shvit.accelerate: {where} has stochastic depth drop={m.drop}, which the kernels do not implement")
    if kind == "timm":
        if float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:
            raise AccelerateError(f"shvit.accelerate: the timm model has drop_rate={model.drop_rate}; SHViT here has no head dropout")
        pool = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
        if pool != "avg" or not isinstance(getattr(model, "flatten", None), nn.Flatten):
            raise AccelerateError(f"shvit.accelerate: the timm model pools with {pool!r}; SHViT here uses average pooling")
        if len(model.stages) != 3:
            raise AccelerateError(f"shvit.accelerate: the timm model has {len(model.stages)} stages (pruned?); SHViT has 3")


def _config(state: Dict[str, torch.Tensor], model: nn.Module) -> dict:
    """SHViT constructor arguments from a state_dict in the authors' layout."""
    def width(key: str) -> int:
        if key not in state:
            raise AccelerateError(
                f"shvit.accelerate: the model has no {key!r}: it does not have SHViT's module tree, or it is fused "
                "(pass the unfused model)"
            )
        return int(state[key].shape[0])

    embed, depth, pdim, qk, types = [], [], [], [], []
    for stage, first in ((1, 0), (2, 3), (3, 3)):
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"blocks{stage}.")})
        blocks = [i for i in indices if i >= first]
        if not blocks:
            raise AccelerateError(f"shvit.accelerate: stage {stage} has no blocks; SHViT needs at least one per stage")
        embed.append(width(f"blocks{stage}.{blocks[0]}.conv.m.c.weight"))
        depth.append(len(blocks))
        attends = [f"blocks{stage}.{i}.mixer.m.qkv.c.weight" in state for i in blocks]
        if any(attends) != all(attends):
            raise AccelerateError(f"shvit.accelerate: stage {stage} mixes blocks with and without attention; SHViT has one type per stage")
        if all(attends):
            qkv = state[f"blocks{stage}.{blocks[0]}.mixer.m.qkv.c.weight"]
            types.append("s")
            pdim.append(int(qkv.shape[1]))
            qk.append((int(qkv.shape[0]) - int(qkv.shape[1])) // 2)
        else:
            types.append("i")
            pdim.append(embed[-1] // 4)  # unused without attention
            qk.append(16)
    head = state.get("head.l.weight")
    return dict(
        in_chans=int(state["patch_embed.0.c.weight"].shape[1]) if "patch_embed.0.c.weight" in state else 3,
        num_classes=int(head.shape[0]) if head is not None else 0,
        embed_dim=tuple(embed), partial_dim=tuple(pdim), qk_dim=tuple(qk), depth=tuple(depth), types=tuple(types),
        distillation="head_dist.l.weight" in state or isinstance(getattr(model, "head_dist", None), nn.Module),
    )


def _authors_name(name: str) -> str:
    """A module path of timm's tree in the authors' layout (the state_dict renaming applied to a path)."""
    if not name:
        return name
    return next(iter(timm_to_authors({name + ".x": None})))[: -len(".x")]


def _one(values, what: str):
    found = set(values)
    if len(found) != 1:
        raise AccelerateError(f"shvit.accelerate: the model's tensors are on several {what}s ({sorted(map(str, found))}); move it to one first")
    return found.pop()


@torch.no_grad()
def accelerate(model: nn.Module) -> SHViT:
    """A :class:`shvit.SHViT` computing what ``model`` (timm's or the authors' SHViT) computes, on the kernels.

    Outputs agree to fp32 rounding in eval and in train mode (batch statistics, running-statistics updates);
    an :class:`shvit.SHViT` is returned as a copy. Anything else raises :class:`AccelerateError`.
    """
    if isinstance(model, SHViT):
        return copy.deepcopy(model)
    if not isinstance(model, nn.Module):
        raise AccelerateError(f"shvit.accelerate expects an nn.Module, got {type(model).__name__}")
    kind = _kind(model)
    _check_modules(model, kind)
    source_state = model.state_dict()
    state = timm_to_authors(source_state) if kind == "timm" else dict(source_state)
    config = _config(state, model)
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    device = _one((t.device for t in tensors), "device")
    dtype = _one((t.dtype for t in tensors), "dtype")

    fast = SHViT(**config)
    fast.variant = guess_variant(state)
    if fast.variant is not None:
        fast.pretrained_cfg = dict(PRETRAINED_CFGS[fast.variant])
    missing, unexpected = _compare_keys(fast.state_dict(), state)
    if missing or unexpected:
        raise AccelerateError(
            "shvit.accelerate: the model's parameters do not fit SHViT's module tree (a fused model? pass the "
            f"unfused one): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    try:
        fast.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AccelerateError(f"shvit.accelerate: the model's parameters do not fit SHViT's module tree: {e}") from None
    fast.to(device=device, dtype=dtype)

    source_modules = {(_authors_name(n) if kind == "timm" else n): m for n, m in model.named_modules()}
    _copy_module_settings(fast, source_modules)
    source_params = {(_authors_name(n.rsplit(".", 1)[0]) + "." + n.rsplit(".", 1)[1]) if kind == "timm" else n: p
                     for n, p in model.named_parameters()}
    for name, p in fast.named_parameters():
        p.requires_grad_(source_params[name].requires_grad)
    return fast


def _compare_keys(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor]):
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    return missing, unexpected


def _copy_module_settings(fast: SHViT, source: Dict[str, nn.Module]) -> None:
    """Train/eval flags and norm settings, module by module; the fused ops read their module's flag."""
    for name, m in fast.named_modules():
        src = source.get(name)
        if src is None:
            continue
        m.training = src.training
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.eps, m.momentum = src.eps, src.momentum
        elif isinstance(m, nn.GroupNorm):
            m.eps = src.eps
    for name, m in fast.named_modules():
        # Conv2d_BN, SHSA and FFN run their BatchNorms inside one op that follows the module's own flag.
        if isinstance(m, Conv2d_BN):
            m.training = m.bn.training
        elif isinstance(m, SHSA):
            m.training = m.qkv.bn.training
        elif isinstance(m, FFN):
            if m.pw1.bn.training != m.pw2.bn.training:
                raise AccelerateError(f"shvit.accelerate: the two BatchNorms of FFN {name!r} are in different train/eval modes")
            m.training = m.pw1.bn.training
