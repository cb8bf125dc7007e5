"""Checkpoint loading and saving.

``load_checkpoint`` accepts, from a path, a URL or an in-memory object:
* the authors' release format ``{'model': state_dict}`` (``shvit_s1.pth`` ... ``shvit_s4.pth``);
* a bare state_dict (``model.state_dict()``), also with a DistributedDataParallel ``module.`` prefix;
* timm's layout (``stages.S.downsample.i`` / ``stages.S.blocks.j``), remapped to the authors' names;
* this project's format, written by :func:`save_checkpoint`, which records the variant and the number of
  classes so that a checkpoint of another variant is refused with a clear message.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn

from .model import SHViT
from .variants import MODEL_CONFIGS

__all__ = [
    "CheckpointError",
    "LoadResult",
    "guess_variant",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "save_checkpoint",
    "timm_to_authors",
]

FORMAT = "shvit-kernels"
FORMAT_VERSION = 1
LAYOUTS = ("shvit", "authors")
HEAD_PREFIXES = ("head.", "head_dist.")
MAX_LISTED_KEYS = 10

Source = Union[str, os.PathLike, Mapping[str, Any]]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (wrong variant, keys or shapes)."""


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]
    mismatched_keys: List[Tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)


# --------------------------------------------------------------------------------------------------------
# Reading and unpacking
# --------------------------------------------------------------------------------------------------------
def _is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://", "file://"))


def read_checkpoint(source: Source, weights_only: bool = True) -> Mapping[str, Any]:
    """The raw checkpoint object from a path, a URL (cached under $TORCH_HOME/hub/checkpoints) or a dict.

    ``weights_only=False`` is needed for training checkpoints that pickle other objects (e.g. argparse
    arguments); use it only for files you trust.
    """
    if isinstance(source, Mapping):
        return source
    if _is_url(source):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=weights_only)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint must be a path, a URL or a dict, got {type(source).__name__}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(source)!r}")
    if os.path.getsize(source) == 0:
        raise CheckpointError(f"checkpoint file {os.fspath(source)!r} is empty")
    try:
        return torch.load(source, map_location="cpu", weights_only=weights_only)
    except (EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # A truncated or corrupt file surfaces as any of these, depending on where it ends.
        raise CheckpointError(
            f"cannot read checkpoint {os.fspath(source)!r}: truncated, corrupt or not a torch.save file "
            f"({type(e).__name__}: {e})"
        ) from e


def timm_to_authors(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename timm's stage containers to the authors' ``blocks1..3`` layout (spec section 3)."""
    downsample_slots = ("0.0", "0.1", "1", "2.0", "2.1")
    pattern = re.compile(r"^stages\.(\d+)\.(downsample|blocks)\.(\d+)\.(.+)$")
    renamed = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match is None:
            renamed[key] = value  # patch_embed.*, head.*; anything else is reported as unexpected later
            continue
        stage, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "blocks":
            slot = str(index if stage == 0 else index + 3)
        elif stage > 0 and index < len(downsample_slots):
            slot = downsample_slots[index]
        else:
            renamed[key] = value
            continue
        renamed[f"blocks{stage + 1}.{slot}.{rest}"] = value
    return renamed


def _unpack(obj: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict in the authors' layout, metadata) from any of the accepted formats."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    meta: Dict[str, Any] = {}
    if obj.get("format") == FORMAT or isinstance(obj.get("model"), Mapping):
        meta = {k: obj[k] for k in ("variant", "num_classes", "distillation") if k in obj}
        key = "state_dict" if obj.get("format") == FORMAT else "model"
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(
                f"checkpoint has format {obj.get('format')!r} but no '{key}' dict "
                f"(keys: {_format_keys(sorted(map(str, obj)))})"
            )
        state_dict = obj[key]
    elif isinstance(obj.get("state_dict"), Mapping):
        state_dict = obj["state_dict"]
    else:
        state_dict = obj
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            "checkpoint is not a state_dict (or {'model': state_dict}): entries that are not tensors: "
            + _format_keys(not_tensors)
        )
    state_dict = dict(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if any(k.startswith("stages.") for k in state_dict):
        state_dict = timm_to_authors(state_dict)
    return state_dict, meta


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The variant whose widths and depths a state_dict (authors' layout) has, or None."""
    try:
        widths = tuple(
            state_dict[k].shape[0] for k in ("patch_embed.6.c.weight", "blocks2.1.conv3.c.weight", "blocks3.1.conv3.c.weight")
        )
    except (KeyError, IndexError):
        return None
    depths = []
    for stage, first_block in ((1, 0), (2, 3), (3, 3)):
        indices = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"blocks{stage}.")}
        depths.append(len([i for i in indices if i >= first_block]))
    for name, config in MODEL_CONFIGS.items():
        if tuple(config["embed_dim"]) == widths and tuple(config["depth"]) == tuple(depths):
            return name
    return None


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
def _format_keys(keys: List[str], limit: int = MAX_LISTED_KEYS) -> str:
    shown = [f"    {k}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"    ... and {len(keys) - limit} more")
    return "\n" + "\n".join(shown)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "variant", None) or type(model).__name__


