"""cpp-backend specific tests: every built CPU-capability variant, both layouts, thread counts, bad input to the
C++ functions, the per-call not_supported_reasons, and the loader's unavailable path.

The shared cross-backend grid (tests/test_op_accuracy.py) runs the ops through the dispatcher; here the C++ functions are
also called directly so each variant is checked, including kernels the dispatcher declines (dense kxk).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import shvit_kernels
from shvit_kernels import dispatch
from shvit_kernels.backends import cpp
from shvit_kernels.ops import _common
from shvit_kernels.ops.conv_bn import (
    conv_bias_act_backward_reference,
    conv_bias_act_reference,
    conv_bn_train_backward_reference,
    conv_bn_train_output_reference,
    conv_bn_train_reference,
)
from shvit_kernels.ops.ffn import ffn_fused_backward_reference, ffn_fused_reference
from shvit_kernels.ops.patch_embed import patch_embed_reference
from shvit_kernels.ops.pooled_linear import pooled_linear_reference
from shvit_kernels.ops.squeeze_excite import squeeze_excite_reference
from shvit_kernels.ops.shsa import (
    shsa_fused_backward_reference,
    shsa_fused_reference,
    shsa_train_backward_reference,
    shsa_train_reference,
)
from shvit_kernels.testing import assert_close_to_fp64, cast_args, check_kernel, to_float64


requires_cpp = pytest.mark.skipif(cpp.variant() is None, reason="; ".join(dispatch.unavailable_reasons("cpp")) or "cpp unavailable")

DTYPES = (torch.float32, torch.bfloat16)


def in_use():
    """The C++ extension module the cpp backend calls (the best build this processor runs)."""
    return cpp.load_variant(cpp.variant())


def _built_variants():
    found = []
    for cap in cpp.runnable_capabilities():
        try:
            cpp.load_variant(cap)
            found.append(cap)
        except ImportError:
            pass
    return found


VARIANTS = _built_variants()


@contextlib.contextmanager
def _num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _check_against_reference(fn, reference, args, dtype, *, channels_last, name, op=None):
    """fn on args cast to dtype (4-D tensors in the given layout), held to the tolerance and layout rules (or to the
    layout the call asks for, where op has a layout argument)."""
    request = _common._layout_requests.get(op)
    (got,) = check_kernel(fn, reference, cast_args(args, dtype, channels_last), name=name,
                          layout=request(args) if request else None)
    return got


def drawn_with_seed(seed):
    """Case builders draw from their own seed: the cases are built when pytest collects (for the parameter ids), and
    the global generator's state there depends on what was imported or ran before."""

    def wrap(builder):
        @functools.wraps(builder)
        def build():
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return builder()

        return build

    return wrap


@drawn_with_seed(1)
def conv_cases():
    """(label, args) in conv_bias_act's positional order; odd sizes, batch 1, residual/ReLU combinations."""
    cases = []
    for stride in (1, 2):
        for hw in ((9, 7), (1, 1), (2, 5), (6, 19)):
            c = 37
            oh, ow = [(s + 2 - 3) // stride + 1 for s in hw]
            cases.append(
                (
                    f"dw3x3 s{stride} {hw}",
                    (torch.randn(2, c, *hw), torch.randn(c, 1, 3, 3) / 3, torch.randn(c), stride, 1, c, True,
                     torch.randn(2, c, oh, ow)),
                )
            )
    cases.append(("pw relu", (torch.randn(3, 40, 7, 5), torch.randn(24, 40, 1, 1) / 6, torch.randn(24), 1, 0, 1, True, None)))
    cases.append(("pw residual no bias", (torch.randn(1, 33, 3, 1), torch.randn(20, 33, 1, 1) / 6, None, 1, 0, 1, False,
                                          torch.randn(1, 20, 3, 1))))
    # bf16 pair kernel: a last channel block of 16 (48 = 32 + 16) on one channel vector, with a residual.
    cases.append(("pw c_out 48 residual", (torch.randn(2, 40, 6, 5), torch.randn(48, 40, 1, 1) / 6, torch.randn(48), 1, 0,
                                           1, False, torch.randn(2, 48, 6, 5))))
    # AMX tiles: 50 pixels (a 32-row block and an 18-row one), K 70 (two 32-value chunks and a 6-value tail), 80
    # channels (two 32-channel blocks and a 16-channel one), with a residual.
    cases.append(("pw amx tails residual", (torch.randn(2, 70, 5, 5), torch.randn(80, 70, 1, 1) / 8, torch.randn(80), 1, 0,
                                            1, False, torch.randn(2, 80, 5, 5))))
    cases.append(("stem 3x3 s2 c_in 3", (torch.randn(2, 3, 11, 13), torch.randn(16, 3, 3, 3) / 3, torch.randn(16), 2, 1, 1,
                                         True, None)))
    cases.append(("stem 3x3 s1 c_in 3 c_out 28 residual", (torch.randn(2, 3, 10, 17), torch.randn(28, 3, 3, 3) / 3,
                                                          torch.randn(28), 1, 1, 1, False, torch.randn(2, 28, 10, 17))))
    cases.append(("dense 3x3 s2 c_in 20", (torch.randn(1, 20, 8, 7), torch.randn(33, 20, 3, 3) / 9, torch.randn(33), 2, 1, 1,
                                           False, None)))
    # The register-blocked fp32 kernel: rows split into uneven pixel tiles (31 -> 10 + 10 + 11), several channel
    # blocks with zero padding past c_out (40, 72), stride 1 with a residual, 5x5, no padding, 1-wide output.
    cases.append(("dense 3x3 s1 31-wide residual", (torch.randn(1, 16, 5, 31), torch.randn(40, 16, 3, 3) / 12, torch.randn(40),
                                                    1, 1, 1, True, torch.randn(1, 40, 5, 31))))
    cases.append(("dense 5x5 s2 pad 2", (torch.randn(2, 7, 9, 30), torch.randn(72, 7, 5, 5) / 13, torch.randn(72), 2, 2, 1,
                                         True, None)))
    cases.append(("dense 3x3 pad 0 1-wide", (torch.randn(1, 8, 4, 3), torch.randn(16, 8, 3, 3) / 8, None, 1, 0, 1, False,
                                             None)))
    # bf16 pair kernel: one 16-channel vector (8 of them stored), three 16-pixel tiles (40 -> 13 + 13 + 14), three
    # channels widened to four eight pixels at a time (42 = 5 x 8 + 2).
    cases.append(("stem 3x3 s1 c_in 3 c_out 8 40-wide residual", (torch.randn(2, 3, 3, 42), torch.randn(8, 3, 3, 3) / 5,
                                                                  torch.randn(8), 1, 0, 1, True, torch.randn(2, 8, 1, 40))))
    # The 3-channel stride-2 first layer (pixel stride a compile-time constant): 28-pixel tiles of one channel vector
    # (59 -> 19 + 20 + 20), and two vectors with 28 of 32 channels stored plus a residual (61 -> 4 x 12 + 13).
    cases.append(("stem 3x3 s2 c_in 3 c_out 16 59-wide", (torch.randn(1, 3, 4, 117), torch.randn(16, 3, 3, 3) / 5,
                                                          torch.randn(16), 2, 1, 1, True, None)))
    cases.append(("stem 3x3 s2 c_in 3 c_out 28 61-wide residual", (torch.randn(1, 3, 3, 121), torch.randn(28, 3, 3, 3) / 5,
                                                                   torch.randn(28), 2, 1, 1, False,
                                                                   torch.randn(1, 28, 2, 61))))
    # fp32 first layer: a two-vector block then a one-vector block of 8 channels (40 = 32 + 8) in one row, and a stride
    # the pixel stride is not a compile-time constant for.
    cases.append(("stem 3x3 s2 c_in 3 c_out 40", (torch.randn(2, 3, 9, 37), torch.randn(40, 3, 3, 3) / 5, torch.randn(40),
                                                  2, 1, 1, True, None)))
    cases.append(("stem 3x3 s3 c_in 3 c_out 20 residual", (torch.randn(1, 3, 10, 40), torch.randn(20, 3, 3, 3) / 5,
                                                           torch.randn(20), 3, 1, 1, False, torch.randn(1, 20, 4, 14))))
    return cases


@drawn_with_seed(2)
def ffn_cases():
    return [
        ("ffn 24->48 5x7", (torch.randn(3, 24, 5, 7), torch.randn(48, 24, 1, 1) / 5, torch.randn(48), torch.randn(24, 48, 1, 1) / 7, torch.randn(24))),
        ("ffn odd C 15->30 1x1", (torch.randn(1, 15, 1, 1), torch.randn(30, 15, 1, 1) / 4, torch.randn(30), torch.randn(15, 30, 1, 1) / 5, torch.randn(15))),
        # AMX tiles: K 64 and 128 in whole 32-value chunks, 20 rows (one block of 16 + 4 rows).
        ("ffn 64->128 4x5", (torch.randn(1, 64, 4, 5), torch.randn(128, 64, 1, 1) / 8, torch.randn(128), torch.randn(64, 128, 1, 1) / 11, torch.randn(64))),
        ("ffn 16->32 9x9 many tiles", (torch.randn(4, 16, 9, 9), torch.randn(32, 16, 1, 1) / 4, torch.randn(32), torch.randn(16, 32, 1, 1) / 6, torch.randn(16))),
    ]


@drawn_with_seed(3)
def shsa_cases():
    out = []
    for c, p, hw in ((40, 21, (5, 7)), (20, 20, (1, 1)), (30, 7, (4, 4)), (80, 75, (3, 5))):
        x = torch.randn(3, c, *hw) * 2 + 1
        out.append((f"shsa C{c} P{p} {hw}", (x, torch.randn(32 + p, p, 1, 1) / 3, torch.randn(32 + p), 16, 1e-5)))
    x = torch.randn(1, 12, 3, 3)
    out.append(("shsa qk 4 batch 1", (x, torch.randn(8 + 5, 5, 1, 1), torch.randn(13), 4, 1e-5)))
    return out


@drawn_with_seed(4)
def squeeze_excite_cases():
    out = []
    # S1's two gates (fewer images), one whose channels are no whole vector, 1x1 maps and one 17-pixel plane.
    for b, c, r, hw in ((3, 512, 128, (7, 7)), (2, 896, 224, (4, 4)), (3, 37, 9, (3, 5)), (4, 20, 5, (1, 1)),
                        (2, 24, 6, (1, 17))):
        args = (torch.randn(b, c, *hw) * 2 + 0.5, torch.randn(r, c, 1, 1) / c ** 0.5, torch.randn(r),
                torch.randn(c, r, 1, 1) / r ** 0.5, torch.randn(c))
        out.append((f"squeeze_excite C{c} r{r} {hw}", args))
    return out


@drawn_with_seed(6)
def pooled_linear_cases():
    out = []
    # S1's head (fewer images), channels and outputs that are no whole vector, a 1x1 map and one 17-pixel plane.
    for b, c, k, hw in ((3, 320, 1000, (4, 4)), (2, 37, 11, (3, 5)), (4, 20, 5, (1, 1)), (2, 24, 33, (1, 17))):
        args = (torch.randn(b, c, *hw) * 2 + 0.5, torch.randn(k, c) / c ** 0.5, torch.randn(k))
        out.append((f"pooled_linear C{c} K{k} {hw}", args))
    return out


@drawn_with_seed(5)
def patch_embed_cases():
    out = []
    # Image by image (batch >= threads; S1's and S4's first widths, odd sizes), layer by layer (one image); a
    # channels_last output asked for: an NCHW input's planes interleaved per image (2 to 4 channels), else moved
    # whole (5 channels; or one image, layer by layer).
    for b, c_in, widths, hw, out_channels_last in (
            (4, 3, (16, 32, 64, 128), (64, 48), False), (2, 3, (28, 56, 112, 224), (33, 31), False),
            (3, 3, (6, 10, 14, 18), (19, 13), False), (1, 3, (16, 32, 64, 128), (40, 40), False),
            (4, 3, (16, 32, 64, 128), (64, 48), True), (3, 2, (6, 10, 14, 18), (19, 13), True),
            (2, 5, (6, 10, 14, 18), (19, 13), True), (1, 3, (16, 32, 64, 128), (40, 40), True)):
        args, c = [torch.randn(b, c_in, *hw)], c_in
        for c_out in widths:
            args += [torch.randn(c_out, c, 3, 3) / (9 * c) ** 0.5, torch.randn(c_out)]
            c = c_out
        label = f"patch_embed {c_in} -> {widths} batch {b} {hw}" + (" out channels_last" if out_channels_last else "")
        out.append((label, (*args, out_channels_last)))
    return out


OP_CASES = (
    [("conv_bias_act", conv_bias_act_reference, label, args) for label, args in conv_cases()]
    + [("ffn_fused", ffn_fused_reference, label, args) for label, args in ffn_cases()]
    + [("shsa_fused", shsa_fused_reference, label, args) for label, args in shsa_cases()]
    + [("squeeze_excite", squeeze_excite_reference, label, args) for label, args in squeeze_excite_cases()]
    + [("patch_embed", patch_embed_reference, label, args) for label, args in patch_embed_cases()]
    + [("pooled_linear", pooled_linear_reference, label, args) for label, args in pooled_linear_cases()]
)


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("op,reference,label,args", OP_CASES, ids=[f"{c[0]}-{c[2]}" for c in OP_CASES])
def test_variant_matches_reference(variant, dtype, channels_last, op, reference, label, args):
    module = cpp.load_variant(variant)
    _check_against_reference(getattr(module, op), reference, args, dtype, channels_last=channels_last,
                             name=f"{variant} {op} {label}", op=op)


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


@requires_cpp
@pytest.mark.parametrize("mode", ("dot", "dot on avx512_bf16", "dot without pair kernels", "fp32"))
def test_each_bf16_products_mode_matches_reference(mode):
    """The grids above run bf16 in the mode this processor measured faster; here each mode, forced, on every
    variant: every forward op case and the ffn / shsa backward cases in both layouts. "dot": the pair kernels on
    AMX tiles where the processor has them, else on VDPBF16PS; "dot on avx512_bf16": on VDPBF16PS with AMX switched
    off (the same as "dot" where there is no AMX); "dot without pair kernels": ATen's micro-kernel paths, which
    processors without AVX512_BF16 take in "dot" mode."""
    for variant in VARIANTS:
        module = cpp.load_variant(variant)
        try:
            previous = module.set_bf16_products(mode.split()[0])
        except RuntimeError as e:
            assert mode.startswith("dot") and "not usable here" in str(e)
            pytest.skip(f"bf16 pair products cannot run on this processor: {e}")
        pairs = module.set_pair_kernels(mode != "dot without pair kernels")
        amx = module.set_amx_tiles(mode != "dot on avx512_bf16")
        try:
            assert module.bf16_widened() == (mode == "fp32")
            assert module.dense_conv_bf16() != "pairs" or mode.startswith("dot on") or mode == "dot"
            if mode == "dot on avx512_bf16":
                assert module.bf16_pair_unit() in ("avx512_bf16", "none")
            for channels_last in (False, True):
                for op, reference, label, args in OP_CASES:
                    _check_against_reference(getattr(module, op), reference, args, torch.bfloat16,
                                             channels_last=channels_last, name=f"{variant} {mode} {op} {label}", op=op)
                for label, (x, w1, b1, w2, b2) in ffn_cases():
                    bwd = (torch.randn_like(x), x, w1, b1.bfloat16(), w2, b2.bfloat16())
                    _check_outputs(module.ffn_fused_backward, ffn_fused_backward_reference, bwd, torch.bfloat16,
                                   channels_last, f"{variant} {mode} ffn_fused_backward {label}")
                for label, (x, w, b, qk, eps) in shsa_cases():
                    out = shsa_fused_reference(x, w, b, qk, eps)
                    bwd = (torch.randn_like(out), x, w, b.bfloat16(), out, qk, eps)
                    _check_outputs(module.shsa_fused_backward, shsa_fused_backward_reference, bwd, torch.bfloat16,
                                   channels_last, f"{variant} {mode} shsa_fused_backward {label}")
        finally:
            module.set_amx_tiles(amx)
            module.set_pair_kernels(pairs)
            module.set_bf16_products(previous)


def _cpp_query_with_env(function, variable, value):
    """cpp.<function>() in a fresh process with the variable set: prints its result, or its error's first line."""
    code = f"from shvit_kernels.backends import cpp\ntry:\n    print(cpp.{function}())\nexcept RuntimeError as e:\n" \
           "    print(str(e).splitlines()[0])"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, variable: value}, capture_output=True,
                          text=True, timeout=120)


