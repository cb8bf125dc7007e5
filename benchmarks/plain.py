"""Plain-PyTorch baselines: the same module tree and weights, but forwards built from torch ops only.

The baselines must not go through ``shvit_kernels`` custom ops (or the dispatcher), so that eager, compile,
CUDA graphs and ONNX export see ordinary aten ops. Each supported module gets its class swapped for a subclass
whose forward calls torch directly: parameters, buffers and state_dict names stay as they are.
The fused-model forwards reuse the ops' reference kernels, which are written in plain torch.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

import shvit
from shvit_kernels.ops.conv_bn import conv_bias_act_reference
from shvit_kernels.ops.ffn import ffn_fused_reference
from shvit_kernels.ops.shsa import attend, shsa_fused_reference


def _finish(out: torch.Tensor, relu: bool, residual: Optional[torch.Tensor]) -> torch.Tensor:
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


# Fused (inference) model: BN already folded into the weights.
class PlainFusedConv2d(shvit.FusedConv2d):
    def forward(self, x, relu: bool = False, residual: Optional[torch.Tensor] = None):
        return conv_bias_act_reference(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups, relu, residual)


class PlainFusedFFN(shvit.FusedFFN):
    def forward_residual(self, x):
        return ffn_fused_reference(x, self.pw1.weight, self.pw1.bias, self.pw2.weight, self.pw2.bias)


class PlainFusedSHSA(shvit.FusedSHSA):
    def forward(self, x, residual: Optional[torch.Tensor] = None):
        return self.proj[1](shsa_fused_reference(x, self.qkv.weight, self.qkv.bias, self.qk_dim, self.gn_eps), residual=residual)


class PlainFusedSqueezeExcite(shvit.FusedSqueezeExcite):
    def forward(self, x):
        return shvit.SqueezeExcite.forward(self, x)


class PlainFusedStem(shvit.FusedStem):
    takes_nchw_images = False  # the model moves an NCHW input itself, as plain PyTorch would be used

    def forward(self, x):
        return shvit.model.Stem.forward(self, x)


class PlainFusedLinear(shvit.FusedLinear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


# Unfused (trainable) model: nn.Conv2d + nn.BatchNorm2d modules, as a user of plain PyTorch would write it.
class PlainConv2dBN(shvit.Conv2d_BN):
    def forward(self, x, relu: bool = False, residual: Optional[torch.Tensor] = None):
        return _finish(self.bn(self.c(x)), relu, residual)


class PlainFFN(shvit.FFN):
    def forward_residual(self, x):
        return self.pw2(self.pw1(x, relu=True), residual=x)


class PlainSHSA(shvit.SHSA):
    def forward(self, x, residual: Optional[torch.Tensor] = None):
        b, _, h, w = x.shape
        qkv = self.qkv(self.pre_norm(x[:, : self.pdim])).reshape(b, -1, h * w)
        return self.proj[1](attend(qkv, x, self.qk_dim), residual=residual)


_PLAIN = {
    shvit.FusedConv2d: PlainFusedConv2d,
    shvit.FusedFFN: PlainFusedFFN,
    shvit.FusedSHSA: PlainFusedSHSA,
    shvit.FusedSqueezeExcite: PlainFusedSqueezeExcite,
    shvit.FusedLinear: PlainFusedLinear,
    shvit.FusedStem: PlainFusedStem,
    shvit.Conv2d_BN: PlainConv2dBN,
    shvit.FFN: PlainFFN,
    shvit.SHSA: PlainSHSA,
}


def to_plain(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (fused or not) whose forward uses plain torch ops only."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        swap = _PLAIN.get(type(m))
        if swap is not None:
            m.__class__ = swap
    return plain


def uses_custom_ops(model: torch.nn.Module) -> bool:
    """True if any module would still call a shvit_kernels op (for tests and sanity checks)."""
    return any(type(m) in _PLAIN for m in model.modules())


__all__ = ["to_plain", "uses_custom_ops"]
