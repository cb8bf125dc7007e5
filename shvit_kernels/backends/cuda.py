"""cuda backend: hand-written CUDA kernels (``csrc/cuda``) for the depthwise 3x3 Conv+BN family and SHSA.

``setup.py`` builds ``shvit_kernels._C_cuda`` when torch has CUDA and nvcc is found. This module loads it if
present; otherwise the backend stays registered but unavailable, with the reason. Each kernel takes exactly its
op schema's positional arguments. Calls the kernels cannot take (CPU tensors, float64, convolutions other than
depthwise 3x3 stride 1/2 padding 1, qk_dim != 16, P > 128) are declined through ``not_supported_reasons``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List, Optional

import torch

from .. import dispatch

BACKEND = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QK_DIM = 16
MAX_P = 128
DEPTHWISE_ONLY = (
    "cuda backend implements depthwise 3x3 only (groups == channels, 3x3 kernel, stride 1 or 2, padding 1); "
    "triton/reference handle this"
)

_module: Optional[ModuleType] = None
_load_error: Optional[str] = None


def _load() -> None:
    global _module, _load_error
    try:
        _module = importlib.import_module("shvit_kernels._C_cuda")
    except ImportError as e:  # not built (no CUDA torch / no nvcc), or built against another torch
        _module, _load_error = None, str(e)


def extension() -> Optional[ModuleType]:
    """The loaded ``shvit_kernels._C_cuda`` (its functions take the schema's arguments), or None."""
    return _module


def availability_reasons() -> List[str]:
    if _module is None:
        detail = f" ({_load_error})" if _load_error else ""
        return [f"the CUDA extension is not built (torch has no CUDA / nvcc not found){detail}"]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Per-call reasons, called with the call's arguments by name: pure Python on shapes and dtypes, so they are
# testable without a GPU (``dispatch.explain(..., device_type="cuda")`` on CPU tensors).
# ---------------------------------------------------------------------------------------------------------
def tensor_reasons(x, **args) -> List[str]:
    """Any op: a supported dtype, a non-empty 4-D 'x', every tensor on x's device."""
    reasons = []
    off = [f"'{n}' ({t.device})" for n, t in args.items() if isinstance(t, torch.Tensor) and t.device != x.device]
    if off:
        reasons.append(f"cuda backend needs every tensor on x's device ({x.device}); elsewhere: " + ", ".join(off))
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"cuda backend supports float32, float16 and bfloat16, got {x.dtype}")
    if x.dim() != 4:
        reasons.append(f"cuda backend needs a 4-D 'x', got shape {tuple(x.shape)}")
    elif x.numel() == 0:
        reasons.append("cuda backend needs a non-empty 'x'")
    return reasons


def depthwise_reasons(x, weight, stride, padding, groups, **args) -> List[str]:
    """The Conv+BN family: depthwise 3x3, stride 1 or 2, padding 1."""
    reasons = tensor_reasons(x, weight=weight, **args)
    c = x.shape[1] if x.dim() == 4 else None
    ok = (
        weight.dim() == 4
        and tuple(weight.shape[1:]) == (1, 3, 3)
        and weight.shape[0] == c
        and groups == c
        and padding == 1
        and stride in (1, 2)
    )
    if ok:
        return reasons
    return reasons + [
        f"{DEPTHWISE_ONLY}; got weight {tuple(weight.shape)}, stride {stride}, padding {padding}, groups {groups}"
    ]


def shsa_reasons(x, qkv_weight, qk_dim, **args) -> List[str]:
    """The SHSA family: qk_dim 16, partial dim P up to 128."""
    reasons = tensor_reasons(x, qkv_weight=qkv_weight, **args)
    if qk_dim != QK_DIM:
        reasons.append(f"cuda SHSA kernels need qk_dim == {QK_DIM}, got {qk_dim}")
    p = qkv_weight.shape[1] if qkv_weight.dim() >= 2 else 0
    if not 1 <= p <= MAX_P:
        reasons.append(f"cuda SHSA kernels support partial dim P up to {MAX_P}, got {p}")
    return reasons


def conv_bn_train_reasons(x, weight, stride, padding, groups, keep_conv_output=False, **args) -> List[str]:
    reasons = depthwise_reasons(x, weight, stride, padding, groups, **args)
    if keep_conv_output:
        reasons.append("cuda conv_bn_train does not keep the conv output (keep_conv_output=True)")
    return reasons


def conv_bn_train_backward_reasons(x, weight, stride, padding, groups, conv_output=None, **args) -> List[str]:
    reasons = depthwise_reasons(x, weight, stride, padding, groups, **args)
    if conv_output is not None:
        reasons.append("cuda conv_bn_train_backward recomputes the conv output and takes no kept one (conv_output)")
    return reasons


# Op name -> its reasons; the extension's function of the same name takes the schema's arguments (the
# conv_bn_train pair: all but the kept conv output, see _KEPT_OUTPUT_ARGS).
NOT_SUPPORTED = {
    "conv_bias_act": depthwise_reasons,
    "conv_bias_act_backward": depthwise_reasons,
    "conv_bn_train": conv_bn_train_reasons,
    "conv_bn_train_backward": conv_bn_train_backward_reasons,
    "shsa_fused": shsa_reasons,
    "shsa_fused_backward": shsa_reasons,
    "shsa_train": shsa_reasons,
    "shsa_train_backward": shsa_reasons,
}


# The schema's last argument of these ops (keep_conv_output / conv_output) is declined by the reasons above and not
# passed to the extension; conv_bn_train's kept-output slot comes back empty.
_KEPT_OUTPUT_ARGS = ("conv_bn_train", "conv_bn_train_backward")


def binding_arguments(op: str) -> tuple:
    """The schema arguments the extension's function for ``op`` takes, in order."""
    names = dispatch.op_arguments(op)
    return names[:-1] if op in _KEPT_OUTPUT_ARGS else names


def _kernel(op: str):
    taken = len(binding_arguments(op))

    def run(*args):
        if _module is None:
            raise RuntimeError(f"shvit_kernels cuda backend: {availability_reasons()[0]}")
        args = dispatch.with_defaults(op, args)
        result = getattr(_module, op)(*args[:taken])
        return (*result, args[0].new_empty((0,))) if op == "conv_bn_train" else result

    run.__name__ = f"cuda_{op}"
    run.__qualname__ = run.__name__
    return run


def register() -> None:
    _load()
    dispatch.register_backend(
        BACKEND,
        device_types=("cuda",),
        verify_first_use=True,  # not yet run on a GPU: each signature's first result is checked
        availability=availability_reasons,
        kernels={op: _kernel(op) for op in NOT_SUPPORTED},
        not_supported=NOT_SUPPORTED,
    )


register()