@drawn_with_seed(11)
def fp32_tile_cases():
    """(op, label, args) around the fp32 tiles' edges: rows not a multiple of the 6-row tile, output channels ending
    mid-vector and with 1..4 vectors in the last 64-wide panel, K of 1 and odd, with and without residual and ReLU,
    and a weight (700 x 400) over the 1 MiB of panels one pass over the rows takes."""
    cases = []
    for hw, c_in, c_out, relu, residual in (((1, 1), 1, 1, True, False), ((1, 5), 3, 17, False, True),
                                            ((2, 3), 33, 64, True, True), ((3, 7), 16, 65, False, False),
                                            ((4, 5), 40, 130, True, False), ((5, 5), 7, 47, False, True),
                                            ((13, 1), 64, 15, True, True), ((2, 2), 700, 400, True, True)):
        x = torch.randn(2, c_in, *hw)
        args = (x, torch.randn(c_out, c_in, 1, 1) / c_in ** 0.5, torch.randn(c_out), 1, 0, 1, relu,
                torch.randn(2, c_out, *hw) if residual else None)
        cases.append(("conv_bias_act", f"1x1 {c_in}->{c_out} at {hw}", args))
    for hw, c, hidden in (((3, 5), 17, 34), ((2, 7), 40, 130), ((1, 1), 64, 64), ((5, 3), 9, 200)):
        args = (torch.randn(3, c, *hw), torch.randn(hidden, c, 1, 1) / c ** 0.5, torch.randn(hidden),
                torch.randn(c, hidden, 1, 1) / hidden ** 0.5, torch.randn(c))
        cases.append(("ffn_fused", f"ffn {c}->{hidden} at {hw}", args))
    return cases


@requires_cpp
@pytest.mark.parametrize("mode", ("tiles", "brgemm"))
def test_each_fp32_gemm_mode_matches_reference(mode):
    """fp32 channels_last 1x1 convs and FFNs in each GEMM mode, forced, on every variant that runs it: the edge cases
    above and the forward grid's conv and FFN cases. Where the tiles run, an input-major weight is packed into their
    panels (brgemm reads it in place), which shows the tiles are what ran."""
    references = {"conv_bias_act": conv_bias_act_reference, "ffn_fused": ffn_fused_reference}
    ran = []
    for variant in VARIANTS:
        module = cpp.load_variant(variant)
        try:
            previous = module.set_fp32_gemm(mode)
        except RuntimeError as e:
            assert mode == "tiles" and "needs the AVX-512 build" in str(e), str(e)
            continue
        try:
            assert module.fp32_tiles_active() == (mode == "tiles") and module.fp32_gemm() == mode
            cases = fp32_tile_cases() + [(op, label, args) for op, _, label, args in OP_CASES if op in references]
            for op, label, args in cases:
                _check_against_reference(getattr(module, op), references[op], args, torch.float32, channels_last=True,
                                         name=f"{variant} {mode} {op} {label}")
            x = torch.randn(2, 24, 3, 3).contiguous(memory_format=torch.channels_last)
            module.clear_derived_weights()
            module.conv_bias_act(x, _input_major(torch.randn(40, 24, 1, 1)), torch.randn(40), 1, 0, 1, True, None)
            assert module.derived_weight_count() == (1 if mode == "tiles" else 0), f"{variant} {mode}"
            # The panels (one panel and a bit) packed from each weight layout hold the same values.
            for c_out in (40, 70):
                _assert_same_for_each_weight_layout(module, x, torch.randn(c_out, 24, 1, 1), torch.randn(c_out),
                                                    f"{variant} {mode}")
            ran.append(variant)
        finally:
            module.set_fp32_gemm(previous)
            module.clear_derived_weights()
    if not ran:
        pytest.skip(f"no built variant runs the fp32 {mode} path here (built: {VARIANTS})")


def _assert_same_for_each_weight_layout(module, x, w, b, name):
    """module's 1x1 conv_bias_act gives identical outputs with w stored output-major, input-major or neither (a
    strided view)."""
    strided = torch.empty(w.shape[0], 2 * w.shape[1], 1, 1, dtype=w.dtype)[:, ::2]
    strided.copy_(w)
    expected = module.conv_bias_act(x, w, b, 1, 0, 1, True, None)
    for label, weight in (("input-major", _input_major(w)), ("strided", strided)):
        got = module.conv_bias_act(x, weight, b, 1, 0, 1, True, None)
        assert torch.equal(got, expected), f"{name}: {label} weight, {w.shape[0]} channels"


@requires_cpp
def test_amx_blocks_from_each_weight_layout():
    """bf16 1x1 convs on AMX tiles: the blocks packed in one pass from a weight stored output-major (a training
    step's autocast copy), input-major (shvit.fuse's) or neither (a strided view) give identical outputs, for widths
    ending mid-block (40, 70 channels) and K ending mid-chunk (70 = two 32-value chunks and a tail)."""
    module = in_use()
    if module.bf16_pair_unit() != "amx":
        pytest.skip(f"the bf16 pair kernels run on {module.bf16_pair_unit()!r} here, not AMX tiles")
    x = torch.randn(2, 70, 3, 5)
    for c_out in (40, 70):
        w, b = torch.randn(c_out, 70, 1, 1) / 70 ** 0.5, torch.randn(c_out)
        _check_against_reference(module.conv_bias_act, conv_bias_act_reference, (x, w, b, 1, 0, 1, True, None),
                                 torch.bfloat16, channels_last=True, name=f"amx 1x1 70->{c_out}")
        _assert_same_for_each_weight_layout(module, x.contiguous(memory_format=torch.channels_last).bfloat16(),
                                            w.bfloat16(), b.bfloat16(), "amx")


@drawn_with_seed(7)
def dense_block_cases():
    """Dense 3x3 convs whose channel blocks differ by plan: 112 channels (pairs 2+2+2+2, fours 4+3, threes 3+3+1),
    80 (2+2+2 / 4+1 / 3+2), 56 (2+2 / 4 / 3+1, 8 channels past c_out), over widths that split into uneven tiles of
    each block width (17 -> 8 + 9 of 1 or 2 vectors, 5 + 6 + 6 of 3 or 4; 23 -> 11 + 12, 7 + 8 + 8, 5 + 6 + 6 + 6)."""
    return [
        ("dense 3x3 s2 c_out 112 17-wide residual", (torch.randn(1, 12, 6, 34), torch.randn(112, 12, 3, 3) / 10,
                                                     torch.randn(112), 2, 1, 1, False, torch.randn(1, 112, 3, 17))),
        ("dense 3x3 s1 c_out 80 relu", (torch.randn(2, 9, 4, 13), torch.randn(80, 9, 3, 3) / 9, torch.randn(80), 1, 1,
                                        1, True, None)),
        ("dense 3x3 s2 c_out 56 23-wide", (torch.randn(1, 20, 5, 45), torch.randn(56, 20, 3, 3) / 13, None, 2, 1, 1,
                                           True, None)),
    ]


DENSE_BLOCK_PLANS = {  # mode -> c_out -> channel vectors per block (AVX-512: 16 channels a vector)
    "pairs": {112: [2, 2, 2, 2], 80: [2, 2, 2], 56: [2, 2]},
    "fours": {112: [4, 3], 80: [4, 1], 56: [4]},
    "threes": {112: [3, 3, 1], 80: [3, 2], 56: [3, 1]},
}


@requires_cpp
@pytest.mark.parametrize("mode", ("pairs", "fours", "threes", "auto"))
def test_each_dense_conv_block_plan_matches_reference(mode):
    """fp32 channels_last dense convs with each channel-block plan forced (and the measured one), on every variant
    that has it: the plan the mode reports is the one expected, and the outputs match the reference."""
    ran = []
    for variant in VARIANTS:
        module = cpp.load_variant(variant)
        try:
            previous = module.set_dense_conv_blocks(mode)
        except RuntimeError as e:
            assert mode in ("fours", "threes") and "needs the AVX-512 build" in str(e), str(e)
            continue
        try:
            assert module.dense_conv_blocks() == mode
            dense = [(label, args) for label, args in conv_cases() if label.startswith("dense")]
            for label, args in dense_block_cases() + dense:
                _check_against_reference(module.conv_bias_act, conv_bias_act_reference, args, torch.float32,
                                         channels_last=True, name=f"{variant} {mode} {label}")
            wide = module.CPU_CAPABILITY == "AVX512"
            for label, args in dense_block_cases():
                x, w = args[0], args[1]
                plan = list(module.dense_conv_channel_blocks(x.shape[1], w.shape[0], x.shape[2], x.shape[3], 3,
                                                             args[3], args[4]))
                if not wide:  # 8-channel vectors, blocks of two only
                    assert plan and set(plan) == {2}, f"{variant} {label}: {plan}"
                elif mode == "auto":
                    assert plan in [p[w.shape[0]] for p in DENSE_BLOCK_PLANS.values()], f"{variant} {label}: {plan}"
                else:
                    assert plan == DENSE_BLOCK_PLANS[mode][w.shape[0]], f"{variant} {label}: {plan}"
            ran.append(variant)
        finally:
            module.set_dense_conv_blocks(previous)
    if not ran:
        pytest.skip(f"no built variant has the dense conv block mode {mode} here (built: {VARIANTS})")


def test_dense_conv_block_mode_is_validated_by_setter_and_variable():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    with pytest.raises(RuntimeError, match="'auto', 'pairs', 'threes' or 'fours', got 'fives'"):
        cpp.set_dense_conv_blocks("fives")
    assert cpp.dense_conv_blocks() == "auto"
    bad, forced = (_cpp_query_with_env("dense_conv_blocks", "SHVIT_CPU_DENSE_CONV_BLOCKS", value)
                   for value in ("fives", "pairs"))
    assert bad.returncode == 0 and forced.returncode == 0, bad.stderr + forced.stderr
    assert "SHVIT_CPU_DENSE_CONV_BLOCKS must be 'auto', 'pairs', 'threes' or 'fours', got 'fives'" in bad.stdout
    assert forced.stdout.strip() == "pairs"


def test_fp32_gemm_mode_is_validated_by_setter_and_variable():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    with pytest.raises(RuntimeError, match="'auto', 'tiles' or 'brgemm', got 'fast'"):
        cpp.set_fp32_gemm("fast")
    assert cpp.fp32_gemm() in ("tiles", "brgemm")
    bad, forced = (_cpp_query_with_env("fp32_gemm", "SHVIT_CPU_FP32_GEMM", value) for value in ("fast", "brgemm"))
    assert bad.returncode == 0 and forced.returncode == 0, bad.stderr + forced.stderr
    assert "SHVIT_CPU_FP32_GEMM must be 'auto', 'tiles' or 'brgemm', got 'fast'" in bad.stdout
    assert forced.stdout.strip() == "brgemm"


