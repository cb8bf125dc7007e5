"""Inference fusion: fold every BatchNorm (and the GroupNorm affine) into the weights, in a copy of the model.

After ``fuse``:
* each ``Conv2d_BN`` is a :class:`FusedConv2d` (conv with bias, ``shvit_kernels.conv_bias_act``);
* the stem is a :class:`FusedStem` of four of them, one ``shvit_kernels.patch_embed`` call on the CPU;
* ``Residual(depthwise 3x3 Conv2d_BN)`` is one depthwise :class:`FusedConv2d` with 1.0 added to the centre tap;
* ``Residual(FFN)`` runs one ``shvit_kernels.ffn_fused`` call;
* ``SHSA`` folds GroupNorm's affine and the qkv BatchNorm into ``shvit_kernels.shsa_fused`` weights, and its
  projection conv takes the block's residual;
* ``SqueezeExcite`` is one ``shvit_kernels.squeeze_excite`` call on the CPU (elsewhere its two 1x1 convs run as
  :class:`FusedConv2d` calls on the pooled 1x1 map);
* ``BN_Linear`` is a :class:`FusedLinear` (an ``nn.Linear`` run as a 1x1 ``conv_bias_act`` call).

Each model module names its stand-in through its ``fused_replacement()`` (``shvit.model``); this module holds
the fused modules and the folding, and imports no model module.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

import shvit_kernels

from .layers import ResidualInForward, spatial_mean

__all__ = [
    "FusedConv2d", "FusedFFN", "FusedLinear", "FusedSHSA", "FusedSqueezeExcite", "FusedStem", "fuse", "fuse_bn_linear", "fuse_conv_bn", "fuse_shsa",
    "fuse_squeeze_excite", "input_major", "keep_normal_tensors",
]


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (C_out, C_in, 1, 1) stored so that its (C_in, C_out) transpose is contiguous."""
    return weight.transpose(0, 1).contiguous().transpose(0, 1)


@torch.no_grad()
def keep_normal_tensors(module: nn.Module) -> None:
    """Replace inference tensors among ``module``'s own parameters and buffers (made or moved under
    ``torch.inference_mode``) by normal copies. The CPU kernels keep packed copies of a weight per weight version,
    which an inference tensor lacks, so they repacked such weights on every call: S4's bf16 forward ran 1.25x
    slower with a model converted under inference mode (Zen 5, one thread, 2026-12-02)."""
    # New objects: a Parameter whose data was swapped under inference mode keeps no version counter.
    with torch.inference_mode(False):
        for name, p in module._parameters.items():
            if p is not None and p.is_inference():
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_inference():
                module._buffers[name] = b.clone()


class FusedConv2d(ResidualInForward, nn.Conv2d):
    """Conv2d with bias run through ``shvit_kernels.conv_bias_act`` (optionally + residual, ReLU).

    On CPU an fp32 or bf16 1x1 weight is kept input-channel major (see :func:`input_major`): the C++ GEMMs take
    W^T as their B operand and read that layout in place (bf16: widened, or packed into pairs, row by row), where
    a contiguous weight costs a transpose on every call (fp32: 1-2 ms of S1's 43 ms batch-16 forward; bf16 widened
    to fp32: up to 1.4x an FFN call on S4's last stage, pair products: no difference; Intel Xeon family 6 model
    207, 2026-12-01). SHSA's qkv weight too: its kernel's micro-kernel GEMM reads W^T the same way. Every backend
    accepts either layout with the same result. Other dtypes and other devices keep the weight contiguous. The
    layout follows ``.to()`` / ``.cuda()`` / ``.float()`` / ``.bfloat16()``.
    """

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.inference_mode(False):
            self.lay_out_weight()
        keep_normal_tensors(self)
        return self

    @torch.no_grad()
    def lay_out_weight(self) -> None:
        w = self.weight
        pointwise = tuple(w.shape[2:]) == (1, 1) and self.groups == 1
        cpu_gemm_dtype = w.dtype in (torch.float32, torch.bfloat16)
        if pointwise and w.device.type == "cpu" and cpu_gemm_dtype:
            w.data = input_major(w)
        elif not w.is_contiguous():
            w.data = w.contiguous()

    def forward(self, x: torch.Tensor, relu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return shvit_kernels.conv_bias_act(
            x,
            self.weight,
            self.bias,
            stride=self.stride[0],
            padding=self.padding[0],
            groups=self.groups,
            relu=relu,
            residual=residual,
        )


class FusedStem(nn.Sequential):
    """SHViT's stem, four 3x3 stride-2 :class:`FusedConv2d` (indices 0, 2, 4, 6; ReLUs between), run as one
    ``shvit_kernels.patch_embed`` call on the CPU, which takes the four layers image by image while an image's
    intermediate maps are in cache: the stem alone 1.07x / 1.06x (S1 / S4, bf16) and 1.05x / 1.07x (fp32) the four
    conv calls, bit-identical (Zen 5, batch 16, one thread, interleaved). Elsewhere the convs run one by one."""

    # Its forward takes out_channels_last, and an NCHW image batch with it needs no move first (a model then passes
    # its input as given); a subclass whose forward runs other code sets this False.
    takes_nchw_images = True

    def forward(self, x: torch.Tensor, out_channels_last: bool = False) -> torch.Tensor:
        """``out_channels_last``: return channels_last whatever x's layout (see ``shvit_kernels.patch_embed``)."""
        convs = (self[0], self[2], self[4], self[6])
        if x.device.type == "cpu":
            return shvit_kernels.patch_embed(x, *(t for conv in convs for t in (conv.weight, conv.bias)),
                                             out_channels_last=out_channels_last)
        for conv in convs[:3]:
            x = conv(x, relu=True)
        x = convs[3](x)
        return x.contiguous(memory_format=torch.channels_last) if out_channels_last else x


class FusedFFN(nn.Module):
    """FFN with folded BatchNorms; inside a Residual the whole block is one ``ffn_fused`` call."""

    def __init__(self, pw1: FusedConv2d, pw2: FusedConv2d):
        super().__init__()
        self.pw1 = pw1
        self.act = nn.ReLU()
        self.pw2 = pw2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.pw1(x, relu=True))

    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        return shvit_kernels.ffn_fused(x, self.pw1.weight, self.pw1.bias, self.pw2.weight, self.pw2.bias)