def _check_variant(model: nn.Module, meta: Mapping[str, Any], strict: bool) -> None:
    ckpt_variant, model_variant = meta.get("variant"), getattr(model, "variant", None)
    if ckpt_variant and model_variant and ckpt_variant != model_variant:
        message = (
            f"checkpoint is for {ckpt_variant} but the model is {model_variant}; "
            f"create the model with shvit.create_model({ckpt_variant!r})"
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=4)


def _compare(model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], drop_head: bool) -> LoadResult:
    def expected(key: str) -> bool:
        # Old checkpoints may lack BatchNorm step counters; a dropped head is expected to be missing.
        return key.endswith("num_batches_tracked") or (drop_head and key.startswith(HEAD_PREFIXES))

    missing = [k for k in model_state if k not in state_dict and not expected(k)]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [
        (k, tuple(v.shape), tuple(model_state[k].shape))
        for k, v in state_dict.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    return LoadResult(missing, unexpected, mismatched)


def _mismatch_message(model: nn.Module, result: LoadResult, state_dict: Mapping[str, torch.Tensor]) -> str:
    lines = [f"checkpoint does not fit the model ({_model_name(model)}):"]
    if result.missing_keys:
        lines.append(f"  missing keys ({len(result.missing_keys)}):" + _format_keys(result.missing_keys))
    if result.unexpected_keys:
        lines.append(f"  unexpected keys ({len(result.unexpected_keys)}):" + _format_keys(result.unexpected_keys))
    if result.mismatched_keys:
        shapes = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in result.mismatched_keys]
        lines.append(f"  shape mismatches ({len(shapes)}):" + _format_keys(shapes))
    guessed = guess_variant(state_dict)
    if guessed and guessed != getattr(model, "variant", guessed):
        lines.append(f"hint: the checkpoint looks like a {guessed} checkpoint; create the model with shvit.create_model({guessed!r})")
    wrong = [k for k in result.missing_keys + result.unexpected_keys + [m[0] for m in result.mismatched_keys]]
    if wrong and all(k.startswith(HEAD_PREFIXES) for k in wrong):
        lines.append(
            "hint: only the classifier differs; pass drop_head=True to keep the model's own head (fine-tuning), "
            "or create the model with the checkpoint's num_classes / distillation"
        )
    return "\n".join(lines)


