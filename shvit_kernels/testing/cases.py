"""Input builders for every op at SHViT shapes and awkward ones, shared by the op tests and the benchmarks.

A case is (name, build) where ``build(dtype, device, channels_last)`` returns ``(fn, tensors)``: ``fn(**tensors)``
runs the functional op; every floating tensor in ``tensors`` is differentiable except running statistics.
"""

from __future__ import annotations

import functools

import torch

import shvit_kernels as K

QK = 16


def _t(*shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype=dtype, device=device)


def _act(b, c, h, w, dtype, device, channels_last):
    x = _t(b, c, h, w, dtype=dtype, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _bn_params(c, dtype, device):
    # BN parameters stay fp32 under mixed precision, as nn.BatchNorm2d's do.
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        bn_weight=_t(c, dtype=pdtype, device=device, scale=0.3, shift=1.0),
        bn_bias=_t(c, dtype=pdtype, device=device, scale=0.3),
        running_mean=_t(c, dtype=pdtype, device=device, scale=0.3),
        running_var=_t(c, dtype=pdtype, device=device, scale=0.2).abs() + 0.5,
    )


def _input_major(weight):
    """A 1x1 weight stored as shvit.fuse keeps it on CPU: its (C_in, C_out) transpose contiguous."""
    return weight.transpose(0, 1).contiguous().transpose(0, 1)


