"""cuda backend: hand-written CUDA kernels (``csrc/cuda``) for the depthwise 3x3 Conv+BN family and SHSA.

``setup.py`` builds ``shvit_kernels._C_cuda`` when torch has CUDA and nvcc is found. This module loads it if
present; otherwise the backend stays registered but unavailable, with the reason. Each kernel takes exactly its
op schema's positional arguments. Calls the kernels cannot take (CPU tensors, float64, convolutions other than
depthwise 3x3 stride 1/2 padding 1, qk_dim != 16, P > 128) are declined through ``not_supported_reasons``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _dispatch

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


def availability_reasons() -> List[str]:
    if _module is None:
        detail = f" ({_load_error})" if _load_error else ""
        return [f"the CUDA extension is not built (torch has no CUDA / nvcc not found){detail}"]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Per-call checks: pure Python on shapes, dtypes and devices, so they are testable without a GPU.
# ---------------------------------------------------------------------------------------------------------
Named = Sequence[Tuple[str, Optional[torch.Tensor]]]


def _tensor_reasons(named: Named) -> List[str]:
    reasons = []
    x = named[0][1]
    off = [f"'{n}' ({t.device})" for n, t in named if t is not None and t.device.type != "cuda"]
    if off:
        reasons.append("cuda backend needs CUDA tensors; on another device: " + ", ".join(off))
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"cuda backend supports float32, float16 and bfloat16, got {x.dtype}")
    if x.dim() != 4:
        reasons.append(f"cuda backend needs a 4-D 'x', got shape {tuple(x.shape)}")
    elif x.numel() == 0:
        reasons.append("cuda backend needs a non-empty 'x'")
    return reasons


def _depthwise_reasons(x, weight, stride, padding, groups) -> List[str]:
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
        return []
    return [f"{DEPTHWISE_ONLY}; got weight {tuple(weight.shape)}, stride {stride}, padding {padding}, groups {groups}"]


def _shsa_reasons(x, qkv_weight, qk_dim) -> List[str]:
    reasons = []
    if qk_dim != QK_DIM:
        reasons.append(f"cuda SHSA kernels need qk_dim == {QK_DIM}, got {qk_dim}")
    p = qkv_weight.shape[1] if qkv_weight.dim() >= 2 else 0
    if not 1 <= p <= MAX_P:
        reasons.append(f"cuda SHSA kernels support partial dim P up to {MAX_P}, got {p}")
    return reasons


def conv_bias_act_reasons(x, weight, bias, stride, padding, groups, relu, residual):
    return _tensor_reasons([("x", x), ("weight", weight), ("bias", bias), ("residual", residual)]) + _depthwise_reasons(
        x, weight, stride, padding, groups
    )


def conv_bias_act_backward_reasons(grad_out, x, weight, bias, stride, padding, groups, relu, residual, out):
    named = [("x", x), ("grad_out", grad_out), ("weight", weight), ("bias", bias), ("residual", residual), ("out", out)]
    return _tensor_reasons(named) + _depthwise_reasons(x, weight, stride, padding, groups)


def conv_bn_train_reasons(x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual):
    named = [("x", x), ("weight", weight), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("residual", residual)]
    return _tensor_reasons(named) + _depthwise_reasons(x, weight, stride, padding, groups)


def conv_bn_train_backward_reasons(
    grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding, groups, eps, relu, has_residual
):
    named = [("x", x), ("grad_out", grad_out), ("weight", weight), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
             ("mean", mean), ("var", var), ("out", out)]
    return _tensor_reasons(named) + _depthwise_reasons(x, weight, stride, padding, groups)


def shsa_fused_reasons(x, qkv_weight, qkv_bias, qk_dim, gn_eps):
    return _tensor_reasons([("x", x), ("qkv_weight", qkv_weight), ("qkv_bias", qkv_bias)]) + _shsa_reasons(
        x, qkv_weight, qk_dim
    )


def shsa_fused_backward_reasons(grad_out, x, qkv_weight, qkv_bias, out, qk_dim, gn_eps):
    named = [("x", x), ("grad_out", grad_out), ("qkv_weight", qkv_weight), ("qkv_bias", qkv_bias), ("out", out)]
    return _tensor_reasons(named) + _shsa_reasons(x, qkv_weight, qk_dim)


def shsa_train_reasons(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps):
    named = [("x", x), ("gn_weight", gn_weight), ("gn_bias", gn_bias), ("qkv_weight", qkv_weight),
             ("bn_weight", bn_weight), ("bn_bias", bn_bias)]
    return _tensor_reasons(named) + _shsa_reasons(x, qkv_weight, qk_dim)


def shsa_train_backward_reasons(
    grad_out, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, mean, var, out, qk_dim, gn_eps, bn_eps
):
    named = [("x", x), ("grad_out", grad_out), ("gn_weight", gn_weight), ("gn_bias", gn_bias),
             ("qkv_weight", qkv_weight), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("mean", mean),
             ("var", var), ("out", out)]
    return _tensor_reasons(named) + _shsa_reasons(x, qkv_weight, qk_dim)


# Op name -> its check; the kernel of the same name in the extension takes the schema's arguments.
CHECKS = {
    "conv_bias_act": conv_bias_act_reasons,
    "conv_bias_act_backward": conv_bias_act_backward_reasons,
    "conv_bn_train": conv_bn_train_reasons,
    "conv_bn_train_backward": conv_bn_train_backward_reasons,
    "shsa_fused": shsa_fused_reasons,
    "shsa_fused_backward": shsa_fused_backward_reasons,
    "shsa_train": shsa_train_reasons,
    "shsa_train_backward": shsa_train_backward_reasons,
}


def _kernel(op: str):
    def run(*args):
        if _module is None:
            raise RuntimeError(f"shvit_kernels cuda backend: {availability_reasons()[0]}")
        return getattr(_module, op)(*args)

    run.__name__ = f"cuda_{op}"
    run.__qualname__ = run.__name__
    return run


def register() -> None:
    _load()
    _dispatch.set_availability(BACKEND, availability_reasons)
    for op, check in CHECKS.items():
        _dispatch.register_kernel(op, BACKEND, _kernel(op), check)


register()