class FusedSqueezeExcite(nn.Module):
    """SqueezeExcite as one ``shvit_kernels.squeeze_excite`` call (pool, fc1 + ReLU, fc2, sigmoid, scale); fc1 / fc2
    are :class:`FusedConv2d` modules with the unfused module's parameter names and shapes. Inside S1's bf16 forward
    (Zen 5, batch 16, module hooks) its two gates took 0.33 ms on one thread and 0.24 ms on two, against 0.77 /
    0.76 ms as ATen's mean, sigmoid and multiply around two conv_bias_act calls: the op pools and scales each image
    while it is in this core's cache, and its mean no longer copies a bf16 map to fp32 first. On other devices,
    where squeeze_excite has no kernel but the reference, the gate keeps ATen's mean, sigmoid and multiply around
    the fc convs' conv_bias_act calls (which a forced GPU backend runs)."""

    def __init__(self, fc1: FusedConv2d, fc2: FusedConv2d):
        super().__init__()
        self.fc1 = fc1
        self.act = nn.ReLU()
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return shvit_kernels.squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        gate = self.fc2(self.fc1(spatial_mean(x)[:, :, None, None], relu=True))
        return x * gate.sigmoid()


class FusedLinear(nn.Linear):
    """``nn.Linear`` (the folded classifier head) whose 2-D calls run as a 1x1 ``shvit_kernels.conv_bias_act`` on
    the (N, C, 1, 1) map; same parameters, same result to rounding. Inside S1's batch-16 forward (Zen 5, one
    thread) the head took 266 us (fp32) / 254 us (bf16) as ATen's addmm against 165 / 104-115 us so: the conv
    kernel keeps its packed weight between calls."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_normal_tensors(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        return shvit_kernels.conv_bias_act(x[:, :, None, None], self.weight[:, :, None, None], self.bias).flatten(1)


class FusedSHSA(ResidualInForward, nn.Module):
    """SHSA with GroupNorm's affine and the qkv BatchNorm folded into ``qkv`` (for ``shsa_fused``)."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, qkv: FusedConv2d, proj: nn.Sequential, gn_eps: float):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.pdim = pdim
        self.gn_eps = gn_eps
        self.qkv = qkv
        self.proj = proj

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        attended = shvit_kernels.shsa_fused(x, self.qkv.weight, self.qkv.bias, qk_dim=self.qk_dim, gn_eps=self.gn_eps)
        return self.proj[1](attended, residual=residual)