def conv_case(b, c_in, c_out, h, w, k, stride, groups, relu, residual, training, input_major=False):
    pad = k // 2

    def build(dtype, device, channels_last):
        x = _act(b, c_in, h, w, dtype, device, channels_last)
        fan_in = (c_in // groups) * k * k
        weight = _t(c_out, c_in // groups, k, k, dtype=dtype, device=device, scale=fan_in ** -0.5)
        t = dict(x=x, weight=_input_major(weight) if input_major else weight)
        h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if residual:
            t["residual"] = _act(b, c_out, h_out, w_out, dtype, device, channels_last)
        kw = dict(stride=stride, padding=pad, groups=groups, relu=relu)
        if training is None:  # inference form
            t["bias"] = _t(c_out, dtype=dtype, device=device, scale=0.1)
            return functools.partial(K.conv_bias_act, **kw), t
        t.update(_bn_params(c_out, dtype, device))
        return functools.partial(K.conv_bn, training=training, **kw), t

    return build


def ffn_case(b, c, h, w, hidden_ratio=2, input_major=False):
    def build(dtype, device, channels_last):
        hid = c * hidden_ratio
        layout = _input_major if input_major else (lambda weight: weight)
        t = dict(
            x=_act(b, c, h, w, dtype, device, channels_last),
            w1=layout(_t(hid, c, 1, 1, dtype=dtype, device=device, scale=c ** -0.5)),
            b1=_t(hid, dtype=dtype, device=device, scale=0.1),
            w2=layout(_t(c, hid, 1, 1, dtype=dtype, device=device, scale=hid ** -0.5)),
            b2=_t(c, dtype=dtype, device=device, scale=0.1),
        )
        return K.ffn_fused, t

    return build


def shsa_case(b, c, p, h, w, training):
    def build(dtype, device, channels_last):
        n = 2 * QK + p
        t = dict(
            x=_act(b, c, h, w, dtype, device, channels_last),
            qkv_weight=_t(n, p, 1, 1, dtype=dtype, device=device, scale=p ** -0.5),
        )
        if training is None:
            t["qkv_bias"] = _t(n, dtype=dtype, device=device, scale=0.1)
            return functools.partial(K.shsa_fused, qk_dim=QK), t
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        t["gn_weight"] = _t(p, dtype=pdtype, device=device, scale=0.3, shift=1.0)
        t["gn_bias"] = _t(p, dtype=pdtype, device=device, scale=0.3)
        t.update(_bn_params(n, dtype, device))
        return functools.partial(K.shsa, qk_dim=QK, training=training), t

    return build


def squeeze_excite_case(b, c, h, w, reduced):
    def build(dtype, device, channels_last):
        t = dict(
            x=_act(b, c, h, w, dtype, device, channels_last),
            w1=_input_major(_t(reduced, c, 1, 1, dtype=dtype, device=device, scale=c ** -0.5)),
            b1=_t(reduced, dtype=dtype, device=device, scale=0.1),
            w2=_t(c, reduced, 1, 1, dtype=dtype, device=device, scale=reduced ** -0.5),
            b2=_t(c, dtype=dtype, device=device, scale=0.1),
        )
        return K.squeeze_excite, t

    return build


def pooled_linear_case(b, c, h, w, k):
    def build(dtype, device, channels_last):
        t = dict(
            x=_act(b, c, h, w, dtype, device, channels_last),
            weight=_t(k, c, dtype=dtype, device=device, scale=c ** -0.5),
            bias=_t(k, dtype=dtype, device=device, scale=0.1),
        )
        return K.pooled_linear, t

    return build


def patch_embed_case(b, c_in, widths, h, w, out_channels_last=False):
    def build(dtype, device, channels_last):
        t = dict(x=_act(b, c_in, h, w, dtype, device, channels_last))
        c = c_in
        for i, c_out in enumerate(widths, start=1):
            t[f"w{i}"] = _t(c_out, c, 3, 3, dtype=dtype, device=device, scale=(9 * c) ** -0.5)
            t[f"b{i}"] = _t(c_out, dtype=dtype, device=device, scale=0.1)
            c = c_out
        return (functools.partial(K.patch_embed, out_channels_last=True) if out_channels_last else K.patch_embed), t

    return build


def _conv_cases(training):
    tag = "infer" if training is None else ("train" if training else "eval")
    return [
        (f"conv-{tag}-stem0-3x3s2", conv_case(2, 3, 16, 64, 64, 3, 2, 1, True, False, training)),
        (f"conv-{tag}-stem-odd-3x3s2", conv_case(1, 16, 32, 15, 13, 3, 2, 1, True, False, training)),
        (f"conv-{tag}-dw3x3s1-residual", conv_case(2, 128, 128, 14, 14, 3, 1, 128, False, True, training)),
        (f"conv-{tag}-dw3x3s1-odd", conv_case(1, 75, 75, 5, 7, 3, 1, 75, True, False, training)),
        (f"conv-{tag}-dw3x3s2-relu", conv_case(2, 96, 96, 14, 14, 3, 2, 96, True, False, training)),
        # Rows wider than one register segment (8 outputs), every row a border row, channels in 2-, 1- and part-vector blocks.
        (f"conv-{tag}-dw3x3s1-wide", conv_case(1, 40, 40, 2, 17, 3, 1, 40, True, True, training)),
        (f"conv-{tag}-dw3x3s2-wide", conv_case(1, 48, 48, 3, 21, 3, 2, 48, False, True, training)),
        (f"conv-{tag}-1x1-relu", conv_case(2, 224, 448, 7, 7, 1, 1, 1, True, False, training)),
        (f"conv-{tag}-1x1-residual", conv_case(2, 320, 320, 4, 4, 1, 1, 1, False, True, training)),
        # 288 values per channel: the cpp backend's forward statistics and backward sums in fp32 blocks from 256 on.
        (f"conv-{tag}-1x1-many-values", conv_case(2, 96, 64, 12, 12, 1, 1, 1, True, True, training)),
        (f"conv-{tag}-1x1-input-major-weight", conv_case(2, 48, 80, 5, 3, 1, 1, 1, True, True, training, input_major=True)),
    ]


def _shsa_cases(training):
    tag = "infer" if training is None else ("train" if training else "eval")
    return [
        (f"shsa-{tag}-s1-stage2", shsa_case(2, 224, 48, 7, 7, training)),
        (f"shsa-{tag}-p75-odd", shsa_case(2, 352, 75, 5, 3, training)),
        (f"shsa-{tag}-n1-batch1", shsa_case(1 if training is None else 2, 96, 66, 1, 1, training)),
        (f"shsa-{tag}-p-equals-c", shsa_case(2, 40, 40, 4, 4, training)),
    ]


CASES = (
    _conv_cases(None)
    + _conv_cases(True)
    + _conv_cases(False)
    + [
        ("ffn-s1-stage1", ffn_case(2, 128, 14, 14)),
        ("ffn-odd", ffn_case(1, 20, 5, 7)),
        ("ffn-input-major-weights", ffn_case(2, 24, 6, 5, input_major=True)),
        ("squeeze-excite-s1-stage1", squeeze_excite_case(3, 512, 7, 7, 128)),
        ("squeeze-excite-odd", squeeze_excite_case(2, 37, 3, 5, 9)),
        ("pooled-linear-s1-head", pooled_linear_case(3, 320, 4, 4, 1000)),
        ("pooled-linear-odd", pooled_linear_case(2, 37, 3, 5, 11)),
        ("patch-embed-s1-widths", patch_embed_case(3, 3, (16, 32, 64, 128), 48, 40)),
        ("patch-embed-odd", patch_embed_case(2, 5, (6, 10, 14, 18), 19, 13)),
        ("patch-embed-out-channels-last", patch_embed_case(3, 3, (16, 32, 64, 128), 48, 40, out_channels_last=True)),
    ]
    + _shsa_cases(None)
    + _shsa_cases(True)
    + _shsa_cases(False)
)

# A long-sequence case for the tiled softmax paths (N = 1024), kept out of the main grid for time.
LONG_SHSA_CASE = ("shsa-infer-n1024", shsa_case(1, 64, 48, 32, 32, None))
