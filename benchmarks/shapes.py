"""Every op call SHViT S1..S4 make, at their exact shapes, with builders and minimum-traffic / FLOP counts.

The layers are found by running the models once under a dispatch mode that records each ``shvit::`` op call
(the fused model in eval for the inference ops, the unfused model in train mode for the training ops), so the
list follows the model code rather than a hand-kept table. Inputs come from the op tests' builders
(``shvit_kernels.testing.cases``), so benchmarks and tests exercise the same argument conventions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shvit_kernels.testing import cases as op_cases

QK = op_cases.QK
MODES = ("forward", "backward", "both")
# Ops whose calls the model makes (the backward ops are timed through autograd of these).
FORWARD_OPS = ("conv_bias_act", "conv_bn_train", "ffn_fused", "shsa_fused", "shsa_train")


@dataclass(frozen=True)
class Layer:
    """One distinct op call of a model, batch left open. ``count``: calls per forward with this signature."""

    op: str
    c_in: int
    c_out: int
    h: int
    w: int
    k: int = 1
    stride: int = 1
    groups: int = 1
    relu: bool = False
    residual: bool = False
    p: int = 0  # SHSA partial dim

    @property
    def out_hw(self) -> Tuple[int, int]:
        pad = self.k // 2
        return (self.h + 2 * pad - self.k) // self.stride + 1, (self.w + 2 * pad - self.k) // self.stride + 1

    @property
    def training(self) -> bool:
        return self.op in ("conv_bn_train", "shsa_train")

    def label(self) -> str:
        if self.op in ("conv_bias_act", "conv_bn_train"):
            kind = "dw" if self.groups == self.c_in == self.c_out and self.groups > 1 else "conv"
            extra = "+relu" if self.relu else ""
            extra += "+res" if self.residual else ""
            return f"{kind}{self.k}x{self.k}s{self.stride} {self.c_in}->{self.c_out} {self.h}x{self.w}{extra}"
        if self.op == "ffn_fused":
            return f"ffn {self.c_in}->{2 * self.c_in}->{self.c_in} {self.h}x{self.w}"
        return f"shsa C{self.c_in} P{self.p} {self.h}x{self.w}"

    def case(self, batch: int):
        """The op-test builder for this layer: ``build(dtype, device, channels_last) -> (fn, tensors)``."""
        if self.op in ("conv_bias_act", "conv_bn_train"):
            training = True if self.op == "conv_bn_train" else None
            return op_cases.conv_case(
                batch, self.c_in, self.c_out, self.h, self.w, self.k, self.stride, self.groups, self.relu, self.residual, training
            )
        if self.op == "ffn_fused":
            return op_cases.ffn_case(batch, self.c_in, self.h, self.w)
        return op_cases.shsa_case(batch, self.c_in, self.p, self.h, self.w, True if self.training else None)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.layers: Dict[Layer, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "shvit":
            for layer in _layers_of(func.name().split("::")[1], args):
                self.layers[layer] = self.layers.get(layer, 0) + 1
        return func(*args, **(kwargs or {}))


def _layers_of(op: str, args) -> List[Layer]:
    """The layers of one op call: the stem's patch_embed as its four conv_bias_act convs, others as themselves."""
    if op == "patch_embed":
        x, layers = args[0], []
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        for i in range(4):
            weight = args[1 + 2 * i]
            layers.append(Layer("conv_bias_act", c, weight.shape[0], h, w, 3, 2, 1, i < 3, False))
            c, h, w = weight.shape[0], (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return layers
    layer = _layer_of(op, args)
    return [] if layer is None else [layer]


def _layer_of(op: str, args) -> Layer:
    if op in ("conv_bias_act", "conv_bn_train"):
        x, weight = args[0], args[1]
        stride, groups = (args[3], args[5]) if op == "conv_bias_act" else (args[4], args[6])
        relu, residual = (args[6], args[7]) if op == "conv_bias_act" else (args[8], args[9])
        return Layer(op, x.shape[1], weight.shape[0], x.shape[2], x.shape[3], weight.shape[-1], stride, groups, relu, residual is not None)
    if op == "ffn_fused":
        x = args[0]
        return Layer(op, x.shape[1], x.shape[1], x.shape[2], x.shape[3])
    if op in ("shsa_fused", "shsa_train"):
        x, w = args[0], args[1] if op == "shsa_fused" else args[3]
        return Layer(op, x.shape[1], x.shape[1], x.shape[2], x.shape[3], p=w.shape[1])
    return None


@functools.lru_cache(maxsize=None)
def model_layers(model_name: str, img_size: int = None) -> Tuple[Tuple[Layer, int], ...]:
    """(layer, calls per forward) for every distinct op call of ``model_name`` (inference and training ops)."""
    import shvit
    from shvit.bench import PAPER_IMG_SIZE

    size = img_size or PAPER_IMG_SIZE[model_name]
    model = shvit.create_model(model_name)
    x = torch.zeros(2, 3, size, size)
    rec = _Recorder()
    with torch.no_grad(), rec:
        shvit.fuse(model)(x[:1])
        model.train()(x)  # batch 2: training BatchNorm needs more than one value per channel
    return tuple(rec.layers.items())


def grid(models, batches, ops=FORWARD_OPS) -> List[Tuple[str, Layer, int, int]]:
    """(model, layer, calls per forward, batch) for each model, each distinct layer, each batch."""
    out = []
    for m in models:
        for layer, count in model_layers(m):
            if layer.op in ops:
                out.extend((m, layer, count, b) for b in batches)
    return out


# ---------------------------------------------------------------------------------------------------------
# Minimum traffic and FLOPs. Traffic: every tensor the op must read or write, once (intermediates that a fused
# kernel can keep on chip are not counted; BN/GN parameters and statistics are fp32). FLOPs: 2 per
# multiply-add of the convolutions and matmuls; elementwise work (bias, ReLU, softmax, norms) is not counted.
# Backward: input and weight gradients, each as many FLOPs as the forward.
# ---------------------------------------------------------------------------------------------------------
def _sizes(layer: Layer, batch: int) -> Dict[str, Tuple[int, int]]:
    """name -> (elements, 'act' | 'fp32') of each forward input and the output."""
    ho, wo = layer.out_hw
    act = lambda n: (n, "act")  # noqa: E731
    f32 = lambda n: (n, "fp32")  # noqa: E731
    x = batch * layer.c_in * layer.h * layer.w
    if layer.op in ("conv_bias_act", "conv_bn_train"):
        out = batch * layer.c_out * ho * wo
        s = dict(x=act(x), weight=act(layer.c_out * (layer.c_in // layer.groups) * layer.k * layer.k), out=act(out))
        if layer.residual:
            s["residual"] = act(out)
        if layer.op == "conv_bias_act":
            s["bias"] = act(layer.c_out)
        else:  # gamma, beta in; batch mean, var out; running stats read and written
            s["bn"] = f32(8 * layer.c_out)
        return s
    if layer.op == "ffn_fused":
        c, hid = layer.c_in, 2 * layer.c_in
        return dict(x=act(x), w1=act(hid * c), b1=act(hid), w2=act(c * hid), b2=act(c), out=act(x))
    n = 2 * QK + layer.p
    s = dict(x=act(x), qkv_weight=act(n * layer.p), out=act(x))
    if layer.op == "shsa_fused":
        s["qkv_bias"] = act(n)
    else:
        s["norm"] = f32(2 * layer.p + 8 * n)
    return s


def traffic_bytes(layer: Layer, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Minimum bytes moved by one call in ``mode`` (forward, backward, both)."""
    if mode == "both":
        return traffic_bytes(layer, batch, dtype, "forward") + traffic_bytes(layer, batch, dtype, "backward")
    item = {"act": torch.empty((), dtype=dtype).element_size(), "fp32": 4}
    sizes = _sizes(layer, batch)
    total = sum(n * item[kind] for n, kind in sizes.values())
    if mode == "forward":
        return total
    # Backward reads grad_out, every forward input and the output (ReLU mask, attention recompute), and writes
    # a gradient per input: grad_out + inputs + out + grads = 2 * (inputs + out).
    return 2 * total


def flops(layer: Layer, batch: int, mode: str) -> int:
    ho, wo = layer.out_hw
    if layer.op in ("conv_bias_act", "conv_bn_train"):
        fwd = 2 * batch * layer.c_out * ho * wo * (layer.c_in // layer.groups) * layer.k * layer.k
    elif layer.op == "ffn_fused":
        fwd = 2 * 2 * batch * layer.h * layer.w * layer.c_in * (2 * layer.c_in)
    else:
        n, p = layer.h * layer.w, layer.p
        fwd = 2 * batch * (n * p * (2 * QK + p) + n * n * QK + n * n * p)
    return {"forward": fwd, "backward": 2 * fwd, "both": 3 * fwd}[mode]


def input_sets(build, dtype, device, channels_last, cache_bytes: int, set_bytes: int, budget_bytes: int) -> list:
    """Enough independent input sets that cycling through them does not run from cache (2..64 sets)."""
    want = max(2, min(64, math.ceil(2 * cache_bytes / max(set_bytes, 1))))
    want = max(1, min(want, budget_bytes // max(set_bytes, 1)))
    sets = []
    for _ in range(want):
        fn, tensors = build(dtype, device, channels_last)
        sets.append((fn, tensors))
    return sets