def _bad_values(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Entries with NaN / infinite values, and BatchNorm running variances below zero, as 'key (what)'."""
    bad = []
    for k, v in state_dict.items():
        if not v.is_floating_point():
            continue
        if not bool(torch.isfinite(v).all()):
            bad.append(f"{k} (NaN or infinite)")
        elif k.endswith("running_var") and bool((v < 0).any()):
            bad.append(f"{k} (negative variance)")
    return bad


def _load_state_dict(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], meta: Mapping[str, Any], strict: bool, drop_head: bool
) -> LoadResult:
    if getattr(model, "is_fused", False):
        raise CheckpointError("cannot load a checkpoint into a fused model; load it into the model, then call shvit.fuse")
    _check_variant(model, meta, strict)
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    model_state = model.state_dict()
    result = _compare(model_state, state_dict, drop_head)
    if any(result):
        message = _mismatch_message(model, result, state_dict)
        if strict:
            raise CheckpointError(message)
        warnings.warn(message + "\n(strict=False: loading the keys that fit)", stacklevel=3)
    mismatched = {k for k, _, _ in result.mismatched_keys}
    fitting = {k: v for k, v in state_dict.items() if k in model_state and k not in mismatched}
    bad_values = _bad_values(fitting)
    if bad_values:
        message = "checkpoint has values no trained model has: " + _format_keys(bad_values)
        if strict:
            raise CheckpointError(message + " (strict=False loads it anyway, with a warning)")
        warnings.warn(message, stacklevel=3)
    model.load_state_dict(fitting, strict=False)  # copies into the existing tensors (casts dtype, keeps device)
    return result


def load_checkpoint(
    model: nn.Module,
    checkpoint: Source,
    strict: bool = True,
    drop_head: bool = False,
    weights_only: bool = True,
) -> LoadResult:
    """Load a checkpoint (path, URL, or dict in any accepted format) into ``model`` in place.

    ``strict=True``: missing or unexpected keys, shape mismatches or a checkpoint of another variant raise
    a :class:`CheckpointError` that lists them. ``strict=False``: load every key that fits and warn about
    the rest. ``drop_head=True``: ignore the checkpoint's ``head``/``head_dist`` and keep the model's own
    (fine-tuning on another number of classes). Returns the (missing, unexpected, mismatched) keys.
    """
    state_dict, meta = _unpack(read_checkpoint(checkpoint, weights_only=weights_only))
    return _load_state_dict(model, state_dict, meta, strict=strict, drop_head=drop_head)


def load_pretrained(model: nn.Module, source: Source, weights_only: bool = True) -> LoadResult:
    """Load pretrained weights for ``create_model(pretrained=...)``.

    Everything must fit except the classifier: a head of another size is dropped (the model keeps its
    fresh head, as timm does), and a distillation head the model does not have is ignored.
    """
    state_dict, meta = _unpack(read_checkpoint(source, weights_only=weights_only))
    model_state = model.state_dict()
    if "head_dist.l.weight" in state_dict and "head_dist.l.weight" not in model_state:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head_dist.")}
        meta = {k: v for k, v in meta.items() if k != "distillation"}
    head_differs = any(
        k not in model_state or model_state[k].shape != v.shape for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)
    ) or any(k not in state_dict for k in model_state if k.startswith(HEAD_PREFIXES) and not k.endswith("num_batches_tracked"))
    return _load_state_dict(model, state_dict, meta, strict=True, drop_head=head_differs)


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------
def save_checkpoint(model: SHViT, path: Union[str, os.PathLike], layout: str = "shvit") -> None:
    """Save ``model``'s weights (on CPU) with its variant, num_classes and distillation flag.

    ``layout="shvit"``: ``{'format': 'shvit-kernels', 'format_version', 'variant', ..., 'state_dict'}``.
    ``layout="authors"``: ``{'model': state_dict, 'variant', ...}``, which the authors' code also loads.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if getattr(model, "is_fused", False):
        raise ValueError("save the unfused model: a fused model's weights do not follow the checkpoint layout")
    meta = {
        "variant": getattr(model, "variant", None),
        "num_classes": getattr(model, "num_classes", None),
        "distillation": getattr(model, "distillation", False),
    }
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "shvit":
        obj = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "state_dict": state_dict}
    else:
        obj = {"model": state_dict, **meta}
    torch.save(obj, path)
