"""triton backend: the fused GPU kernels in ``shvit_kernels/triton`` (every op, forward and backward).

The backend takes CUDA tensors only. Its availability says why it cannot run at all (Triton not installed,
no CUDA device); each op's ``not_supported_reasons`` declines the calls its kernels do not implement
(float64, groupings other than dense/depthwise, P > 128, ...), which then fall back to other backends.
The kernels themselves also run on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests them.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch

from .. import _dispatch

BACKEND = "triton"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _kernel_modules():
    """The kernel modules, imported on first use: importing Triton costs ~0.25 s, wasted where no GPU is."""
    global _modules, _import_error
    if _modules is None and _import_error is None:
        try:
            from ..triton import _util, conv_bn, ffn, shsa
        except ImportError as e:  # triton missing (or too old for the APIs the kernels use)
            _import_error = f"triton is not installed or cannot be imported ({e})"
        else:
            _modules = {"conv": conv_bn, "ffn": ffn, "shsa": shsa, "util": _util}
    return _modules


_modules: Optional[dict] = None
_import_error: Optional[str] = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _availability() -> List[str]:
    if _import_error is not None:
        return [_import_error]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    if _kernel_modules() is None:
        return [_import_error]
    return []


def _common_reasons(x, *tensors) -> List[str]:
    reasons = []
    if x.device.type != "cuda":
        reasons.append(f"the triton backend takes CUDA tensors only, got 'x' on {x.device}")
    for t in (x, *tensors):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"the triton kernels implement float16, bfloat16 and float32 only, got {t.dtype}")
            break
    if any(t is not None and t.device != x.device for t in tensors):
        reasons.append("all tensors must be on x's device")
    return reasons + (_kernel_modules()["util"].offset_reasons(x, *tensors) if _kernel_modules() else [])


def _conv_bias_act_reasons(x, weight, bias, stride, padding, groups, relu, residual):
    return _common_reasons(x, weight, bias, residual) + _conv_group_reasons(x, weight, groups)


def _conv_group_reasons(x, weight, groups):
    if _kernel_modules() and _kernel_modules()["conv"].conv_kind(weight, groups, x.shape[1]) is None:
        return [f"the triton conv kernels implement groups=1 and depthwise (groups == C_in == C_out) only, got "
                f"groups={groups} with weight {tuple(weight.shape)}"]
    return []


def _conv_bias_act_backward_reasons(grad_out, x, weight, bias, stride, padding, groups, relu, residual, out):
    return _common_reasons(x, grad_out, weight, bias, out) + _conv_group_reasons(x, weight, groups)


def _conv_bn_train_reasons(x, weight, bn_weight, bn_bias, stride, padding, groups, eps, relu, residual):
    return _common_reasons(x, weight, bn_weight, bn_bias, residual) + _conv_group_reasons(x, weight, groups)


def _conv_bn_train_backward_reasons(grad_out, x, weight, bn_weight, bn_bias, mean, var, out, stride, padding,
                                    groups, eps, relu, has_residual):
    return _common_reasons(x, grad_out, weight, bn_weight, bn_bias, out) + _conv_group_reasons(x, weight, groups)


def _ffn_size_reasons(x, backward=False):
    return _kernel_modules()["ffn"].size_reasons(x, backward) if _kernel_modules() else []


def _ffn_fused_reasons(x, w1, b1, w2, b2):
    return _common_reasons(x, w1, b1, w2, b2) + _ffn_size_reasons(x)


def _ffn_fused_backward_reasons(grad_out, x, w1, b1, w2, b2):
    return _common_reasons(x, grad_out, w1, b1, w2, b2) + _ffn_size_reasons(x, True)


def _shsa_size_reasons(qkv_weight, qk_dim):
    reasons = []
    max_p = _kernel_modules()["shsa"].MAX_P if _kernel_modules() else None
    if max_p is not None and qkv_weight.shape[1] > max_p:
        reasons.append(f"the SHSA kernels hold the P x tokens slice on chip; P={qkv_weight.shape[1]} exceeds {max_p}")
    if qk_dim > 64:
        reasons.append(f"the SHSA kernels support qk_dim <= 64, got {qk_dim}")
    return reasons


def _shsa_fused_reasons(x, qkv_weight, qkv_bias, qk_dim, gn_eps):
    return _common_reasons(x, qkv_weight, qkv_bias) + _shsa_size_reasons(qkv_weight, qk_dim)


def _shsa_fused_backward_reasons(grad_out, x, qkv_weight, qkv_bias, out, qk_dim, gn_eps):
    return _common_reasons(x, grad_out, qkv_weight, qkv_bias, out) + _shsa_size_reasons(qkv_weight, qk_dim)


def _shsa_train_reasons(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps):
    return _common_reasons(x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias) + _shsa_size_reasons(qkv_weight, qk_dim)


def _shsa_train_backward_reasons(grad_out, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, mean, var, out,
                                 qk_dim, gn_eps, bn_eps):
    return (_common_reasons(x, grad_out, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, out)
            + _shsa_size_reasons(qkv_weight, qk_dim))


_REASONS = {
    "conv_bias_act": _conv_bias_act_reasons,
    "conv_bias_act_backward": _conv_bias_act_backward_reasons,
    "conv_bn_train": _conv_bn_train_reasons,
    "conv_bn_train_backward": _conv_bn_train_backward_reasons,
    "ffn_fused": _ffn_fused_reasons,
    "ffn_fused_backward": _ffn_fused_backward_reasons,
    "shsa_fused": _shsa_fused_reasons,
    "shsa_fused_backward": _shsa_fused_backward_reasons,
    "shsa_train": _shsa_train_reasons,
    "shsa_train_backward": _shsa_train_backward_reasons,
}

def _kernel(op: str):
    family = op.split("_")[0]

    def run(*args):
        return _kernel_modules()["util"].call_or_fall_back(op, getattr(_kernel_modules()[family], op), _dispatch.backend("reference").kernels[op], *args)

    run.__name__ = f"triton_{op}"
    return run


_dispatch.set_availability(BACKEND, _availability)
if _import_error is None:
    for _op, _reasons in _REASONS.items():
        _dispatch.register_kernel(_op, BACKEND, _kernel(_op), _reasons)