def _conv_with(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> FusedConv2d:
    """A FusedConv2d with ``template``'s geometry holding ``weight`` and ``bias``."""
    conv = FusedConv2d(
        weight.shape[1] * template.groups,
        weight.shape[0],
        template.kernel_size,
        template.stride,
        template.padding,
        groups=template.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    conv.lay_out_weight()
    return conv


@torch.no_grad()
def fuse_conv_bn(m: nn.Module, add_identity: bool = False) -> FusedConv2d:
    """Fold ``m.bn`` into ``m.c``. ``add_identity`` also folds ``x + m(x)`` (a same-shape depthwise conv with
    centred padding) by adding 1.0 to each channel's centre tap."""
    bn = m.bn
    weight, bias = shvit_kernels.fold_bn(m.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    if add_identity:
        if not is_same_shape_depthwise(m):
            raise ValueError("only a depthwise, stride-1, centred-padding Conv2d_BN can absorb its residual")
        k_h, k_w = weight.shape[-2:]
        weight = weight.clone()
        weight[:, 0, k_h // 2, k_w // 2] += 1.0
    return _conv_with(m.c, weight, bias)


def is_same_shape_depthwise(m: nn.Module) -> bool:
    """Whether a Conv2d_BN ``m`` is depthwise, stride 1, with centred padding (so ``x + m(x)`` can fold)."""
    c = m.c
    k_h, k_w = c.kernel_size
    return (
        c.groups == c.in_channels == c.out_channels
        and c.stride == (1, 1)
        and c.dilation == (1, 1)
        and k_h % 2 == 1
        and k_w % 2 == 1
        and c.padding == (k_h // 2, k_w // 2)
    )


@torch.no_grad()
def fuse_bn_linear(m: nn.Module) -> FusedLinear:
    """Fold the BatchNorm1d before the Linear: W' = W * s[None, :], b' = W @ t + b."""
    bn, linear = m.bn, m.l
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = FusedLinear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * scale[None, :])
    fused.bias.copy_(linear.weight @ shift + linear.bias)
    return fused


@torch.no_grad()
def fuse_shsa(m: nn.Module) -> FusedSHSA:
    bn = m.qkv.bn
    weight, bias = shvit_kernels.fold_shsa(
        m.pre_norm.weight, m.pre_norm.bias, m.qkv.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    proj = nn.Sequential(nn.ReLU(), fuse_conv_bn(m.proj[1]))
    qkv = _conv_with(m.qkv.c, weight, bias)  # input-major on the CPU like every 1x1: the kernel reads W^T in place
    return FusedSHSA(m.dim, m.qk_dim, m.pdim, qkv, proj, m.pre_norm.eps)


@torch.no_grad()
def fuse_squeeze_excite(m: nn.Module) -> FusedSqueezeExcite:
    return FusedSqueezeExcite(_conv_with(m.fc1, m.fc1.weight, m.fc1.bias), _conv_with(m.fc2, m.fc2.weight, m.fc2.bias))


def _fused_replacement(module: nn.Module) -> Optional[nn.Module]:
    """The fused stand-in for ``module`` (its ``fused_replacement()``), or None to recurse into its children."""
    replacement = getattr(module, "fused_replacement", None)
    return replacement() if replacement is not None else None


def _fuse_children(module: nn.Module) -> int:
    """Replace every fusable descendant in place; returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        replacement = _fused_replacement(child)
        if replacement is None:
            replaced += _fuse_children(child)
        else:
            setattr(module, name, replacement)
            replaced += 1
    return replaced


def _cannot_fuse(model: nn.Module) -> TypeError:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if getattr(model, "is_fused", False) or any(isinstance(m, (FusedConv2d, FusedFFN, FusedSHSA)) for m in model.modules()):
        return TypeError(f"shvit.fuse: {kind} is already fused (nothing left to fold)")
    hint = ""
    if type(model).__name__ == "SHViT":
        hint = "; for timm's or the authors' SHViT call shvit.accelerate(model) first, then fuse the result"
    return TypeError(f"shvit.fuse: {kind} has no shvit modules to fuse (Conv2d_BN, FFN, SHSA, BN_Linear){hint}")


def fuse(model: nn.Module) -> nn.Module:
    """Return a new eval-mode model with all normalisation folded into weights; ``model`` is left untouched.

    Works on a whole :class:`SHViT` or any of its submodules. The result computes the same function as
    ``model.eval()`` (to fp32 rounding), with fewer and fused op calls. A model with nothing to fuse (already
    fused, or not built from this package's modules: see :func:`shvit.accelerate`) raises a TypeError.
    """
    fused = copy.deepcopy(model).eval()
    replacement = _fused_replacement(fused)
    if replacement is not None:
        fused = replacement.eval()
    elif not _fuse_children(fused):
        raise _cannot_fuse(model)
    if hasattr(fused, "is_fused"):  # an SHViT
        fused.is_fused = True
    for m in fused.modules():  # folded under torch.inference_mode: see keep_normal_tensors
        keep_normal_tensors(m)
    return fused
