"""SHViT (Single-Head Vision Transformer, Yun & Ro, CVPR 2024) on top of the ``shvit_kernels`` ops.

Module names, tree and initialisation follow the authors' implementation, so their released checkpoints load
as they are. The forwards differ: every compute step goes through a ``shvit_kernels`` op, with the ReLUs and
residual adds that follow a Conv+BN folded into the same op call, so faster backends slot in unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import shvit_kernels
from shvit_kernels.tracing import untraced_check

from .fuse import (FusedFFN, FusedLinear, FusedStem, fuse, fuse_bn_linear, fuse_conv_bn, fuse_shsa, fuse_squeeze_excite,
                   is_same_shape_depthwise)
from .layers import ResidualInForward, bn_step, spatial_mean

__all__ = [
    "BN_Linear",
    "BasicBlock",
    "Conv2d_BN",
    "FFN",
    "PatchMerging",
    "Residual",
    "SHSA",
    "SHViT",
    "SqueezeExcite",
    "Stem",
]

MIN_INPUT_SIZE = 64  # three stride-2 stages after the stride-16 stem: the last grid is at least 1x1
INPUT_MULTIPLE = 16


class Conv2d_BN(ResidualInForward, nn.Module):
    """Conv2d (no bias) + BatchNorm2d, run as one ``shvit_kernels.conv_bn`` call (optionally + residual, ReLU)."""

    # Synchronised BatchNorm: a torch.distributed process group passed to the op (set by shvit.convert_sync_batchnorm).
    process_group = None

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(b)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def conv_bn_params(self) -> tuple:
        """(conv weight, bn weight, bn bias, running mean, running var), the parameter tuple of the ops."""
        bn = self.bn
        return self.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var

    def forward(self, x: torch.Tensor, relu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        use_batch_stats, momentum = bn_step(self.bn, self.training)
        return shvit_kernels.conv_bn(
            x,
            *self.conv_bn_params(),
            stride=self.c.stride[0],
            padding=self.c.padding[0],
            groups=self.c.groups,
            training=use_batch_stats,
            momentum=momentum,
            eps=self.bn.eps,
            relu=relu,
            residual=residual,
            process_group=self.process_group,
        )

    def fused_replacement(self) -> nn.Module:
        return fuse_conv_bn(self)


class BN_Linear(nn.Module):
    """BatchNorm1d then Linear: the classifier head."""

    def __init__(self, a: int, b: int, std: float = 0.02):
        super().__init__()
        self.bn = nn.BatchNorm1d(a)
        self.l = nn.Linear(a, b)
        nn.init.trunc_normal_(self.l.weight, std=std, a=-2.0, b=2.0)
        nn.init.zeros_(self.l.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.bn(x))

    def fused_replacement(self) -> nn.Module:
        return fuse_bn_linear(self)


class Residual(nn.Module):
    """``x + m(x)``; when ``m`` can add the residual inside its own last op it is asked to."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.m, "forward_residual", None)
        if fused is not None:
            return fused(x)
        return x + self.m(x)

    def fused_replacement(self) -> Optional[nn.Module]:
        """A same-shape depthwise Conv+BN absorbs the residual into its centre taps; others fuse inside."""
        if isinstance(self.m, Conv2d_BN) and is_same_shape_depthwise(self.m):
            return fuse_conv_bn(self.m, add_identity=True)
        return None


class FFN(nn.Module):
    """1x1 Conv+BN C -> H, ReLU, 1x1 Conv+BN H -> C (the second BN starts at zero)."""

    # Synchronised BatchNorm: a torch.distributed process group passed to the op (set by shvit.convert_sync_batchnorm).
    process_group = None

    def __init__(self, ed: int, h: int):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.pw1(x, relu=True))

    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        bn1, bn2 = self.pw1.bn, self.pw2.bn
        # shvit_kernels.ffn takes one momentum and one eps for both BatchNorms; otherwise run the two convs.
        one_setting = (
            bn1.eps == bn2.eps
            and bn1.momentum is not None
            and bn1.momentum == bn2.momentum
            and bn1.running_mean is not None
            and bn2.running_mean is not None
        )
        if not one_setting:
            return self.pw2(self.pw1(x, relu=True), residual=x)
        _, momentum = bn_step(bn1, self.training)
        bn_step(bn2, self.training)
        return shvit_kernels.ffn(
            x, self.pw1.conv_bn_params(), self.pw2.conv_bn_params(), training=self.training, momentum=momentum, eps=bn1.eps,
            process_group=self.process_group,
        )

    def fused_replacement(self) -> nn.Module:
        return FusedFFN(fuse_conv_bn(self.pw1), fuse_conv_bn(self.pw2))