def test_bf16_pair_kernels_run_on_amx_tiles_where_the_processor_has_them():
    """Where /proc/cpuinfo lists AMX-BF16, the AVX512 build's pair kernels (and with them the grids' bf16 1x1, dense
    channels_last and FFN cases) run on AMX tiles; elsewhere on VDPBF16PS or not at all. Switching AMX off moves them
    to VDPBF16PS."""
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    flags = _cpu_flags()
    if cpp.variant() != "AVX512" or cpp.bf16_products() != "dot" or "avx512_bf16" not in flags:
        assert cpp.bf16_pair_unit() == "none"
        return
    expected = "amx" if {"amx_tile", "amx_bf16"} <= flags else "avx512_bf16"
    assert cpp.bf16_pair_unit() == expected
    previous = cpp.set_amx_tiles(False)
    try:
        assert cpp.bf16_pair_unit() == "avx512_bf16"
    finally:
        cpp.set_amx_tiles(previous)
    assert cpp.bf16_pair_unit() == expected


def test_bf16_dense_convs_run_on_pair_products_where_the_processor_has_them():
    """The grids' bf16 dense channels_last cases run on the pair kernel wherever it can run, so they test it."""
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    with open("/proc/cpuinfo") as f:
        bf16_dot = " avx512_bf16" in f.read()
    expected = "pairs" if bf16_dot and cpp.variant() == "AVX512" and cpp.bf16_products() == "dot" else None
    if expected is None:
        assert cpp.dense_conv_bf16() in ("rows", "fp32")
    else:
        assert cpp.dense_conv_bf16() == expected
    previous = cpp.set_bf16_products("fp32")
    try:
        assert cpp.dense_conv_bf16() == "fp32"
    finally:
        cpp.set_bf16_products(previous)


def test_peak_gflops_measures_and_names_a_bad_kind():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    with pytest.raises(RuntimeError, match="kind must be 'fp32_fma', 'bf16_dot' or 'amx_bf16', got 'fp64'"):
        in_use().peak_gflops("fp64")
    assert cpp.peak_gflops("bf16_dot") >= 0.0
    amx = cpp.variant() == "AVX512" and {"amx_tile", "amx_bf16"} <= _cpu_flags()
    assert (cpp.peak_gflops("amx_bf16") > 1.0) == amx
    if cpp.variant() != "DEFAULT":  # the portable build has no vector FMA loop
        assert cpp.peak_gflops("fp32_fma") > 1.0