class SHSA(ResidualInForward, nn.Module):
    """Single-head self-attention on the first ``pdim`` channels; the other channels pass through.

    ``shvit_kernels.shsa`` does GroupNorm, qkv Conv+BN, attention, the concatenation and the ReLU of
    ``proj.0``; ``proj.1`` then runs as a Conv+BN with the block's residual.
    """

    # Synchronised BatchNorm: a torch.distributed process group passed to the op (set by shvit.convert_sync_batchnorm).
    process_group = None

    def __init__(self, dim: int, qk_dim: int, pdim: int):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.pdim = pdim
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, pdim)
        self.qkv = Conv2d_BN(pdim, 2 * qk_dim + pdim)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(dim, dim, bn_weight_init=0.0))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        bn = self.qkv.bn
        use_batch_stats, momentum = bn_step(bn, self.training)
        attended = shvit_kernels.shsa(
            x,
            self.pre_norm.weight,
            self.pre_norm.bias,
            self.qkv.c.weight,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            qk_dim=self.qk_dim,
            training=use_batch_stats,
            momentum=momentum,
            gn_eps=self.pre_norm.eps,
            bn_eps=bn.eps,
            process_group=self.process_group,
        )
        return self.proj[1](attended, residual=residual)

    def fused_replacement(self) -> nn.Module:
        return fuse_shsa(self)


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round to the nearest multiple of ``divisor`` (ties up), never more than 10% below ``v`` (timm's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """Channel gate: spatial mean -> fc1 -> ReLU -> fc2 -> sigmoid -> scale the input."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, rd_divisor: int = 8):
        super().__init__()
        rd_channels = make_divisible(channels * rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 convs act on a 1x1 map: as linear layers on (B, C) they skip a convolution's setup per call
        # (on CPU about 0.3 ms each for microseconds of arithmetic). Same parameters and result.
        gate = F.linear(spatial_mean(x), self.fc1.weight.flatten(1), self.fc1.bias)
        gate = F.linear(self.act(gate), self.fc2.weight.flatten(1), self.fc2.bias)
        return x * gate.sigmoid()[:, :, None, None]

    def fused_replacement(self) -> nn.Module:
        return fuse_squeeze_excite(self)


class PatchMerging(nn.Module):
    """Stride-2 downsampler: 1x1 expand (4x), ReLU, 3x3 depthwise stride 2, ReLU, squeeze-excite, 1x1 project."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = Conv2d_BN(dim, hid_dim, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.se = SqueezeExcite(hid_dim, 0.25)
        self.conv3 = Conv2d_BN(hid_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x, relu=True)
        x = self.conv2(x, relu=True)
        return self.conv3(self.se(x))


class BasicBlock(nn.Module):
    """Residual depthwise 3x3 conv, residual SHSA (type "s") or nothing (type "i"), residual FFN."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, type: str):
        super().__init__()
        if type not in ("s", "i"):
            raise ValueError(f"BasicBlock type must be 's' (attention) or 'i' (no mixer), got {type!r}")
        self.conv = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0))
        self.mixer = Residual(SHSA(dim, qk_dim, pdim)) if type == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, int(dim * 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


class Stem(nn.Sequential):
    """Four 3x3 stride-2 Conv+BN (indices 0, 2, 4, 6) with ReLUs between (indices 1, 3, 5).

    Kept as a Sequential for the authors' state_dict names; each ReLU runs inside the preceding conv op.
    """

    def __init__(self, in_chans: int, dim: int):
        widths = (in_chans, dim // 8, dim // 4, dim // 2, dim)
        layers: List[nn.Module] = []
        for i in range(4):
            if i:
                layers.append(nn.ReLU())
            layers.append(Conv2d_BN(widths[i], widths[i + 1], 3, 2, 1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (0, 2, 4):
            x = self[i](x, relu=True)
        return self[6](x)

    def fused_replacement(self) -> nn.Module:
        return FusedStem(*(fuse_conv_bn(m) if isinstance(m, Conv2d_BN) else m for m in self))


def conv_ffn(dim: int) -> nn.Sequential:
    """The residual depthwise conv + residual FFN pair on each side of a PatchMerging."""
    return nn.Sequential(Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)), Residual(FFN(dim, int(dim * 2))))


class SHViT(nn.Module):
    """SHViT: stem (stride 16), three stages (strides 16, 32, 64), pooled BN+Linear head(s)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (128, 256, 384),
        partial_dim: Sequence[int] = (32, 64, 96),
        qk_dim: Sequence[int] = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        types: Sequence[str] = ("s", "s", "s"),
        distillation: bool = False,
    ):
        super().__init__()
        if not (len(embed_dim) == len(partial_dim) == len(qk_dim) == len(depth) == len(types) == 3):
            raise ValueError("SHViT has three stages: embed_dim, partial_dim, qk_dim, depth and types need 3 entries each")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.distillation = distillation
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.variant: Optional[str] = None  # set by create_model; checked when loading checkpoints
        self.is_fused = False
        # Layout a fused model runs in, whatever the input's: "auto" (measured per machine when autotuning is on,
        # else channels_last), "channels_last", or "as_given".
        self.input_layout = "auto"
        # A fused model's CUDA inference forward replayed from a CUDA graph per input signature (opt-in until a
        # GPU run has checked it; see _graphed_features).
        self.cuda_graphs = False

        self.patch_embed = Stem(in_chans, embed_dim[0])
        for i in range(3):
            blocks: List[nn.Module] = []
            if i > 0:
                blocks += [conv_ffn(embed_dim[i - 1]), PatchMerging(embed_dim[i - 1], embed_dim[i]), conv_ffn(embed_dim[i])]
            blocks += [BasicBlock(embed_dim[i], qk_dim[i], partial_dim[i], types[i]) for _ in range(depth[i])]
            self.add_module(f"blocks{i + 1}", nn.Sequential(*blocks))
        self.feature_info = [
            dict(num_chs=embed_dim[i], reduction=16 * 2 ** i, module=f"blocks{i + 1}") for i in range(3)
        ]
        self.reset_classifier(num_classes)

    # ----------------------------------------------------------------------------------------------------
    # Classifier
    # ----------------------------------------------------------------------------------------------------
    def _new_head(self, num_classes: int) -> nn.Module:
        return BN_Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (and head_dist) by freshly initialised ones for ``num_classes`` (0: no head)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"SHViT only supports average pooling, got global_pool={global_pool!r}")
        old = getattr(self, "head", None)
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        if self.distillation:
            self.head_dist = self._new_head(num_classes)
        reference = next(old.parameters(), None) if old is not None else None
        for head in (self.head, getattr(self, "head_dist", None)) if self.distillation else (self.head,):
            head.train(self.training)
            if reference is not None:  # keep the device and dtype of a model that was moved
                head.to(reference.device, reference.dtype)

    # ----------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------
    @untraced_check
    def check_input(self, x) -> None:
        """Raise a ValueError unless ``x`` is (B, in_chans, H, W) with H, W >= 64 and multiples of 16."""
        expected = (
            f"(B, {self.in_chans}, H, W) with B >= 1 and H, W multiples of {INPUT_MULTIPLE} and at least {MIN_INPUT_SIZE}"
        )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SHViT expects a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"SHViT expects a 4-D input {expected}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"SHViT expects {self.in_chans} input channels {expected}, got shape {tuple(x.shape)}")
        if b < 1:
            raise ValueError(f"SHViT expects a batch of at least one image {expected}, got shape {tuple(x.shape)}")
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE or h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(f"SHViT expects an input {expected}, got spatial size {h}x{w}")

    def _features(self, x: torch.Tensor, stem_to_channels_last: bool = False, logits: bool = False) -> torch.Tensor:
        """The last stage's map, or with ``logits`` the head's output on it (one recording for both)."""
        if self.is_fused and not torch.compiler.is_compiling():
            if shvit_kernels.replay.replayable(x):
                return self._replayed_features(x, stem_to_channels_last, logits)
            if getattr(self, "cuda_graphs", False) and shvit_kernels.replay.graph_replayable(x):
                return self._graphed_features(x, stem_to_channels_last, logits)
        return self._module_features(x, stem_to_channels_last, logits)

    def _stem(self, x: torch.Tensor, to_channels_last: bool) -> torch.Tensor:
        # Only a stem that takes the flag gets it (the unfused Stem's forward has no such argument).
        return self.patch_embed(x, out_channels_last=True) if to_channels_last else self.patch_embed(x)

    def _module_features(self, x: torch.Tensor, stem_to_channels_last: bool = False, logits: bool = False):
        with self._training_memory():
            x = self._stem(x, stem_to_channels_last)
            x = self.blocks1(x)
            x = self.blocks2(x)
            x = self.blocks3(x)
        return self.forward_head(x) if logits else x

    def _training_memory(self):
        """Training: each Conv+BN output that its kept conv output can give back is recomputed in the backward
        pass instead of held (``shvit_kernels.recompute_cheap_tensors``)."""
        if self.training and not torch.compiler.is_compiling():  # the block itself stays off without autograd
            return shvit_kernels.recompute_cheap_tensors()
        return contextlib.nullcontext()

    def _replayed_features(self, x: torch.Tensor, stem_to_channels_last: bool = False, logits: bool = False):
        """The fused CPU inference forward's kernels replayed from one recorded chain (see shvit_kernels.replay:
        S1 at batch 16 on one thread spent a tenth of its forward in the Python between its 58 kernels)."""
        key = (x.shape, x.dtype, x.stride(), stem_to_channels_last, logits, torch.get_num_threads(),
               shvit_kernels.dispatch.selection_state())
        return self._recorded_features(x, stem_to_channels_last, logits, "_kernel_chains", key,
                                       shvit_kernels.replay.KernelChain, 16)

    def _graphed_features(self, x: torch.Tensor, stem_to_channels_last: bool = False, logits: bool = False):
        """The fused CUDA inference forward replayed from a CUDA graph (shvit_kernels.replay.CudaGraphReplay; S1 at
        batch 256, bf16, H200: 5.5 ms per batch op by op, 2.9 ms replayed). Each captured signature holds its
        graph's memory and a copy of its input: at most four are kept. The first call per signature runs the
        modules three times (two on a side stream, one captured)."""
        key = (x.shape, x.dtype, x.stride(), x.device, stem_to_channels_last, logits,
               shvit_kernels.dispatch.selection_state())
        return self._recorded_features(x, stem_to_channels_last, logits, "_cuda_graphs", key,
                                       shvit_kernels.replay.CudaGraphReplay, 4)

    def _recorded_features(self, x: torch.Tensor, stem_to_channels_last: bool, logits: bool, store: str, key: tuple,
                           recording, limit: int) -> torch.Tensor:
        """The features from ``recording`` (a KernelChain or CudaGraphReplay class) made for ``key``, while the
        dispatcher's state, the module tree and its tensors are those recorded and no module has hooks; otherwise
        the modules run as usual. At most ``limit`` recordings are kept (many input sizes: start afresh)."""
        recordings = self.__dict__.setdefault(store, {})
        entry = recordings.get(key)
        if entry is not None:
            replay, tree = entry
            if _tree_unchanged(tree):
                if replay is None:
                    return self._module_features(x, stem_to_channels_last, logits)
                if replay.valid():
                    return replay(x)
        tree = _tree_snapshot(self)
        if not _tree_unchanged(tree):  # hooks: they must see the module calls
            return self._module_features(x, stem_to_channels_last, logits)
        if len(recordings) >= limit:
            recordings.clear()
        constants = [t for t in tree[2] if isinstance(t, torch.Tensor)]
        features = functools.partial(self._module_features, stem_to_channels_last=stem_to_channels_last,
                                     logits=logits)
        replay, out = recording.capture(features, x, constants)
        recordings[key] = (replay, tree)
        return out

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kernel_chains", None)  # recorded for the old dtype / device
        self.__dict__.pop("_cuda_graphs", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kernel_chains", None)  # kernels and tensors of this process: recorded again after loading
        state.pop("_cuda_graphs", None)
        return state

    def _run_layout(self, x: torch.Tensor) -> Optional[torch.memory_format]:
        """The memory format a fused model moves its input to (None: keep the input's).

        The cpp and Triton kernels read channels_last with contiguous channel vectors; an NCHW input would send
        the convolutions to slower paths (Zen 4, S1: 0.59x ONNX Runtime with NCHW vs 0.9x channels_last).
        """
        layout = getattr(self, "input_layout", "auto")  # models pickled before the attribute existed: "auto"
        if not self.is_fused or layout == "as_given":
            return None
        if layout == "channels_last":
            return torch.channels_last
        if layout != "auto":
            raise ValueError(f"input_layout must be 'auto', 'channels_last' or 'as_given', got {layout!r}")
        device_type = x.device.type
        if (
            # Compiling first: Dynamo cannot trace the environment read behind autotune.mode() (a graph break
            # under fullgraph=True whenever SHVIT_KERNELS_AUTOTUNE was set).
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or shvit_kernels.autotune.mode() == "off"
            # Timed under a forced backend the choice would hold for automatic dispatch too (S1 at batch 1: the
            # reference's near-equal times cached NCHW, 2.9x slower on the cpp kernels; Intel Xeon, 2026-12-01).
            or shvit_kernels.dispatch.forced_backend() is not None
            or torch.is_grad_enabled()
            or shvit_kernels.tracing.inlining_reference()  # counting or exporting: timing runs would be recorded
            or (device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        ):
            return torch.channels_last
        formats = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
        candidates = {"channels_last": lambda t: self._features(*self._to_channels_last(t)),
                      "nchw": lambda t: self._features(t.contiguous())}
        # "model_input_layout": caches from before the forced-backend rule may hold "model_layout" entries timed
        # under one; they are left unread.
        # The stem's class in the key: a model with other modules (a benchmark's plain-torch copy) times its own.
        key = f"model_input_layout {self.variant or type(self).__name__} {type(self.patch_embed).__name__}"
        name = shvit_kernels.autotune.choose(key, device_type, (x,), candidates)
        return formats[name]

    def _to_channels_last(self, x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """``(input, stem_to_channels_last)`` for a channels_last run: a fused CPU stem takes an NCHW image batch as
        it is and returns channels_last (its kernel interleaves each image's planes as it reaches the image, in
        cache, where moving the batch first cost 0.3-1.6% of the forward: batch 16, Zen 5); else the input moved."""
        if (getattr(self.patch_embed, "takes_nchw_images", False) and x.device.type == "cpu" and x.is_contiguous()
                and not x.is_contiguous(memory_format=torch.channels_last)):
            return x, True
        return shvit_kernels.to_channels_last(x), False

    def _enter(self, x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """The input checked, in the layout the run takes, and whether the stem is to return channels_last."""
        self.check_input(x)
        fmt = self._run_layout(x)
        if fmt is torch.channels_last:
            return self._to_channels_last(x)
        return (x if fmt is None else x.contiguous(memory_format=fmt)), False

    @staticmethod
    def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` in ``x``'s layout, as eager PyTorch would have returned it for that input."""
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._like_input(self._features(*self._enter(x)), x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        intermediates_only: bool = False,
    ):
        """Stage outputs (strides 16, 32, 64), timm-style.

        ``indices``: None for all three stages, an int n for the last n, or a list of stage indices (0..2).
        Returns ``(final_features, [stage outputs])``, or only the list when ``intermediates_only``.
        """
        if indices is None:
            take = [0, 1, 2]
        elif isinstance(indices, int):
            if not 1 <= indices <= 3:
                raise ValueError(f"indices as an int is the number of last stages to return (1..3), got {indices}")
            take = list(range(3 - indices, 3))
        else:
            indices = [int(i) for i in indices]
            if any(not -3 <= i < 3 for i in indices):
                raise ValueError(f"stage indices must be in 0..2 (or -3..-1), got {indices}")
            take = sorted({i % 3 for i in indices})
        given = x
        intermediates = []
        with self._training_memory():
            x = self._stem(*self._enter(x))
            for i, stage in enumerate((self.blocks1, self.blocks2, self.blocks3)):
                x = stage(x)
                if i in take:
                    intermediates.append(self._like_input(x, given))
        return intermediates if intermediates_only else (self._like_input(x, given), intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if not pre_logits and self._pooled_head(x):
            return shvit_kernels.pooled_linear(x, self.head.weight, self.head.bias)
        x = spatial_mean(x)
        if pre_logits:
            return x
        if not self.distillation:
            return self.head(x)
        logits, logits_dist = self.head(x), self.head_dist(x)
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def _pooled_head(self, x: torch.Tensor) -> bool:
        """Whether the head runs as one ``pooled_linear`` call on the last map: on the CPU (elsewhere the op has
        only its reference), a fused model's single head (:class:`FusedLinear`) that no hook or instance forward
        must see called. As one kernel the head is a step of the replayed forward: S1's forward on one thread 0.54 ms
        (batch 1, of 7.8) and 0.74 ms (batch 16, of 60) faster than with ATen's mean and the head module after the
        replay (Intel Xeon family 6 model 167, interleaved)."""
        head = self.head
        hooks = nn.modules.module
        return (x.is_cpu and type(head) is FusedLinear and not self.distillation and not head._forward_hooks
                and not head._forward_pre_hooks and "forward" not in head.__dict__
                and not hooks._global_forward_hooks and not hooks._global_forward_pre_hooks)

    def forward(self, x: torch.Tensor):
        x, stem_to_channels_last = self._enter(x)
        if self._pooled_head(x):
            return self._features(x, stem_to_channels_last, logits=True)
        return self.forward_head(self._features(x, stem_to_channels_last))

    def fuse(self) -> "SHViT":
        """A new eval-mode model with every BatchNorm folded (see ``shvit.fuse``); this model is untouched."""
        return fuse(self)


def _tree_snapshot(model: nn.Module) -> tuple:
    """The module tree's children, parameters and buffers as parallel tuples of (dict, name, entry), each
    module's forward-hook dicts, and the modules, for :func:`_tree_unchanged`. (Not the modules' instance dicts: the
    model's holds its recordings, and a cycle through them sent torch.export's tree walk into infinite recursion.)"""
    tables, names, entries = [], [], []
    modules = tuple(model.modules())
    for module in modules:
        for table in (module._modules, module._parameters, module._buffers):
            for name, entry in table.items():
                tables.append(table)
                names.append(name)
                entries.append(entry)
    hook_tables = tuple(t for m in modules for t in (m._forward_hooks, m._forward_pre_hooks))
    return tuple(tables), tuple(names), tuple(entries), hook_tables, modules


def _tree_unchanged(tree: tuple) -> bool:
    """The tree holds the same modules and tensors under the same names, and no forward hook is set or forward
    replaced on an instance (either must see the module calls). Checked by C-level iteration: right after a forward
    (caches swept) a Python loop over the same entries took 0.33-0.36 ms of S1's fused forward and this takes
    0.10-0.22 ms (batch 1 and 16, one thread, Intel Xeon family 6 model 167, interleaved with the check skipped)."""
    tables, names, entries, hook_tables, modules = tree
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return (all(map(operator.is_, map(dict.get, tables, names), entries)) and not any(hook_tables)
            and not any(map(operator.contains, map(vars, modules), itertools.repeat("forward"))))