def test_bf16_gemms_with_odd_k_mixed_with_micro_kernel_ones_do_not_crash():
    """On a Xeon with AMX, MKL's bf16 GEMM (odd K: the NCHW FFN's 3 -> 6 first product) kept its AMX tile
    configuration across calls while ATen's brgemm (the 6 -> 3 product, even K) and the AMX pair kernels loaded
    theirs in between: the process died with SIGILL. Run in a subprocess, so such a crash fails here; the results
    are checked against the reference there. (On processors without AMX this cannot crash either way.)"""
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    code = textwrap.dedent("""
        import torch
        from shvit_kernels.backends import cpp
        from shvit_kernels.ops.ffn import ffn_fused_reference
        from shvit_kernels.testing import assert_close_to_fp64
        torch.manual_seed(0)
        for c, channels_last in ((3, False), (1, False), (1, True), (40, True), (3, False)):
            x = torch.randn(3, c, 3, 3).bfloat16()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            args = (x, torch.randn(2 * c, c, 1, 1).bfloat16(), torch.randn(2 * c).bfloat16(),
                    torch.randn(c, 2 * c, 1, 1).bfloat16(), torch.randn(c).bfloat16())
            out = cpp.load_variant(cpp.variant()).ffn_fused(*args)
            assert_close_to_fp64(out, ffn_fused_reference(*args), ffn_fused_reference(*(a.double() for a in args)),
                                 name=f"ffn_fused bf16 C={c}")
        print("done")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "done" in out.stdout, f"exit status {out.returncode}\n{out.stdout}\n{out.stderr}"


def test_a_bad_bf16_products_variable_is_a_clear_error():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    code = textwrap.dedent("""
        from shvit_kernels.backends import cpp
        try:
            cpp.bf16_products()
        except RuntimeError as e:
            print(str(e).splitlines()[0])
    """)
    env = {**os.environ, "SHVIT_CPU_BF16_PRODUCTS": "fast"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SHVIT_CPU_BF16_PRODUCTS must be 'auto', 'dot' or 'fp32', got 'fast'" in out.stdout


def test_the_amx_variable_switches_the_tiles_off_and_a_bad_value_is_a_clear_error():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    off, bad = (_cpp_query_with_env("bf16_pair_unit", "SHVIT_CPU_AMX", value) for value in ("0", "yes"))
    assert off.returncode == 0 and bad.returncode == 0, off.stderr + bad.stderr
    assert off.stdout.strip() in ("avx512_bf16", "none")
    if cpp.bf16_pair_unit() == "amx":  # where the tiles run, the variable is read (elsewhere nothing asks for it)
        assert "SHVIT_CPU_AMX must be '0' or '1', got 'yes'" in bad.stdout


def test_bf16_products_setting_is_validated_and_keys_the_autotune_cache():
    if cpp.variant() is None:
        pytest.skip("cpp unavailable")
    with pytest.raises(RuntimeError, match="'auto', 'dot' or 'fp32'"):
        cpp.set_bf16_products("fast")
    previous = cpp.set_bf16_products("fp32")
    try:
        assert cpp.bf16_products() == "fp32"
        assert shvit_kernels.autotune.machine()["cpu_bf16_products"] == "fp32"
        fp32_path = shvit_kernels.autotune.cache_path()
        try:
            cpp.set_bf16_products("dot")
        except RuntimeError:
            return  # no bf16 micro-kernel here: only one mode, one cache
        assert shvit_kernels.autotune.machine()["cpu_bf16_products"] == "dot"
        assert shvit_kernels.autotune.cache_path() != fp32_path
    finally:
        cpp.set_bf16_products(previous)


@requires_cpp
def test_the_loaded_build_keys_the_autotune_cache(tmp_path, monkeypatch):
    """Choices timed on one build of the kernels are not reused by another (a rebuild, another variant)."""
    assert shvit_kernels.autotune.machine()["cpu_build"] == cpp.build_id()
    assert cpp.build_id().startswith(cpp.variant() + "-")
    assert str(os.path.getsize(cpp.extension().__file__)) in cpp.build_id()
    before = shvit_kernels.autotune.cache_path()
    rebuilt = tmp_path / "rebuilt.so"
    rebuilt.write_bytes(b"a rebuilt extension")

    class Rebuilt:  # what the loader would hold after a rebuild: the same capability, another file
        CPU_CAPABILITY = cpp.variant()
        __file__ = str(rebuilt)
        bf16_widened = staticmethod(cpp.extension().bf16_widened)

    with monkeypatch.context() as m:
        m.setattr(cpp, "_module", Rebuilt)
        shvit_kernels.autotune.settings_changed()
        assert shvit_kernels.autotune.machine()["cpu_build"] == f"{cpp.variant()}-19-{rebuilt.stat().st_mtime_ns}"
        assert shvit_kernels.autotune.cache_path() != before
    shvit_kernels.autotune.settings_changed()
    assert shvit_kernels.autotune.cache_path() == before


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_major_weights_give_the_same_result(variant, dtype):
    """1x1 weights stored input-channel major (as shvit.fuse keeps them on CPU) are read in place by the GEMM
    paths and copied by the others: either way the same numbers as the plain layout."""
    module = cpp.load_variant(variant)

    def input_major(w):
        return w.transpose(0, 1).contiguous().transpose(0, 1)

    x = torch.randn(2, 24, 5, 7).to(dtype)
    w1, b1, w2, b2 = torch.randn(48, 24, 1, 1).to(dtype) / 5, torch.randn(48), torch.randn(24, 48, 1, 1).to(dtype) / 7, torch.randn(24)
    for channels_last in (False, True):
        xl = _layout(x, channels_last)
        plain = module.ffn_fused(xl, w1, b1, w2, b2)
        torch.testing.assert_close(module.ffn_fused(xl, input_major(w1), b1, input_major(w2), b2), plain, rtol=0, atol=0)
        plain = module.conv_bias_act(xl, w1, b1, 1, 0, 1, True, None)
        torch.testing.assert_close(module.conv_bias_act(xl, input_major(w1), b1, 1, 0, 1, True, None), plain, rtol=0, atol=0)


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_pixel_maps_match_the_reference(variant, dtype):
    """One pixel per image (S1's last stage at 64 px): both layouts are the same bytes and take the pixel-row
    kernels; the results follow the reference and the layout rule, for plain and input-major weights, with
    and without a residual, for 1x1 and depthwise convs and the FFN."""
    module = cpp.load_variant(variant)

    def input_major(w):
        return w.transpose(0, 1).contiguous().transpose(0, 1)

    x = torch.randn(3, 24, 1, 1)
    w1, b1, w2, b2 = torch.randn(48, 24, 1, 1) / 5, torch.randn(48), torch.randn(24, 48, 1, 1) / 7, torch.randn(24)
    dw, w3, residual = torch.randn(24, 1, 3, 3) / 3, torch.randn(24, 24, 1, 1) / 5, torch.randn(3, 24, 1, 1)
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        for major in (lambda w: w, input_major):
            check_kernel(module.ffn_fused, ffn_fused_reference, cast_args((layout, major(w1), b1, major(w2), b2), dtype),
                         name="ffn_fused one pixel")
            check_kernel(module.conv_bias_act, conv_bias_act_reference,
                         cast_args((layout, major(w1), b1, 1, 0, 1, True, None), dtype), name="1x1 one pixel")
            check_kernel(module.conv_bias_act, conv_bias_act_reference,
                         cast_args((layout, major(w3), b2, 1, 0, 1, False, residual), dtype), name="1x1 one pixel, residual")
        for stride in (1, 2):
            check_kernel(module.conv_bias_act, conv_bias_act_reference,
                         cast_args((layout, dw, b2, stride, 1, 24, True, residual), dtype), name="depthwise one pixel")


@requires_cpp
def test_best_variant_is_loaded():
    assert cpp.variant() == cpp.runnable_capabilities()[0] or cpp.variant() in VARIANTS
    assert cpp.variant() == VARIANTS[0], "the loader must pick the best built variant the processor runs"


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
def test_ops_dispatch_to_each_variant(variant):
    """Through the public API (autograd off) with the variant switched in."""
    x = _layout(torch.randn(2, 32, 7, 7), True)
    w1, b1, w2, b2 = torch.randn(64, 32, 1, 1) / 6, torch.randn(64), torch.randn(32, 64, 1, 1) / 8, torch.randn(32)
    previous = cpp.set_variant(variant)
    try:
        with torch.no_grad(), shvit_kernels.use_backend("cpp"):
            got = shvit_kernels.ffn_fused(x, w1, b1, w2, b2)
    finally:
        cpp.set_variant(previous)
    assert_close_to_fp64(got, ffn_fused_reference(x, w1, b1, w2, b2), ffn_fused_reference(*(t.double() for t in (x, w1, b1, w2, b2))))


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
def test_thread_counts_agree(threads):
    """Tiling depends on the thread count; every count must give the reference's answer."""
    with _num_threads(threads):
        for op, reference, label, args in OP_CASES:
            for channels_last in (False, True):
                _check_against_reference(getattr(in_use(), op), reference, args, torch.float32,
                                         channels_last=channels_last, name=f"{threads} threads {op} {label}", op=op)


@requires_cpp
def test_large_batch_many_tiles_bf16():
    """SHViT-like widths with enough pixels for several tiles per thread, bf16 and channels_last."""
    x = torch.randn(4, 128, 14, 14)
    args = (x, torch.randn(256, 128, 1, 1) / 11, torch.randn(256), torch.randn(128, 256, 1, 1) / 16, torch.randn(128))
    _check_against_reference(in_use().ffn_fused, ffn_fused_reference, args, torch.bfloat16, channels_last=True,
                             name="ffn 128 bf16")
    xs = torch.randn(5, 224, 8, 8)
    sargs = (xs, torch.randn(32 + 48, 48, 1, 1) / 7, torch.randn(80), 16, 1e-5)
    _check_against_reference(in_use().shsa_fused, shsa_fused_reference, sargs, torch.bfloat16, channels_last=False,
                             name="shsa 224 bf16")


@requires_cpp
def test_shsa_large_mean_stays_accurate():
    """GroupNorm statistics subtract the mean before squaring: inputs with |mean| >> std keep their precision."""
    x = torch.randn(2, 24, 4, 4) * 0.1 + 1e3
    args = (x, torch.randn(32 + 16, 16, 1, 1) / 4, torch.randn(48), 16, 1e-5)
    _check_against_reference(in_use().shsa_fused, shsa_fused_reference, args, torch.float32, channels_last=False,
                             name="shsa large mean")


# ---------------------------------------------------------------------------------------------------------------
# Training kernels, called directly: every output (forward and backward) against the fp64 rule.
# ---------------------------------------------------------------------------------------------------------------
def _check_outputs(fn, reference, args, dtype, channels_last, name, unavoidable_reference=None):
    """Every output of fn (the first, out or grad_x, in x's layout), normalisation parameters kept fp32."""
    check_kernel(fn, reference, cast_args(args, dtype, channels_last, keep_fp32_vectors=True), name=name, check_layout=1,
                 unavoidable_reference=unavoidable_reference)


def exact_conv_output_reference(*args):
    """conv_bn_train_backward's reference, whose float64 run recomputes the conv output and its statistics exactly
    instead of taking the forward's: the exact gradient, against which a kept output's or the statistics' rounding
    counts as error."""
    if args[1].dtype == torch.float64:
        x, weight, stride, padding, groups = args[1], args[2], args[8], args[9], args[10]
        y = F.conv2d(x, weight, None, stride, padding, 1, groups)
        mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
        args = (*args[:5], mean, var, *args[7:-1], None)
    return conv_bn_train_backward_reference(*args)


def rounded_conv_output_reference(*args):
    """conv_bn_train_backward in float64 from the conv output as rounded in the tested dtype (the kept one, or the
    conv in that dtype: what the forward normalised) with its statistics recomputed exactly: the best any kernel can
    do from that output. Its error against the exact gradient is the conv output's rounding; over a few values per
    channel (or |mean| >> spread) grad_gamma's part of it is large, and eager's statistics, rounded independently,
    cancel some of it by chance (seen: eager 4.5x closer on one of 60 draws)."""
    x, weight, stride, padding, groups, conv_output = args[1], args[2], args[8], args[9], args[10], args[-1]
    y = conv_output if conv_output is not None else F.conv2d(x, weight, None, stride, padding, 1, groups)
    y = y.double()
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    exact = to_float64(args[:-1])
    return conv_bn_train_backward_reference(*exact[:5], mean, var, *exact[7:], y)


@drawn_with_seed(4)
def conv_train_cases():
    """(label, conv_bn_train args); BN params fp32 as under mixed precision."""
    out = []
    for label, (x, w, _, stride, pad, groups, relu, res) in conv_cases():
        c = w.shape[0]
        if x.shape[0] * ((x.shape[2] + 2 * pad - w.shape[2]) // stride + 1) * ((x.shape[3] + 2 * pad - w.shape[3]) // stride + 1) < 2:
            continue
        out.append((label, (x, w, torch.rand(c) + 0.5, torch.randn(c) * 0.3, stride, pad, groups, 1e-5, relu, res)))
    # 288 values per channel: forward statistics and backward passes in fp32 blocks from 256 on.
    out.append(("pw 288 values relu", (torch.randn(2, 40, 12, 12), torch.randn(24, 40, 1, 1) / 6, torch.rand(24) + 0.5,
                                       torch.randn(24) * 0.3, 1, 0, 1, 1e-5, True, None)))
    out.append(("dw3x3 288 values residual", (torch.randn(2, 37, 12, 12), torch.randn(37, 1, 3, 3) / 3,
                                              torch.rand(37) + 0.5, torch.randn(37) * 0.3, 1, 1, 37, 1e-5, False,
                                              torch.randn(2, 37, 12, 12))))
    # Channels whose mean is far above their spread: the statistics must not cancel.
    out.append(("pw large mean", (torch.randn(2, 16, 6, 6) * 0.01 + 300, torch.randn(8, 16, 1, 1) / 4, torch.rand(8) + 0.5,
                                  torch.randn(8), 1, 0, 1, 1e-5, True, None)))
    out.append(("pw large mean 288 values", (torch.randn(2, 16, 12, 12) * 0.01 + 300, torch.randn(8, 16, 1, 1) / 4,
                                             torch.rand(8) + 0.5, torch.randn(8), 1, 0, 1, 1e-5, True, None)))
    return out


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("label,args", conv_train_cases(), ids=[c[0] for c in conv_train_cases()])
def test_conv_training_kernels_match_reference(dtype, channels_last, label, args):
    m = in_use()
    for keep in (False, True):  # the conv output kept for the backward, or an empty slot
        _check_outputs(m.conv_bn_train, conv_bn_train_reference, (*args, keep), dtype, channels_last,
                       f"conv_bn_train {label} keep_conv_output={keep}")
    x, w, gamma, beta, stride, pad, groups, eps, relu, res = args
    out, mean, var, y = conv_bn_train_reference(*args, True)
    grad = torch.randn_like(out)
    bwd = (grad, x, w, gamma, beta, mean, var, out, stride, pad, groups, eps, relu, res is not None, True)
    for conv_output in (None, y):  # recomputed, or the forward's kept one
        _check_outputs(m.conv_bn_train_backward, exact_conv_output_reference, (*bwd, conv_output), dtype,
                       channels_last, f"conv_bn_train_backward {label} kept={conv_output is not None}",
                       unavoidable_reference=rounded_conv_output_reference)
    # Without the input gradient: an empty one in its place, every other output as before.
    cast = cast_args(bwd, dtype, channels_last, keep_fp32_vectors=True)
    full, skipped = m.conv_bn_train_backward(*cast, None), m.conv_bn_train_backward(*cast[:-1], False, None)
    assert full[0].shape == x.shape and skipped[0].shape == (0,) and skipped[0].dtype == full[0].dtype
    # The masked gradient (the residual's) only with a residual.
    assert full[4].shape == ((0,) if res is None else out.shape)
    for a, b in zip(full[1:], skipped[1:]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    bias = torch.randn(w.shape[0])
    out = conv_bias_act_reference(x, w, bias, stride, pad, groups, relu, res)
    bwd = (grad, x, w, bias, stride, pad, groups, relu, res, out)
    _check_outputs(m.conv_bias_act_backward, conv_bias_act_backward_reference, bwd, dtype, channels_last,
                   f"conv_bias_act_backward {label}")


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("label,args", ffn_cases(), ids=[c[0] for c in ffn_cases()])
def test_ffn_backward_matches_reference(variant, dtype, channels_last, label, args):
    """grad_x, grad_w1, grad_b1, grad_w2, grad_b2 (biases in x's dtype, as the op wrapper passes them)."""
    x, w1, b1, w2, b2 = args
    grad = torch.randn_like(x)
    bwd = (grad, x, w1, b1.to(dtype), w2, b2.to(dtype))
    _check_outputs(cpp.load_variant(variant).ffn_fused_backward, ffn_fused_backward_reference, bwd, dtype,
                   channels_last, f"{variant} ffn_fused_backward {label}")


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
def test_ffn_backward_many_tiles_threads(threads):
    """Enough pixels for several tiles and chunks per thread: the per-chunk dW partial sums must combine exactly."""
    x = torch.randn(6, 32, 23, 21)
    args = (torch.randn_like(x), x, torch.randn(64, 32, 1, 1) / 6, torch.randn(64), torch.randn(32, 64, 1, 1) / 8,
            torch.randn(32))
    with _num_threads(threads):
        for channels_last in (False, True):
            _check_outputs(in_use().ffn_fused_backward, ffn_fused_backward_reference, args, torch.float32,
                           channels_last, f"ffn_fused_backward {threads} threads")


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("label,args", shsa_cases(), ids=[c[0] for c in shsa_cases()])
def test_shsa_backward_matches_reference(variant, dtype, channels_last, label, args):
    """grad_x (attended and pass-through channels), grad_qkv_weight, grad_qkv_bias."""
    x, w, b, qk, eps = args
    out = shsa_fused_reference(x, w, b, qk, eps)
    bwd = (torch.randn_like(out), x, w, b.to(dtype), out, qk, eps)
    _check_outputs(cpp.load_variant(variant).shsa_fused_backward, shsa_fused_backward_reference, bwd, dtype,
                   channels_last, f"{variant} shsa_fused_backward {label}")


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
def test_shsa_backward_threads_and_large_mean(threads):
    """Several images per chunk at 1 and 2 threads; GroupNorm with |mean| >> std keeps its precision."""
    x = torch.randn(5, 24, 4, 4) * 0.1 + 1e3
    w, b = torch.randn(32 + 16, 16, 1, 1) / 4, torch.randn(48)
    out = shsa_fused_reference(x, w, b, 16, 1e-5)
    with _num_threads(threads):
        for channels_last in (False, True):
            _check_outputs(in_use().shsa_fused_backward, shsa_fused_backward_reference,
                           (torch.randn_like(out), x, w, b, out, 16, 1e-5), torch.float32, channels_last,
                           f"shsa_fused_backward {threads} threads")


@drawn_with_seed(5)
def shsa_train_cases():
    """(label, shsa_train args): odd sizes, P = 75, P = C, 1x1 maps, batch 1, qk_dim 4, |mean| >> std; GroupNorm and
    BatchNorm parameters fp32 (as under mixed precision)."""
    out = []
    for label, (b, c, p, hw, qk, scale, shift) in {
        "C40 P21 5x7": (3, 40, 21, (5, 7), 16, 2.0, 1.0),
        "C80 P75 3x5": (2, 80, 75, (3, 5), 16, 1.0, 0.0),
        "P=C 4x4": (2, 24, 24, (4, 4), 16, 1.0, 0.0),
        "1x1 batch 4": (4, 20, 12, (1, 1), 16, 1.0, 0.0),
        "batch 1 3x3 qk 4": (1, 12, 5, (3, 3), 4, 1.0, 0.0),
        "|x| 1e4": (2, 30, 16, (3, 4), 16, 100.0, 1e4),
    }.items():
        r = 2 * qk + p
        out.append((label, (torch.randn(b, c, *hw) * scale + shift, torch.randn(p) * 0.3 + 1, torch.randn(p) * 0.3,
                            torch.randn(r, p, 1, 1) / p ** 0.5, torch.randn(r) * 0.3 + 1, torch.randn(r) * 0.3, qk,
                            1e-5, 1e-5)))
    return out


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("label,args", shsa_train_cases(), ids=[c[0] for c in shsa_train_cases()])
def test_shsa_train_matches_reference(variant, dtype, channels_last, label, args):
    """out, batch mean, var; then grad_x and the five parameter grads from the reference's statistics."""
    module = cpp.load_variant(variant)
    _check_outputs(module.shsa_train, shsa_train_reference, args, dtype, channels_last, f"{variant} shsa_train {label}")
    x, gn_w, gn_b, w, bn_w, bn_b, qk, gn_eps, bn_eps = args
    out, mean, var = shsa_train_reference(*args)
    bwd = (torch.randn_like(out), x, gn_w, gn_b, w, bn_w, bn_b, mean, var, out, qk, gn_eps, bn_eps)
    _check_outputs(module.shsa_train_backward, shsa_train_backward_reference, bwd, dtype, channels_last,
                   f"{variant} shsa_train_backward {label}")


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("variant", VARIANTS)
def test_shsa_train_forward_is_the_reference_to_the_bit(variant, threads):
    """tests/test_train.py's lock-step parity breaks on any last-ulp difference in this op's output, so the forward
    reproduces the reference exactly: out and mean to the bit; var (fp64 two-pass, as torch.var's fp64 Welford)
    differs at most by one ulp on an exact tie."""
    module = cpp.load_variant(variant)
    with _num_threads(threads):
        for label, args in shsa_train_cases():
            for dtype in DTYPES:
                for channels_last in (False, True):
                    low = [_layout(a.to(dtype), channels_last) if a.dim() == 4 else a for a in args[:4]] + list(args[4:])
                    (out, mean, var), (ref_out, ref_mean, ref_var) = module.shsa_train(*low), shsa_train_reference(*low)
                    where = f"{label} {dtype} channels_last={channels_last}"
                    assert torch.equal(out, ref_out) and torch.equal(mean, ref_mean), where
                    assert torch.equal(var, ref_var) or torch.equal(var, torch.nextafter(ref_var, var)), where


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
def test_shsa_train_backward_threads(threads):
    """Several images per chunk at 1 and 2 threads: per-image and per-chunk partial sums combine in a fixed order."""
    x = torch.randn(7, 40, 3, 5)
    args = (x, torch.randn(24) * 0.3 + 1, torch.randn(24) * 0.3, torch.randn(56, 24, 1, 1) / 5, torch.rand(56) + 0.5,
            torch.randn(56) * 0.3, 16, 1e-5, 1e-5)
    out, mean, var = shsa_train_reference(*args)
    with _num_threads(threads):
        for channels_last in (False, True):
            bwd = (torch.randn_like(out), *args[:6], mean, var, out, *args[6:])
            _check_outputs(in_use().shsa_train_backward, shsa_train_backward_reference, bwd, torch.float32,
                           channels_last, f"shsa_train_backward {threads} threads")


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_conv_bn_train_normalises_as_the_reference(variant, threads, channels_last):
    """The forward's conv output y: ATen's in bf16 (the reference's bits), the cpp backend's own conv in fp32 (within
    the tolerance rule; ATen's fp32 convs ran S1's training at 66% of the FMA peak). Its statistics: over fewer than
    256 values per channel ATen's mean of y (bit for bit) and y's exact variance (torch.var's, but for bf16 near-ties);
    from 256 on, one pass of the kernel's own, checked against fp64 ones. out is the reference's normalisation of y
    with those statistics, bit for bit: it rounds where the reference rounds, so a ReLU mask follows the statistics."""
    with _num_threads(threads):
        for label, args in conv_train_cases():
            for dtype in DTYPES:
                low = [_layout(a.to(dtype), channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
                       for a in args]
                x, weight, gamma, beta, stride, pad, groups, eps, relu, residual = low
                ref_y = conv_bn_train_reference(*low, True)[3]
                own_statistics = ref_y.numel() // ref_y.shape[1] >= 256
                kernel = cpp.load_variant(variant).conv_bn_train
                own_y = kernel(*low, True)[3]
                name = f"{variant} {label} {dtype}"
                if dtype == torch.bfloat16:
                    assert torch.equal(own_y, ref_y), name
                else:
                    exact = F.conv2d(x.double(), weight.double(), None, stride, pad, 1, groups)
                    assert_close_to_fp64(own_y, ref_y, exact, name=f"{name} conv output")
                for keep in (False, True):
                    out, mean, var, y = kernel(*low, keep)
                    name = f"{variant} {label} {dtype} keep_conv_output={keep}"
                    assert torch.equal(y, own_y) if keep else y.numel() == 0, name
                    if own_statistics:
                        y64 = own_y.double()
                        mean64, var64 = y64.mean(dim=(0, 2, 3)), y64.var(dim=(0, 2, 3), unbiased=False)
                        spread = var64.sqrt() + mean64.abs()
                        assert ((mean.double() - mean64).abs() <= 1e-6 * spread).all(), name
                        assert ((var.double() - var64).abs() <= 1e-5 * var64 + 1e-12).all(), name
                    else:
                        assert torch.equal(mean, own_y.mean(dim=(0, 2, 3), dtype=torch.float32)), name
                        same = var == own_y.float().var(dim=(0, 2, 3), unbiased=False)
                        assert same.all() or dtype == torch.bfloat16, name
                    expected = conv_bn_train_output_reference(own_y, gamma, beta, mean, var, eps, relu, residual)
                    assert torch.equal(out, expected), name


@requires_cpp
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bn_train_statistics_do_not_depend_on_the_thread_count(variant, dtype):
    """Maps of at most 256 pixels are one row task of the statistics passes; on two threads its channel blocks are
    split between them. Each channel is still summed in the same order: the forward's out, mean and var and the
    BatchNorm parameters' gradients are the same bits on one thread and on two (fp32 blocks from 256 values per
    channel, fp64 sums below; a partial last channel block; 1x1 and depthwise)."""
    module = cpp.load_variant(variant)
    g = torch.Generator().manual_seed(11)
    cases = {
        "1x1 256 values": (torch.randn(4, 24, 8, 8, generator=g), torch.randn(40, 24, 1, 1, generator=g), 1, 0, 1),
        "1x1 64 values": (torch.randn(4, 24, 4, 4, generator=g), torch.randn(72, 24, 1, 1, generator=g), 1, 0, 1),
        "dw 256 values": (torch.randn(16, 56, 4, 4, generator=g), torch.randn(56, 1, 3, 3, generator=g), 1, 1, 56),
    }
    for label, (x, w, stride, pad, groups) in cases.items():
        c = w.shape[0]
        x, w = x.to(dtype).contiguous(memory_format=torch.channels_last), (w / w[0].numel() ** 0.5).to(dtype)
        gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        results = []
        for threads in (1, 2):
            with _num_threads(threads):
                out, mean, var, y = module.conv_bn_train(x, w, gamma, beta, stride, pad, groups, 1e-5, True, None, True)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
                grad = grad.contiguous(memory_format=torch.channels_last)
                grads = module.conv_bn_train_backward(grad, x, w, gamma, beta, mean, var, out, stride, pad, groups,
                                                      1e-5, True, False, True, y)
                results.append((out, mean, var, grads[2], grads[3]))
        for name, one, two in zip(("out", "mean", "var", "grad bn_weight", "grad bn_bias"), *results):
            assert torch.equal(one, two), f"{variant} {label} {dtype}: {name} differs between one and two threads"


@requires_cpp
@pytest.mark.parametrize("weight_layout", ("contiguous", "channels_last"))
def test_conv_backward_outputs_need_no_layout_copy(weight_layout):
    """A model moved to channels_last has channels_last 3x3 weights; the backward kernels return each gradient in
    the layout the op's rule gives (grad_w like its weight), so the wrapper copies nothing."""
    from shvit_kernels.ops import _common

    x = torch.randn(2, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 16, 3, 3)
    weight = weight.contiguous(memory_format=torch.channels_last) if weight_layout == "channels_last" else weight
    assert (weight_layout == "channels_last") == (_common.memory_format_of(weight) == torch.channels_last)
    gamma, beta = torch.rand(32) + 0.5, torch.randn(32)
    out, mean, var, _ = in_use().conv_bn_train(x, weight, gamma, beta, 2, 1, 1, 1e-5, True, None, False)
    grad_out = torch.randn_like(out)
    calls = {
        "conv_bn_train_backward": (grad_out, x, weight, gamma, beta, mean, var, out, 2, 1, 1, 1e-5, True, False, True,
                                   None),
        "conv_bias_act_backward": (grad_out, x, weight, beta, 2, 1, 1, True, None, out),
    }
    for op, args in calls.items():
        result = getattr(in_use(), op)(*args)
        assert _common._same_outputs(_common._normalize_outputs(op, result, args), result), op
        assert result[1].stride() == weight.stride(), op


@requires_cpp
def test_conv_bn_train_statistics_do_not_cancel():
    """|mean| / std = 1e5: a naive fp32 sum of squares would lose the variance entirely."""
    x = torch.randn(4, 8, 16, 16) * 1e-3
    w = torch.eye(8).reshape(8, 8, 1, 1)
    for channels_last in (False, True):
        xx = _layout(x + 100.0, channels_last)
        _, mean, var, _ = in_use().conv_bn_train(xx, w, torch.ones(8), torch.zeros(8), 1, 0, 1, 1e-5, False, None, False)
        ref = xx.double().var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(var.double(), ref, rtol=1e-3, atol=0)
        torch.testing.assert_close(mean.double(), xx.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


@requires_cpp
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_conv_bn_train_input_gradient_over_few_values_per_channel(channels_last):
    """BatchNorm over 2-6 values per channel: its input gradient cancels to eps-sized terms, where fp32 statistics'
    rounding alone made errors of up to 15x the reference's (1.2% of such random cases failed the tolerance rule)."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    cases = 0
    while cases < 100:
        n, c_in, k, stride, h, w = rng.randint(1, 2), rng.randint(1, 8), rng.choice((1, 3)), rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3)
        ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        if not 2 <= n * ho * wo <= 6:
            continue
        cases += 1
        x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
        args = (torch.randn(4, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5,
                torch.rand(4, generator=gen, dtype=torch.float64) + 0.5, torch.randn(4, generator=gen, dtype=torch.float64))
        grad_out = torch.randn(n, 4, ho, wo, generator=gen, dtype=torch.float64)
        grads = {}
        for backend, dtype in (("cpp", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
            xx = _layout(x.to(dtype), channels_last).requires_grad_()
            with dispatch.use_backend(backend):
                out = shvit_kernels.conv_bn(xx, *(a.to(dtype) for a in args), None, None, stride=stride, padding=k // 2,
                                            training=True)
            grads[backend, dtype] = torch.autograd.grad(out, xx, grad_out.to(dtype))[0]
        assert_close_to_fp64(grads["cpp", torch.float32], grads["reference", torch.float32],
                             grads["reference", torch.float64], name=f"case {cases}: grad x of {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Bad input to the C++ functions: clear errors naming the argument, never a crash.
# ---------------------------------------------------------------------------------------------------------------
def _bad_calls():
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(16, 8, 1, 1)
    return [
        ("conv_bias_act", (x.double(), w.double(), None, 1, 0, 1, False, None), "'x' must be float32 or bfloat16"),
        ("conv_bias_act", (x, w.bfloat16(), None, 1, 0, 1, False, None), "'weight' has dtype"),
        ("conv_bias_act", (x[0], w, None, 1, 0, 1, False, None), "'x' must be 4-D"),
        ("conv_bias_act", (x, torch.randn(16, 7, 1, 1), None, 1, 0, 1, False, None), "input channels but 'x' has 8"),
        ("conv_bias_act", (x, w, torch.randn(15), 1, 0, 1, False, None), "'bias' must have shape [16]"),
        ("conv_bias_act", (x, w, None, 1, 0, 1, False, torch.randn(2, 16, 4, 5)), "'residual' must have shape"),
        ("conv_bias_act", (x, torch.randn(8, 1, 5, 5), None, 1, 2, 8, False, None), "depthwise 3x3"),
        ("conv_bias_act", (x, w, None, 0, 0, 1, False, None), "'stride' must be >= 1"),
        ("conv_bias_act", (x, torch.randn(4, 8, 9, 9), None, 1, 0, 1, False, None), "smaller than the kernel"),
        ("conv_bn_train", (x, w, torch.ones(15), torch.zeros(16), 1, 0, 1, 1e-5, False, None, False), "'bn_weight' must have shape [16]"),
        ("conv_bn_train", (x, torch.randn(16, 3, 3, 3), torch.ones(16), torch.zeros(16), 1, 1, 1, 1e-5, False, None, False),
         "expects 3 input channels but 'x' has 8"),
        ("conv_bn_train", (x, w, torch.ones(16), torch.zeros(16), 1, 0, 1, -1.0, False, None, False), "'eps' must be >= 0"),
        ("conv_bn_train", (x[:1, :, :1, :1], w, torch.ones(16), torch.zeros(16), 1, 0, 1, 1e-5, False, None, False),
         "more than one value per channel"),
        ("conv_bn_train", (x, w, torch.ones(16), torch.zeros(16), 1, 0, 3, 1e-5, False, None, False), "'groups' = 3"),
        ("conv_bn_train_backward", (torch.randn(2, 16, 5, 4), x, w, torch.ones(16), torch.zeros(16), torch.zeros(16),
                                    torch.ones(16), torch.randn(2, 16, 5, 5), 1, 0, 1, 1e-5, True, False, True, None), "'grad_out' must have shape"),
        ("conv_bn_train_backward", (torch.randn(2, 16, 5, 5), x, w, torch.ones(16), torch.zeros(16), torch.zeros(16),
                                    torch.ones(16), torch.randn(2, 16, 5, 5), 1, 0, 1, 1e-5, True, False, True,
                                    torch.randn(2, 16, 5, 4)), "'conv_output' must have shape"),
        ("conv_bn_train_backward", (torch.randn(2, 16, 5, 5), x, w, torch.ones(16), torch.zeros(16), torch.zeros(15),
                                    torch.ones(16), torch.randn(2, 16, 5, 5), 1, 0, 1, 1e-5, True, False, True, None), "'mean' must have shape"),
        ("conv_bias_act_backward", (torch.randn(2, 16, 5, 5), x, w, None, 1, 0, 1, True, None, torch.randn(2, 16, 5, 5).bfloat16()),
         "'out' has dtype"),
        ("conv_bn_train_output", (x.double(), torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8), 1e-5, True,
                                  None), "'conv_output' must be float32 or bfloat16"),
        ("conv_bn_train_output", (x, torch.ones(7), torch.zeros(8), torch.zeros(8), torch.ones(8), 1e-5, True, None),
         "'bn_weight' must have shape [8]"),
        ("conv_bn_train_output", (x, torch.ones(8), torch.zeros(8), torch.zeros(8).double(), torch.ones(8), 1e-5, True,
                                  None), "'mean' must be float32"),
        ("conv_bn_train_output", (x, torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8), 1e-5, True,
                                  torch.randn(2, 8, 5, 4)), "'residual' must have shape"),
        ("conv_bn_train_output", (x, torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8), -1.0, True, None),
         "'eps' must be >= 0"),
        ("conv_bn_train_output", (x, torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8), 1e-5, True,
                                  x.bfloat16()), "but 'conv_output' has"),
        ("ffn_fused", (x, torch.randn(16, 8, 1, 1), torch.randn(16), torch.randn(8, 15, 1, 1), torch.randn(8)), "'w2' must have shape"),
        ("ffn_fused", (x, torch.randn(16, 8, 1, 1), torch.randn(3), torch.randn(8, 16, 1, 1), torch.randn(8)), "'b1' must have shape"),
        ("ffn_fused", (torch.randn(0, 8, 5, 5), w, torch.randn(16), torch.randn(8, 16, 1, 1), torch.randn(8)), "must not be empty"),
        ("ffn_fused_backward", (torch.randn(2, 8, 5, 4), x, torch.randn(16, 8, 1, 1), torch.randn(16),
                                torch.randn(8, 16, 1, 1), torch.randn(8)), "'grad_out' must have shape"),
        ("ffn_fused_backward", (torch.randn(2, 8, 5, 5).bfloat16(), x, torch.randn(16, 8, 1, 1), torch.randn(16),
                                torch.randn(8, 16, 1, 1), torch.randn(8)), "'grad_out' has dtype"),
        ("ffn_fused_backward", (torch.randn(2, 8, 5, 5), x, torch.randn(16, 8, 1, 1), torch.randn(16),
                                torch.randn(8, 15, 1, 1), torch.randn(8)), "'w2' must have shape"),
        ("shsa_fused_backward", (torch.randn(2, 8, 5, 5), x, torch.randn(36, 4, 1, 1), torch.randn(36),
                                 torch.randn(2, 8, 4, 5), 16, 1e-5), "'out' must have shape"),
        ("shsa_fused_backward", (torch.randn(2, 8, 5, 5).bfloat16(), x, torch.randn(36, 4, 1, 1), torch.randn(36),
                                 torch.randn(2, 8, 5, 5), 16, 1e-5), "'grad_out' has dtype"),
        ("shsa_fused_backward", (torch.randn(2, 8, 5, 5), x, torch.randn(36, 4, 1, 1), torch.randn(35),
                                 torch.randn(2, 8, 5, 5), 16, 1e-5), "'qkv_bias' must have shape"),
        ("shsa_fused", (x, torch.randn(35, 4, 1, 1), torch.randn(35), 16, 1e-5), "'qkv_weight' must have shape"),
        ("shsa_fused", (x, torch.randn(41, 9, 1, 1), torch.randn(41), 16, 1e-5), "partial dim P"),
        ("shsa_fused", (x, torch.randn(36, 4, 1, 1), torch.randn(35), 16, 1e-5), "'qkv_bias' must have shape"),
        ("shsa_fused", (x, torch.randn(36, 4, 1, 1), torch.randn(36), 0, 1e-5), "'qk_dim' must be >= 1"),
        ("shsa_fused", (x, torch.randn(40, 8, 1, 1), torch.randn(39), 16, 1e-5), "'qkv_bias' must have shape"),
        ("shsa_fused", (x, torch.randn(40, 8, 1, 1).half(), torch.randn(40), 16, 1e-5), "'qkv_weight' must be float32 or bfloat16"),
        ("shsa_train", (x, torch.ones(3), *_shsa_train_params(36, 4)[1:], 16, 1e-5, 1e-5), "'gn_weight' must have shape [4]"),
        ("shsa_train", (x, *_shsa_train_params(36, 4)[:4], torch.zeros(35), 16, 1e-5, 1e-5), "'bn_bias' must have shape [36]"),
        ("shsa_train", (x, torch.ones(4).double(), *_shsa_train_params(36, 4)[1:], 16, 1e-5, 1e-5),
         "'gn_weight' must be float32 or bfloat16"),
        ("shsa_train", (x, *_shsa_train_params(36, 4), 16, 1e-5, -1.0), "'bn_eps' must be >= 0"),
        ("shsa_train", (x[:1, :, :1, :1], *_shsa_train_params(36, 4), 16, 1e-5, 1e-5), "more than one value per channel"),
        ("shsa_train", (x, *_shsa_train_params(37, 4), 16, 1e-5, 1e-5), "'qkv_weight' must have shape"),
        ("shsa_train_backward", (torch.randn(2, 8, 5, 5), x, *_shsa_train_params(36, 4), torch.zeros(35), torch.ones(36),
                                 torch.randn(2, 8, 5, 5), 16, 1e-5, 1e-5), "'mean' must have shape [36]"),
        ("shsa_train_backward", (torch.randn(2, 8, 5, 5), x, *_shsa_train_params(36, 4), torch.zeros(36), torch.ones(36),
                                 torch.randn(2, 8, 5, 5).bfloat16(), 16, 1e-5, 1e-5), "'out' has dtype"),
        ("shsa_train_backward", (torch.randn(2, 8, 4, 5), x, *_shsa_train_params(36, 4), torch.zeros(36), torch.ones(36),
                                 torch.randn(2, 8, 5, 5), 16, 1e-5, 1e-5), "'grad_out' must have shape"),
        ("squeeze_excite", (x, torch.randn(2, 7, 1, 1), torch.randn(2), torch.randn(8, 2, 1, 1), torch.randn(8)),
         "'w1' must have shape [2, 8, 1, 1]"),
        ("squeeze_excite", (x, torch.randn(2, 8, 1, 1), torch.randn(2), torch.randn(8, 3, 1, 1), torch.randn(8)),
         "'w2' must have shape [8, 2, 1, 1]"),
        ("squeeze_excite", (x, torch.randn(2, 8, 1, 1), torch.randn(3), torch.randn(8, 2, 1, 1), torch.randn(8)),
         "'b1' must have shape [2]"),
        ("squeeze_excite", (x, torch.randn(2, 8, 1, 1).bfloat16(), torch.randn(2), torch.randn(8, 2, 1, 1), torch.randn(8)),
         "'w1' has dtype"),
    ]


def _shsa_train_params(rows, p):
    """gn_weight, gn_bias, qkv_weight (rows, p, 1, 1), bn_weight, bn_bias."""
    return torch.ones(p), torch.zeros(p), torch.randn(rows, p, 1, 1), torch.ones(rows), torch.zeros(rows)


@requires_cpp
@pytest.mark.parametrize("op,args,message", _bad_calls(), ids=[f"{c[0]}-{c[2][:30]}" for c in _bad_calls()])
def test_bad_input_gives_clear_error(op, args, message):
    with pytest.raises(RuntimeError, match=None) as info:
        getattr(in_use(), op)(*args)
    assert message in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: what the backend declines, and why.
# ---------------------------------------------------------------------------------------------------------------
@requires_cpp
def test_large_outputs_reuse_released_blocks():
    """Outputs of 256 KiB and more come from a cache of released blocks; reused memory still gives exact results."""
    module = in_use()
    module.release_cached_outputs()
    x = torch.randn(2, 64, 96, 96).contiguous(memory_format=torch.channels_last)  # 4.7 MB in and out
    w, b = torch.randn(64, 64, 1, 1) / 8, torch.randn(64)
    want = module.conv_bias_act(x, w, b, 1, 0, 1, True, None)
    first = module.conv_bias_act(x, w, b, 1, 0, 1, True, None)
    first.fill_(float("nan"))
    ptr = first.data_ptr()
    del first
    assert module.cached_output_bytes() >= x.numel() * 4
    again = module.conv_bias_act(x, w, b, 1, 0, 1, True, None)
    assert again.data_ptr() == ptr and again.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    del again, want
    assert module.release_cached_outputs() >= x.numel() * 4 and module.cached_output_bytes() == 0
    # S1's stage-1 activations (1.6 MB) too: glibc gave them fresh pages on every forward.
    mid = torch.randn(16, 128, 14, 14).contiguous(memory_format=torch.channels_last)
    taps, bias = torch.randn(128, 1, 3, 3), torch.randn(128)
    first = module.conv_bias_act(mid, taps, bias, 1, 1, 128, False, mid)
    ptr = first.data_ptr()
    del first
    assert module.cached_output_bytes() == mid.numel() * 4
    assert module.conv_bias_act(mid, taps, bias, 1, 1, 128, False, mid).data_ptr() == ptr
    module.release_cached_outputs()



@requires_cpp
def test_blocks_no_call_takes_are_freed_on_a_miss():
    """A cached block no call has taken for idle_output_allocations() allocations is freed when a call needs a size
    the cache lacks (sizes a run stopped using); blocks still in use stay, and a loop whose sizes repeat never
    misses."""
    module = in_use()
    module.release_cached_outputs()
    idle = module.idle_output_allocations()
    assert idle >= 256  # a training step takes its sizes again a few hundred allocations later
    image = lambda h: torch.randn(1, 3, h, 128)  # noqa: E731  (to_channels_last: its output is a cached block)
    a, b, c = image(256), image(192), image(224)
    idle_bytes, busy_bytes = a.numel() * 4, b.numel() * 4
    del_me = module.to_channels_last(a)
    del del_me
    assert module.cached_output_bytes() == idle_bytes
    for _ in range(idle + 6):  # the first a miss (a's block is not yet idle long enough), then hits
        out = module.to_channels_last(b)
        del out
    assert module.cached_output_bytes() == idle_bytes + busy_bytes
    out = module.to_channels_last(c)  # a miss: a's block, idle for idle + 7 allocations, goes; b's stays
    assert module.cached_output_bytes() == busy_bytes
    del out
    module.release_cached_outputs()

def _input_major(w):
    return w.reshape(w.shape[0], -1).t().contiguous().t().reshape(w.shape)


def _packed_weight_calls(dtype):
    """(label, call(module, weight), weight): each kind of weight the kernels repack (1x1 GEMM in both layouts, FFN,
    dense 3x3 through the register-blocked and the row-GEMM paths, the 3-channel stem conv, depthwise)."""
    g = torch.Generator().manual_seed(3)

    def act(c, hw):
        return torch.randn(2, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)

    def weight(*shape):
        return (torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(dtype)

    x32, x16, x3 = act(32, 5), act(16, 9), act(3, 12)
    b64, b32 = torch.randn(64, generator=g), torch.randn(32, generator=g)
    ffn_w2, ffn_w1_im = weight(32, 64, 1, 1), _input_major(weight(64, 32, 1, 1))
    qkv_b = b32.to(dtype)  # qk 8 + 8 rows and P = 16 value rows
    return [
        ("1x1", lambda m, w: m.conv_bias_act(x32, w, b64, 1, 0, 1, True, None), weight(64, 32, 1, 1)),
        ("1x1 input-major", lambda m, w: m.conv_bias_act(x32, w, b64, 1, 0, 1, True, None),
         _input_major(weight(64, 32, 1, 1))),
        ("ffn w1", lambda m, w: m.ffn_fused(x32, w, b64, ffn_w2, b32), _input_major(weight(64, 32, 1, 1))),
        ("ffn w1 nchw", lambda m, w: m.ffn_fused(x32.contiguous(), w, b64, ffn_w2, b32), weight(64, 32, 1, 1)),
        ("dense 3x3", lambda m, w: m.conv_bias_act(x16, w, b32, 2, 1, 1, False, None), weight(32, 16, 3, 3)),
        ("stem 3x3", lambda m, w: m.conv_bias_act(x3, w, b32[:16], 2, 1, 1, True, None), weight(16, 3, 3, 3)),
        ("depthwise", lambda m, w: m.conv_bias_act(x32, w, b32, 1, 1, 32, False, x32), weight(32, 1, 3, 3)),
        # The "weight" changed below is the bias here: bf16 biases are kept converted to fp32.
        ("bias", lambda m, b: m.conv_bias_act(x32, ffn_w1_im, b, 1, 0, 1, True, None), b64.clone().to(dtype)),
        ("shsa qkv", lambda m, w: m.shsa_fused(x32, w, qkv_b, 8, 1e-5), weight(16 + 16, 16, 1, 1)),
        ("shsa qkv input-major", lambda m, w: m.shsa_fused(x32, w, qkv_b, 8, 1e-5),
         _input_major(weight(16 + 16, 16, 1, 1))),
    ]


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("auto", "dot", "fp32"))
def test_packed_weights_are_reused_and_rebuilt_after_in_place_changes(dtype, mode):
    """A weight is packed once and its copy reused while it is unchanged; an in-place write repacks it (a stale copy
    would give the old weight's result: the changed weight must give exactly what a fresh copy of it gives)."""
    module = in_use()
    if dtype == torch.float32 and mode != "auto":
        pytest.skip("the bf16 products setting only concerns bf16")
    try:
        previous = module.set_bf16_products(mode)
    except RuntimeError as e:
        pytest.skip(f"bf16 pair products cannot run on this processor: {e}")
    try:
        for label, call, w in _packed_weight_calls(dtype):
            module.clear_derived_weights()
            before = call(module, w)
            held = module.derived_weight_count()
            torch.testing.assert_close(call(module, w), before, rtol=0, atol=0, msg=f"{label}: second call")
            assert module.derived_weight_count() == held, label
            with torch.no_grad():
                w.mul_(-1.5).add_(0.125)
            after = call(module, w)
            fresh = call(module, w.clone())
            torch.testing.assert_close(after, fresh, rtol=0, atol=0, msg=f"{label}: after an in-place change")
            assert not torch.equal(after, before), label
            # Read in place, nothing to pack: input-major fp32 B, and row-major A of the NCHW FFN unless widened.
            in_place = {"ffn w1 nchw"} if dtype == torch.float32 or not module.bf16_widened() else set()
            if dtype == torch.float32:
                in_place |= {"shsa qkv input-major"}
                if not module.fp32_tiles_active():  # the fp32 tiles pack 1x1 weights into panels
                    in_place |= {"1x1 input-major", "bias"}
            assert (held == 0) == (label in in_place), f"{label}: {held} packed copies"
    finally:
        module.set_bf16_products(previous)
        module.clear_derived_weights()


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_weights_of_freed_or_inference_weights_are_not_kept(dtype):
    """Weights freed and reallocated (often at the same address) are repacked, and their copies dropped; inference
    tensors, which have no version counter, are never remembered."""
    module = in_use()
    module.clear_derived_weights()
    x = torch.randn(2, 32, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    for i in range(12):
        w = torch.randn(64, 32, 1, 1).to(dtype) / 6
        got = module.conv_bias_act(x, w, None, 1, 0, 1, False, None)
        want = conv_bias_act_reference(x.double(), w.double(), None, 1, 0, 1, False, None)
        torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05, msg=f"weight {i}")
        del w, got
    assert module.derived_weight_count() <= 1
    module.clear_derived_weights()
    with torch.inference_mode():
        w = torch.randn(64, 32, 1, 1).to(dtype)
        module.conv_bias_act(x, w, None, 1, 0, 1, False, None)
    assert module.derived_weight_count() == 0
    module.conv_bias_act(x, w.clone(), None, 1, 0, 1, False, None)  # an ordinary tensor: remembered
    assert cpp.packed_weight_count() == 1
    assert cpp.clear_packed_weights() >= 1 and cpp.packed_weight_count() == 0  # every loaded build's


@requires_cpp
@pytest.mark.parametrize("mode", ("brgemm", "aten"))
@pytest.mark.parametrize("threads", (1, 2))
def test_pointwise_conv_grads_on_each_gemm_path(monkeypatch, mode, threads):
    """The 1x1 channels_last conv gradients, on the micro-kernel GEMMs (row chunks of at most 512 and per-thread
    partial weight gradients; on two threads over at most 512 rows per thread, dy and gx by rows, then gw by output
    channels, odd row counts included) and on ATen's mm, against fp64 under the tolerance rule, alone and behind the
    Conv+BN backward, with and without the input gradient; a bad setting is a clear error for the backward only (the
    autotune key does not time or read it)."""
    monkeypatch.setenv("SHVIT_CPU_POINTWISE_GRADS", mode)
    module = in_use()
    assert cpp.pointwise_grads() == mode
    bf16_pairs = mode == "brgemm" and cpp.bf16_products() == "dot"  # "dot" needs the bf16 micro-kernel
    assert cpp.pointwise_grads(torch.bfloat16) == ("brgemm_bf16" if bf16_pairs else mode)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 126 and 35 rows (split by channels on two threads); 1,260 rows in 3 chunks (partials)
        for shape, cout in (((2, 48, 9, 7), 40), ((1, 40, 5, 7), 24), ((3, 24, 20, 21), 72)):
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(cout, shape[1], 1, 1) / shape[1] ** 0.5, torch.randn(cout)
            out = module.conv_bias_act(x, w, b, 1, 0, 1, True, None)
            g = torch.randn_like(out)
            gx, gw = module.conv_bias_act_backward(g, x, w, b, 1, 0, 1, True, None, out)[:2]
            masked = g * (out > 0)
            grads = {}
            for dtype in (torch.float32, torch.float64):  # PyTorch's own fp32 error, and the fp64 reference
                xr, wr = (t.to(dtype, copy=True).requires_grad_() for t in (x, w))
                torch.autograd.backward(torch.nn.functional.conv2d(xr, wr), masked.to(dtype))
                grads[dtype] = (xr.grad, wr.grad)
            for i, (name, got) in enumerate((("grad x", gx), ("grad w", gw))):
                assert_close_to_fp64(got, grads[torch.float32][i], grads[torch.float64][i], name=f"{mode} {shape} {name}")
            # Conv+BN: on the micro-kernel path dy goes to the GEMMs chunk by chunk as the BatchNorm backward makes it.
            gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout)
            bn_out, mean, var, y = conv_bn_train_reference(x, w, gamma, beta, 1, 0, 1, 1e-5, True, None, True)
            for conv_output, dtype, input_grad in ((None, torch.float32, True), (y, torch.float32, False),
                                                   (None, torch.bfloat16, True), (None, torch.bfloat16, False)):
                # bf16: in bf16 pairs on the micro-kernel where bf16 GEMMs multiply as pairs.
                bwd = (torch.randn_like(bn_out), x, w, gamma, beta, mean, var, bn_out, 1, 0, 1, 1e-5, True, False,
                       input_grad, conv_output)
                _check_outputs(module.conv_bn_train_backward, exact_conv_output_reference, bwd, dtype, True,
                               f"{mode} {threads} threads {shape} {dtype} conv_bn_train_backward",
                               unavoidable_reference=rounded_conv_output_reference)
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setenv("SHVIT_CPU_POINTWISE_GRADS", "fast")
    with pytest.raises(RuntimeError, match="SHVIT_CPU_POINTWISE_GRADS must be auto, brgemm or aten, got 'fast'"):
        module.conv_bias_act_backward(g, x, w, b, 1, 0, 1, True, None, out)
    with pytest.raises(ValueError, match="'dtype' must be torch.float32 or torch.bfloat16, got torch.float16"):
        cpp.pointwise_grads(torch.float16)
    shvit_kernels.autotune.settings_changed()
    assert "cpu_pointwise_grads" not in shvit_kernels.autotune.machine()


@requires_cpp
def test_kxk_gradient_paths_are_listed_once_timed(monkeypatch):
    """Each depthwise or dense kxk Conv+BN gradient shape's timed path is listed, with the shape, dtype and thread
    count it was timed for; a forced path is not timed, so it adds no line."""
    module = in_use()
    x = torch.randn(2, 5, 11, 9).contiguous(memory_format=torch.channels_last)  # a shape no other test uses
    w, gamma, beta = torch.randn(6, 5, 3, 3) / 6, torch.rand(6) + 0.5, torch.randn(6)
    out, mean, var, _ = module.conv_bn_train(x, w, gamma, beta, 2, 1, 1, 1e-5, True, None, False)
    args = (torch.randn_like(out), x, w, gamma, beta, mean, var, out, 2, 1, 1, 1e-5, True, False, True, None)
    label = f"batch 2 5x11x9 -> 6x6x5 k3x3 s2 g1 fp32 threads {torch.get_num_threads()}: "
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", "brgemm")
    module.conv_bn_train_backward(*args)
    assert not [line for line in cpp.kxk_grads_choices() if line.startswith(label)]
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", "auto")
    module.conv_bn_train_backward(*args)
    module.conv_bn_train_backward(*args)  # the second call reuses the choice
    lines = [line for line in cpp.kxk_grads_choices() if line.startswith(label)]
    assert len(lines) == 1 and lines[0][len(label):] in ("aten", "brgemm"), cpp.kxk_grads_choices()


@requires_cpp
@pytest.mark.parametrize("mode", ("brgemm", "aten", "aten_bf16"))
@pytest.mark.parametrize("threads", (1, 2))
def test_dense_conv_grads_on_each_path(monkeypatch, mode, threads):
    """Dense channels_last conv gradients on the micro-kernel GEMMs (im2col / col2im over blocks of output rows,
    rows zeroed as the blocks reach them, per-thread weight-gradient partials) and on ATen's, against fp64 under
    the tolerance rule: strides 1 and 2, 3x3 and 5x5, padding 0-2, 3 and 7 input channels (vector tails), 1 and 3
    images, maps of several row blocks, a last input row no patch reaches (its gradient is zero), a stride-2 output
    one pixel wide; without the input gradient the weight gradient is bit-identical. The Conv+BN backward also in
    bf16 (aten_bf16: ATen's conv backward in bf16 where bf16 GEMMs multiply as pairs; fp32 gradients elsewhere)."""
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", mode)
    module = in_use()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, cin, cout, hw, k, stride, pad in ((3, 16, 40, (17, 13), 3, 2, 1), (1, 7, 24, (9, 30), 5, 2, 2),
                                                 (3, 20, 33, (8, 7), 3, 1, 1), (1, 8, 16, (4, 3), 3, 1, 0),
                                                 (2, 3, 16, (45, 41), 3, 2, 1), (2, 12, 24, (8, 10), 3, 2, 0),
                                                 (3, 8, 16, (5, 2), 3, 2, 1)):
            x = torch.randn(n, cin, *hw).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5, torch.randn(cout)
            out = module.conv_bias_act(x, w, b, stride, pad, 1, False, None)
            g = torch.randn_like(out)
            gx, gw = module.conv_bias_act_backward(g, x, w, b, stride, pad, 1, False, None, out)[:2]
            grads = {}
            for dtype in (torch.float32, torch.float64):  # PyTorch's own fp32 error, and the fp64 reference
                xr, wr = (t.to(dtype, copy=True).requires_grad_() for t in (x, w))
                torch.autograd.backward(torch.nn.functional.conv2d(xr, wr, None, stride, pad), g.to(dtype))
                grads[dtype] = (xr.grad, wr.grad)
            for i, (name, got) in enumerate((("grad x", gx), ("grad w", gw))):
                assert_close_to_fp64(got, grads[torch.float32][i], grads[torch.float64][i],
                                     name=f"{mode} {threads} threads {x.shape} k{k} s{stride} p{pad} {name}")
            gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout)
            args = (g, x, w, gamma, beta, beta * 0, gamma, out, stride, pad, 1, 1e-5, False, False)
            full, weight_only = module.conv_bn_train_backward(*args, True, None), module.conv_bn_train_backward(*args, False, None)
            assert torch.equal(full[1], weight_only[1]) and weight_only[0].shape == (0,)
            bn_out, mean, var, _ = conv_bn_train_reference(x, w, gamma, beta, stride, pad, 1, 1e-5, True, None, True)
            bwd = (torch.randn_like(bn_out), x, w, gamma, beta, mean, var, bn_out, stride, pad, 1, 1e-5, True, False,
                   True, None)
            _check_outputs(module.conv_bn_train_backward, exact_conv_output_reference, bwd, torch.bfloat16, True,
                           f"{mode} {threads} threads {x.shape} k{k} s{stride} p{pad} bf16 conv_bn_train_backward",
                           unavoidable_reference=rounded_conv_output_reference)
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", "fast")
    with pytest.raises(RuntimeError, match="SHVIT_CPU_DENSE_GRADS must be auto, brgemm, aten or aten_bf16, got 'fast'"):
        module.conv_bias_act_backward(g, x, w, b, stride, pad, 1, False, None, out)


@requires_cpp
@pytest.mark.parametrize("mode", ("brgemm", "aten", "aten_bf16"))
def test_depthwise_conv_bn_grads_on_each_path(monkeypatch, mode):
    """A channels_last depthwise Conv+BN backward in fp32 and bf16 against fp64 under the tolerance rule, its conv
    gradients on the project's depthwise kernel (brgemm), ATen's fp32 backward (aten) or, aten_bf16, ATen's bf16 one
    where bf16 GEMMs multiply as pairs: strides 1 and 2, a stride-2 output one pixel wide (fp32 there)."""
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", mode)
    module = in_use()
    for n, c, hw, stride in ((2, 32, (9, 11), 1), (3, 48, (7, 7), 2), (3, 16, (5, 2), 2)):
        x = torch.randn(n, c, *hw).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, 3, 3) / 3
        gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
        bn_out, mean, var, _ = conv_bn_train_reference(x, w, gamma, beta, stride, 1, c, 1e-5, True, None, True)
        bwd = (torch.randn_like(bn_out), x, w, gamma, beta, mean, var, bn_out, stride, 1, c, 1e-5, True, False, True, None)
        for dtype in (torch.float32, torch.bfloat16):
            _check_outputs(module.conv_bn_train_backward, exact_conv_output_reference, bwd, dtype, True,
                           f"{mode} {x.shape} s{stride} {dtype} depthwise conv_bn_train_backward",
                           unavoidable_reference=rounded_conv_output_reference)


@requires_cpp
@pytest.mark.parametrize("threads", (1, 2))
def test_depthwise_conv_grads_kernel(monkeypatch, threads):
    """The project's depthwise 3x3 gradient kernel (SHVIT_CPU_DENSE_GRADS=brgemm), channels_last, against fp64 under
    the tolerance rule, input and weight gradients: strides 1 and 2, channel tails (20 = 16 + 4, 8 of AVX2's 8-lane
    vectors), odd and even maps with the padding on every side, a one-pixel map, fp32 and bf16 (its input
    gradient rounded to bf16 once); without the input gradient the weight gradient is bit-identical, and it does not
    depend on the thread count (per-image sums added in order)."""
    monkeypatch.setenv("SHVIT_CPU_DENSE_GRADS", "brgemm")
    module = in_use()
    previous = torch.get_num_threads()
    try:
        for n, c, hw, stride in ((3, 20, (9, 11), 1), (5, 48, (14, 14), 2), (2, 16, (7, 8), 2), (3, 40, (1, 1), 1),
                                 (4, 8, (5, 3), 2)):
            x = torch.randn(n, c, *hw).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(c, 1, 3, 3) / 3, torch.randn(c)
            for dtype in (torch.float32, torch.bfloat16):
                xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
                torch.set_num_threads(threads)
                out = module.conv_bias_act(xd, wd, bd, stride, 1, c, False, None)
                g = torch.randn(out.shape).to(dtype).contiguous(memory_format=torch.channels_last)
                gx, gw = module.conv_bias_act_backward(g, xd, wd, bd, stride, 1, c, False, None, out)[:2]
                torch.set_num_threads(1)
                gw_one_thread = module.conv_bias_act_backward(g, xd, wd, bd, stride, 1, c, False, None, out)[1]
                assert torch.equal(gw, gw_one_thread), f"{x.shape} s{stride} {dtype}: weight gradient depends on threads"
                grads = {}
                for ref_dtype in (dtype, torch.float64):  # PyTorch's own error in the dtype, and the fp64 reference
                    xr, wr = (t.to(ref_dtype, copy=True).requires_grad_() for t in (xd, wd))
                    torch.autograd.backward(torch.nn.functional.conv2d(xr, wr, None, stride, 1, 1, c), g.to(ref_dtype))
                    grads[ref_dtype] = (xr.grad, wr.grad)
                for i, (name, got) in enumerate((("grad x", gx), ("grad w", gw))):
                    assert got.dtype in (dtype, torch.float32), f"{name} {got.dtype}"
                    assert_close_to_fp64(got.to(dtype), grads[dtype][i], grads[torch.float64][i],
                                         name=f"{threads} threads {x.shape} s{stride} {dtype} {name}")
            gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
            bn_out = module.conv_bias_act(x, w, b, stride, 1, c, False, None)
            args = (torch.randn_like(bn_out), x, w, gamma, beta, beta * 0, gamma, bn_out, stride, 1, c, 1e-5, False, False)
            torch.set_num_threads(threads)
            full, weight_only = module.conv_bn_train_backward(*args, True, None), module.conv_bn_train_backward(*args, False, None)
            assert torch.equal(full[1], weight_only[1]) and weight_only[0].shape == (0,)
    finally:
        torch.set_num_threads(previous)


def _explain_as_if_built(op, *args):
    with dispatch.patched_backend("cpp", availability=lambda: []):
        return dispatch.explain(op, *args)


def cpp_reasons(op, *args):
    """Why the cpp backend cannot run ``op(*args)``, as if it were built here."""
    return _explain_as_if_built(op, *args).not_supported["cpp"]


def cpp_slower(op, *args):
    """Why automatic dispatch passes the cpp backend over for ``op(*args)`` (measured slower)."""
    return _explain_as_if_built(op, *args).slower["cpp"]


def test_not_supported_reasons():
    x = torch.randn(2, 8, 6, 6)
    pw = torch.randn(16, 8, 1, 1)
    assert cpp_reasons("conv_bias_act", x, pw, None, 1, 0, 1, True, None) == []
    dw = torch.randn(8, 1, 3, 3)
    assert cpp_reasons("conv_bias_act", _layout(x, True), dw, None, 2, 1, 8, False, None) == []
    assert cpp_slower("conv_bias_act", _layout(x, True), dw, None, 2, 1, 8, False, None) == []
    # NCHW depthwise and dense kxk: runnable, but automatic dispatch leaves them to ATen (measured slower).
    assert cpp_reasons("conv_bias_act", x, dw, None, 2, 1, 8, False, None) == []
    assert "NCHW" in " ".join(cpp_slower("conv_bias_act", x, dw, None, 2, 1, 8, False, None))
    for dtype in (torch.float64, torch.float16):
        reasons = cpp_reasons("conv_bias_act", x.to(dtype), pw.to(dtype), None, 1, 0, 1, False, None)
        assert any("float32 and bfloat16 only" in r and str(dtype) in r for r in reasons), reasons
    assert "x's dtype" in " ".join(cpp_reasons("conv_bias_act", x, pw.bfloat16(), None, 1, 0, 1, False, None))
    grouped = cpp_reasons("conv_bias_act", x, torch.randn(8, 2, 3, 3), None, 1, 1, 4, False, None)
    assert grouped and "groups=4" in grouped[0]
    dw5 = cpp_reasons("conv_bias_act", x, torch.randn(8, 1, 5, 5), None, 1, 2, 8, False, None)
    assert dw5 and "depthwise 3x3" in dw5[0]
    dense_w = torch.randn(16, 8, 3, 3)
    assert cpp_reasons("conv_bias_act", x, dense_w, None, 2, 1, 1, True, None) == []
    dense = cpp_slower("conv_bias_act", x, dense_w, None, 2, 1, 1, True, None)
    assert dense and "dense" in dense[0]
    assert cpp_slower("conv_bias_act", x, pw, None, 1, 0, 1, True, None) == []
    assert cpp_reasons("ffn_fused", x.double(), pw.double(), None, None, None)
    w2 = torch.randn(8, 16, 1, 1)
    assert cpp_reasons("ffn_fused_backward", x, x, pw, None, w2, None) == []
    wide = torch.randn(2, 224, 4, 4)
    wide_w1, wide_w2 = torch.randn(448, 224, 1, 1), torch.randn(224, 448, 1, 1)
    assert cpp_reasons("ffn_fused_backward", wide, wide, wide_w1, None, wide_w2, None) == []
    assert "up to 128 channels" in " ".join(cpp_slower("ffn_fused_backward", wide, wide, wide_w1, None, wide_w2, None))
    assert "x's dtype" in " ".join(cpp_reasons("ffn_fused_backward", x.bfloat16(), x, pw, None, w2, None))
    assert "float32 and bfloat16 only" in " ".join(cpp_reasons("ffn_fused_backward", x.double(), x.double(), pw.double(), None, w2.double(), None))
    assert cpp_reasons("shsa_fused", x.half(), torch.randn(36, 4, 1, 1).half(), None, 16, 1e-5)
    qkv_w = torch.randn(36, 4, 1, 1)
    assert cpp_reasons("shsa_fused_backward", x, x, qkv_w, None, x, 16, 1e-5) == []
    assert "x's dtype" in " ".join(cpp_reasons("shsa_fused_backward", x, x, qkv_w, None, x.bfloat16(), 16, 1e-5))
    p = torch.ones(4)
    assert cpp_reasons("shsa_train", x, p, p, qkv_w, torch.ones(36), torch.ones(36), 16, 1e-5, 1e-5) == []
    assert cpp_reasons("shsa_train", x.bfloat16(), p, p, qkv_w.bfloat16(), torch.ones(36), torch.ones(36), 16, 1e-5, 1e-5) == []
    assert "float32 and bfloat16 only" in " ".join(
        cpp_reasons("shsa_train", x.double(), p, p, qkv_w.double(), torch.ones(36), torch.ones(36), 16, 1e-5, 1e-5))
    stats = torch.ones(36)
    assert cpp_reasons("shsa_train_backward", x, x, p, p, qkv_w, stats, stats, stats, stats, x, 16, 1e-5, 1e-5) == []
    assert "x's dtype" in " ".join(
        cpp_reasons("shsa_train_backward", x.bfloat16(), x, p, p, qkv_w, stats, stats, stats, stats, x, 16, 1e-5, 1e-5))


@requires_cpp
def test_forced_cpp_backend_reports_reasons():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with shvit_kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="float32 and bfloat16 only"):
        shvit_kernels.conv_bias_act(x, torch.randn(8, 4, 1, 1, dtype=torch.float64))


@requires_cpp
def test_declined_call_falls_back_to_reference():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(8, 4, 1, 1, dtype=torch.float64)
    assert dispatch.chosen_backend("conv_bias_act", "cpu", x, w, None, 1, 0, 1, False, None) == "reference"
    assert dispatch.chosen_backend("conv_bias_act", "cpu", x.float(), w.float(), None, 1, 0, 1, False, None) == "cpp"


@requires_cpp
def test_slower_call_goes_to_reference_unless_cpp_is_forced():
    """An NCHW stem conv runs on ATen automatically (measured faster) but on the C++ kernel when cpp is forced;
    in channels_last fp32, bf16 widened to fp32 and bf16 on the pair kernel, the C++ kernel is the automatic choice,
    and bf16 on kernel-row GEMMs goes to ATen."""
    x = torch.randn(2, 16, 12, 12)
    w, b = torch.randn(32, 16, 3, 3), torch.randn(32)
    args = (x, w, b, 2, 1, 1, True, None)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert dispatch.chosen_backend("conv_bias_act", "cpu", x_cl, *args[1:]) == "cpp"
    bf16_args = (x_cl.bfloat16(), w.bfloat16(), *args[2:])
    previous = cpp.set_bf16_products("fp32")
    try:
        assert dispatch.chosen_backend("conv_bias_act", "cpu", *bf16_args) == "cpp"
        try:
            cpp.set_bf16_products("dot")
            expected = "cpp" if cpp.dense_conv_bf16() == "pairs" else "reference"
            assert dispatch.chosen_backend("conv_bias_act", "cpu", *bf16_args) == expected
        except RuntimeError as e:
            assert "not usable here" in str(e)
    finally:
        cpp.set_bf16_products(previous)
    assert dispatch.chosen_backend("conv_bias_act", "cpu", *args) == "reference"
    with shvit_kernels.use_backend("cpp"):
        assert dispatch.chosen_backend("conv_bias_act", "cpu", *args) == "cpp"
        with dispatch.record() as calls:
            out = shvit_kernels.conv_bias_act(x, w, b, stride=2, padding=1, relu=True)
    assert [c.backend for c in calls] == ["cpp"]
    torch.testing.assert_close(out, torch.relu(torch.nn.functional.conv2d(x, w, b, 2, 1)), rtol=1e-5, atol=1e-5)


@requires_cpp
def test_conv_bn_train_dispatches_to_cpp():
    """Registered for CPU fp32/bf16 calls of every conv shape; fp64 goes to the reference."""
    x, gamma, beta = torch.randn(2, 8, 6, 6), torch.ones(16), torch.zeros(16)
    for w, stride, pad, groups in ((torch.randn(16, 8, 1, 1), 1, 0, 1), (torch.randn(16, 8, 3, 3), 2, 1, 1)):
        for dtype in DTYPES:
            args = (x.to(dtype), w.to(dtype), gamma, beta, stride, pad, groups, 1e-5, True, None)
            assert dispatch.chosen_backend("conv_bn_train", "cpu", *args) == "cpp"
        args = (x.double(), w.double(), gamma.double(), beta.double(), stride, pad, groups, 1e-5, True, None)
        assert dispatch.chosen_backend("conv_bn_train", "cpu", *args) == "reference"


def test_unavailable_backend_reports_reason():
    """With no loadable build (each variant's import blocked in a fresh interpreter, as on a broken install) the
    backend is registered, unusable with a reason naming what it tried, a warning says so once, and the reference
    runs."""
    code = textwrap.dedent("""
        import sys, warnings
        for cap in ("avx512", "avx2", "default"):
            sys.modules["shvit_kernels._C_cpu_" + cap] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, shvit_kernels
            from shvit_kernels import dispatch
        assert any("C++ CPU backend is unavailable" in str(w.message) for w in caught), [str(w.message) for w in caught]
        reasons = dispatch.unavailable_reasons("cpp")
        assert reasons and "not built or failed to load" in reasons[0] and "_C_cpu_" in reasons[0], reasons
        x, w = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 1, 1)
        assert dispatch.chosen_backend("conv_bias_act", "cpu", x, w, None, 1, 0, 1, False, None) == "reference"
        y = shvit_kernels.conv_bias_act(x, w, None)
        assert torch.allclose(y, torch.nn.functional.conv2d(x, w), atol=1e-5)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_load_variant_rejects_unknown_capability():
    with pytest.raises(ValueError, match="unknown CPU capability"):
        cpp.load_variant("SSE9")


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_channels_last_kernel_matches_aten(variant):
    """Each variant's NCHW -> channels_last copy: the values and strides of ATen's, for 1-4 channels and each
    dtype it takes; None (ATen's turn) for what it does not take."""
    module = cpp.load_variant(variant)
    for c in (2, 3, 4):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(3, c, 37, 29).to(dtype)  # pixels not a multiple of the kernel's pixel block
            out = module.to_channels_last(x)
            expected = x.contiguous(memory_format=torch.channels_last)
            assert out is not None, (c, dtype)
            assert out.stride() == expected.stride() and torch.equal(out, expected), (variant, c, dtype)
    big = torch.randn(2, 3, 70, 70)  # more pixels than one block, each image split over blocks
    assert torch.equal(module.to_channels_last(big), big.contiguous(memory_format=torch.channels_last))
    # One channel is both layouts at once, as is one pixel: nothing to move.
    for declined in (torch.randn(2, 1, 4, 4), torch.randn(2, 3, 1, 1), torch.randn(2, 5, 4, 4),
                     torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
                     torch.randn(2, 3, 4, 8)[..., ::2], torch.randn(2, 3, 4, 4, dtype=torch.float64),
                     torch.randn(0, 3, 4, 4)):
        assert module.to_channels_last(declined) is None
    with pytest.raises(RuntimeError, match="'x' must be 4-D"):
        module.to_channels_last(torch.randn(3, 4, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_weight_copies_hold_no_autograd_graph(variant):
    """A kernel called with grad mode on, on a weight with autograd history, keeps its packed copy without that
    history: the copy must not keep the graph (and through it the leaf) alive, since dropping the last reference
    to a graph can need the GIL, and a worker thread that dropped it while the calling thread held the GIL and
    waited for the packed-weight lock deadlocked (an NCHW stem batch on two threads)."""
    import gc
    import weakref

    module = cpp.load_variant(variant)
    x = torch.randn(2, 3, 9, 8).contiguous(memory_format=torch.channels_last)
    for shape, groups in (((8, 3, 3, 3), 1), ((3, 1, 3, 3), 3)):  # a dense first layer, a depthwise conv
        leaf = torch.randn(*shape, requires_grad=True)
        weight = leaf * 1.0  # a non-leaf: its graph ends in the leaf's AccumulateGrad
        module.conv_bias_act(x, weight, None, 1, 1, groups, False, None)
        alive = weakref.ref(leaf)
        del leaf, weight
        gc.collect()
        assert alive() is None, f"a packed copy keeps the weight's autograd graph alive (groups {groups})"


@pytest.mark.parametrize("variant", VARIANTS)
def test_patch_embed_takes_nchw_planes_as_a_channels_last_input(variant):
    """An NCHW image batch asked for a channels_last output: each image's planes interleaved as the stem reaches it
    give the bits of the same batch moved to channels_last first, for 2 to 4 channels, one or more images per
    thread, each dtype."""
    module = cpp.load_variant(variant)
    for c_in, batch in ((3, 4), (2, 3), (4, 2), (3, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, c_in, 37, 30).to(dtype)
            params, c = [], c_in
            for c_out in (16, 32, 64, 128):
                params += [(torch.randn(c_out, c, 3, 3) / (9 * c) ** 0.5).to(dtype), torch.randn(c_out).to(dtype)]
                c = c_out
            for threads in (1, 2):
                with _num_threads(threads):
                    got = module.patch_embed(x, *params, True)
                    moved = module.patch_embed(x.contiguous(memory_format=torch.channels_last), *params, False)
                assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
                assert torch.equal(got, moved), (variant, c_in, batch, dtype, threads)
            assert module.patch_embed(x, *params, False).is_contiguous()  # unasked, the output follows x


@requires_cpp
def test_public_to_channels_last_is_atens_copy_in_every_case():
    for x in (torch.randn(2, 3, 9, 7), torch.randn(2, 8, 9, 7), torch.randn(2, 3, 9, 14)[..., ::2],
              torch.randn(2, 3, 9, 7).to(memory_format=torch.channels_last)):
        out = shvit_kernels.to_channels_last(x)
        expected = x.contiguous(memory_format=torch.channels_last)
        assert out.stride() == expected.stride() and torch.equal(out, expected)
    # A gradient still flows (the call goes to ATen's copy, which autograd sees).
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    shvit_kernels.to_channels_last(x).square().sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor, got list"):
        shvit_kernels.to_channels_last([1.0])
    with pytest.raises(ValueError, match=r"'x' must be a 4-D \(N, C, H, W\) tensor, got shape \(3, 4, 4\)"):
        shvit_kernels.to_channels_last(torch.randn(3, 4, 4))
    compiled = torch.compile(lambda t: shvit_kernels.to_channels_last(t) * 2, fullgraph=True)
    y = torch.randn(2, 3, 5, 5)
    assert torch.equal(compiled(y), 2 * y.contiguous(memory_format=torch.channels_last))


@requires_cpp
def test_packed_weights_follow_updates_that_skip_the_version_counter():
    """torch's fused AdamW (``fused=True``, as ``shvit train`` builds it) updates parameters in place without bumping
    their version counters (torch 2.13), and so do writes through ``.data``: the cpp backend's packed weight copies
    must not outlive such an update (a functional op trained this way ran on its first step's weights)."""
    torch.manual_seed(0)
    c = 32
    x = torch.randn(4, c, 6, 6).contiguous(memory_format=torch.channels_last)
    wd, bd = torch.nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3), torch.nn.Parameter(torch.zeros(c))
    w1, b1 = torch.nn.Parameter(torch.randn(2 * c, c, 1, 1) * 0.1), torch.nn.Parameter(torch.zeros(2 * c))
    w2, b2 = torch.nn.Parameter(torch.randn(c, 2 * c, 1, 1) * 0.1), torch.nn.Parameter(torch.zeros(c))
    params = [wd, bd, w1, b1, w2, b2]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)

    def check(step):
        with shvit_kernels.use_backend("cpp"):
            out = shvit_kernels.ffn_fused(shvit_kernels.conv_bias_act(x, wd, bd, padding=1, groups=c), w1, b1, w2, b2)
        with torch.no_grad():
            y = conv_bias_act_reference(x, wd, bd, 1, 1, c, False, None)
            torch.testing.assert_close(out, ffn_fused_reference(y, w1, b1, w2, b2), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{step}: {m}")
        return out

    for step in range(3):
        check(f"step {step}").square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    version = w1._version
    w1.data.mul_(0.5)
    assert w1._version == version  # the update the packed copies must notice without the counter
    check("after a write through .data")
