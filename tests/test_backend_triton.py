"""Triton kernels called directly, against the reference ops (forward and every backward output).

Without a GPU they run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest before
triton is imported), with its bf16 ``tl.dot`` and fp32 -> bf16 casts done as a GPU does them (conftest;
shvit_kernels.testing.triton_interpreter), so every dtype is checked. Tolerance: the project's rule
(shvit_kernels.testing.check_kernel): error against an fp64 reference at most twice the error of the reference
run in the same dtype, plus a tiny floor.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot be tested")

from helpers import DEVICE  # noqa: E402
from shvit_kernels import dispatch  # noqa: E402
from shvit_kernels.ops import conv_bn as R_conv, ffn as R_ffn, shsa as R_shsa  # noqa: E402
from shvit_kernels.testing import check_kernel  # noqa: E402

CL = torch.channels_last


def triton(op):
    """The triton backend's kernel for ``op``, as the dispatcher registered it."""
    return dispatch.kernel("triton", op)


def rand(*shape, dtype=torch.float32, fmt=None, scale=1.0):
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).to(DEVICE)
    return t.contiguous(memory_format=fmt) if fmt is not None else t


# ---------------------------------------------------------------------------------------------------------
# Conv + BN
# ---------------------------------------------------------------------------------------------------------
# (N, C_in, C_out, H, W, k, stride, pad, groups, relu, residual, format, dtype)
CONV_CASES = [
    pytest.param(2, 3, 8, 7, 9, 3, 2, 1, 1, True, False, None, torch.float32, id="stem3x3s2"),
    pytest.param(1, 6, 6, 7, 5, 3, 1, 1, 6, False, True, CL, torch.float32, id="dw3x3s1-res-cl-odd"),
    pytest.param(2, 8, 8, 5, 7, 3, 2, 1, 8, True, False, None, torch.float32, id="dw3x3s2-odd"),
    pytest.param(2, 12, 20, 3, 5, 1, 1, 0, 1, True, True, CL, torch.float32, id="pw1x1-res-relu-cl"),
    pytest.param(1, 16, 24, 3, 3, 1, 1, 0, 1, True, False, CL, torch.float16, id="pw1x1-fp16"),
    pytest.param(2, 8, 8, 5, 4, 3, 1, 1, 8, True, True, None, torch.float16, id="dw3x3-fp16"),
    pytest.param(2, 3, 16, 9, 7, 3, 2, 1, 1, True, False, CL, torch.bfloat16, id="stem3x3s2-bf16"),
    pytest.param(2, 24, 40, 3, 5, 1, 1, 0, 1, True, True, CL, torch.bfloat16, id="pw1x1-res-bf16"),
    pytest.param(1, 12, 12, 5, 7, 3, 1, 1, 12, True, False, None, torch.bfloat16, id="dw3x3-bf16"),
]


def _conv_inputs(n, ci, co, h, w, k, stride, pad, groups, residual, fmt, dtype):
    x = rand(n, ci, h, w, dtype=dtype, fmt=fmt)
    weight = rand(co, ci // groups, k, k, dtype=dtype, scale=(ci // groups * k * k) ** -0.5)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    res = rand(n, co, oh, ow, dtype=dtype, fmt=fmt) if residual else None
    return x, weight, res


@pytest.mark.parametrize("n,ci,co,h,w,k,stride,pad,groups,relu,residual,fmt,dtype", CONV_CASES)
def test_conv_bias_act(n, ci, co, h, w, k, stride, pad, groups, relu, residual, fmt, dtype):
    x, weight, res = _conv_inputs(n, ci, co, h, w, k, stride, pad, groups, residual, fmt, dtype)
    bias = rand(co, dtype=dtype)
    args = (x, weight, bias, stride, pad, groups, relu, res)
    (out,) = check_kernel(triton("conv_bias_act"), R_conv.conv_bias_act_reference, args)
    grad = rand(*out.shape, dtype=dtype, fmt=fmt)
    bargs = (grad, *args, out)
    check_kernel(triton("conv_bias_act_backward"), R_conv.conv_bias_act_backward_reference, bargs)


@pytest.mark.parametrize("n,ci,co,h,w,k,stride,pad,groups,relu,residual,fmt,dtype", CONV_CASES)
def test_conv_bn_train(n, ci, co, h, w, k, stride, pad, groups, relu, residual, fmt, dtype):
    x, weight, res = _conv_inputs(n, ci, co, h, w, k, stride, pad, groups, residual, fmt, dtype)
    x = x + 3.0  # a mean well away from zero exercises the centred variance
    bn_w, bn_b = torch.rand(co, device=DEVICE) + 0.5, rand(co)
    args = (x, weight, bn_w, bn_b, stride, pad, groups, 1e-5, relu, res)
    out, mean, var, empty = check_kernel(triton("conv_bn_train"), R_conv.conv_bn_train_reference, args)
    # keep_conv_output: the raw conv output comes back too, and the backward takes it instead of recomputing
    *_, y = check_kernel(triton("conv_bn_train"), R_conv.conv_bn_train_reference, (*args, True))
    assert empty.numel() == 0 and y.shape == out.shape
    grad = rand(*out.shape, dtype=dtype, fmt=fmt)
    bargs = (grad, x, weight, bn_w, bn_b, mean, var, out, stride, pad, groups, 1e-5, relu, residual)
    check_kernel(triton("conv_bn_train_backward"), R_conv.conv_bn_train_backward_reference, bargs)
    # the float64 reference recomputes the conv output exactly (the exact gradient), as without a kept one
    exact = lambda *a: R_conv.conv_bn_train_backward_reference(*a[:-1], None if a[1].dtype == torch.float64 else a[-1])  # noqa: E731
    check_kernel(triton("conv_bn_train_backward"), exact, (*bargs, True, y))


def test_conv_depthwise_bf16_forward():
    x, weight, res = _conv_inputs(2, 8, 8, 5, 6, 3, 1, 1, 8, True, CL, torch.bfloat16)
    args = (x, weight, rand(8, dtype=torch.bfloat16), 1, 1, 8, True, res)
    check_kernel(triton("conv_bias_act"), R_conv.conv_bias_act_reference, args)


# ---------------------------------------------------------------------------------------------------------
# FFN
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,h,w,fmt,dtype", [
    pytest.param(2, 12, 3, 5, None, torch.float32, id="nchw-odd"),
    pytest.param(1, 20, 5, 3, CL, torch.float32, id="cl-batch1"),
    pytest.param(2, 16, 3, 3, CL, torch.float16, id="cl-fp16"),
    pytest.param(2, 24, 3, 5, CL, torch.bfloat16, id="cl-bf16"),
    pytest.param(1, 40, 4, 3, None, torch.bfloat16, id="nchw-bf16"),
])
def test_ffn_fused(n, c, h, w, fmt, dtype):
    x = rand(n, c, h, w, dtype=dtype, fmt=fmt)
    args = (x, rand(2 * c, c, 1, 1, dtype=dtype, scale=c ** -0.5), rand(2 * c, dtype=dtype),
            rand(c, 2 * c, 1, 1, dtype=dtype, scale=(2 * c) ** -0.5), rand(c, dtype=dtype))
    (out,) = check_kernel(triton("ffn_fused"), R_ffn.ffn_fused_reference, args)
    bargs = (rand(*out.shape, dtype=dtype, fmt=fmt), *args)
    check_kernel(triton("ffn_fused_backward"), R_ffn.ffn_fused_backward_reference, bargs)


# ---------------------------------------------------------------------------------------------------------
# SHSA
# ---------------------------------------------------------------------------------------------------------
Q = 16
# (B, C, P, H, W, format, dtype, input scale)
SHSA_CASES = [
    pytest.param(2, 24, 20, 3, 5, None, torch.float32, 1.0, id="nchw-odd"),
    pytest.param(1, 80, 75, 2, 3, CL, torch.float32, 1.0, id="P75-cl-batch1"),
    pytest.param(2, 20, 20, 1, 1, None, torch.float32, 1.0, id="N1"),
    pytest.param(1, 20, 16, 17, 17, CL, torch.float32, 1.0, id="N289-online-softmax"),
    pytest.param(1, 80, 72, 7, 7, None, torch.float32, 1.0, id="P72-N49-32-token-blocks"),
    pytest.param(2, 40, 32, 3, 3, CL, torch.float16, 1e4, id="fp16-magnitude-1e4"),
    pytest.param(2, 48, 40, 5, 5, CL, torch.bfloat16, 1.0, id="bf16-cl"),
    pytest.param(1, 20, 16, 17, 17, None, torch.bfloat16, 1.0, id="bf16-N289-online-softmax"),
]


def _shsa_inputs(b, c, p, h, w, fmt, dtype, scale):
    x = rand(b, c, h, w, dtype=dtype, fmt=fmt, scale=scale)
    weight = rand(2 * Q + p, p, 1, 1, dtype=dtype, scale=p ** -0.5)
    return x, weight


@pytest.mark.parametrize("b,c,p,h,w,fmt,dtype,scale", SHSA_CASES)
def test_shsa_fused(b, c, p, h, w, fmt, dtype, scale):
    x, weight = _shsa_inputs(b, c, p, h, w, fmt, dtype, scale)
    args = (x, weight, rand(2 * Q + p, dtype=dtype), Q, 1e-5)
    (out,) = check_kernel(triton("shsa_fused"), R_shsa.shsa_fused_reference, args)
    bargs = (rand(*out.shape, dtype=dtype, fmt=fmt), x, weight, args[2], out, Q, 1e-5)
    check_kernel(triton("shsa_fused_backward"), R_shsa.shsa_fused_backward_reference, bargs)


@pytest.mark.parametrize("b,c,p,h,w,fmt,dtype,scale", SHSA_CASES)
def test_shsa_train(b, c, p, h, w, fmt, dtype, scale):
    x, weight = _shsa_inputs(b, c, p, h, w, fmt, dtype, scale)
    r = 2 * Q + p
    params = (torch.rand(p, device=DEVICE) + 0.5, rand(p, scale=0.1), weight,
              torch.rand(r, device=DEVICE) + 0.5, rand(r, scale=0.1))
    args = (x, *params, Q, 1e-5, 1e-5)
    out, mean, var = check_kernel(triton("shsa_train"), R_shsa.shsa_train_reference, args)
    bargs = (rand(*out.shape, dtype=dtype, fmt=fmt), x, *params, mean, var, out, Q, 1e-5, 1e-5)
    check_kernel(triton("shsa_train_backward"), R_shsa.shsa_train_backward_reference, bargs)


# ---------------------------------------------------------------------------------------------------------
# The tolerance check itself, bad input, registration
# ---------------------------------------------------------------------------------------------------------
def test_check_kernel_can_fail():
    x, weight = _shsa_inputs(1, 20, 16, 2, 2, None, torch.float32, 1.0)
    args = (x, weight, rand(2 * Q + 16), Q, 1e-5)
    wrong = triton("shsa_fused")(*args)
    wrong.view(-1)[3] += 1e-3
    with pytest.raises(AssertionError, match="max error"):
        check_kernel(lambda *a: wrong, R_shsa.shsa_fused_reference, args)


def test_bad_inputs_name_the_argument():
    x = rand(1, 8, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        triton("conv_bias_act")(x, rand(8, 4, 3, 3), None, 1, 1, 2, False, None)
    with pytest.raises(TypeError, match="'x'"):
        triton("conv_bias_act")(x.double(), rand(8, 8, 1, 1).double(), None, 1, 0, 1, False, None)
    with pytest.raises(ValueError, match="P=130"):
        triton("shsa_fused")(rand(1, 130, 2, 2), rand(2 * Q + 130, 130, 1, 1), rand(2 * Q + 130), Q, 1e-5)
    with pytest.raises(ValueError, match="'w1'"):
        triton("ffn_fused")(x, rand(16, 4, 1, 1), rand(16), rand(8, 16, 1, 1), rand(8))


def test_backend_registration_and_reasons():
    # squeeze_excite, patch_embed and pooled_linear have no Triton kernels: the fused model calls them on the CPU only;
    # conv_bn_train_output (a backward's elementwise recomputation) runs torch's own ops there.
    without = {op for op in dispatch.ops() if dispatch.kernel("triton", op) is None}
    assert without == {"squeeze_excite", "squeeze_excite_backward", "patch_embed", "patch_embed_backward",
                       "pooled_linear", "pooled_linear_backward", "conv_bn_train_output"}
    if not torch.cuda.is_available():
        assert dispatch.unavailable_reasons("triton") == ["no CUDA device"]
    x = torch.randn(1, 8, 4, 4)

    def reasons(op, *args, device_type="cuda"):
        with dispatch.patched_backend("triton", availability=lambda: []):
            return dispatch.explain(op, *args, device_type=device_type).not_supported["triton"]

    assert any("runs on cuda only" in r for r in reasons("conv_bias_act", x, torch.randn(8, 8, 1, 1), None, 1, 0, 1, False, None, device_type="cpu"))
    assert reasons("conv_bias_act", x, torch.randn(8, 8, 1, 1), None, 1, 0, 1, False, None) == []
    assert any("groups" in r for r in reasons("conv_bias_act", x, torch.randn(8, 4, 3, 3), None, 1, 1, 2, False, None))
    assert any("float64" in r for r in reasons("ffn_fused", x.double(), *(torch.randn(1).double(),) * 4))
    assert any("P=130" in r for r in reasons("shsa_fused", torch.randn(1, 130, 2, 2), torch.randn(162, 130, 1, 1), torch.randn(162), Q, 1e-5))


class _CudaTensorStandIn:
    """What the H200-failure reasons read of a CUDA tensor (no GPU here): is_cuda, dtype, shape."""

    is_cuda = True

    def __init__(self, *shape, dtype=torch.bfloat16):
        self.shape, self.dtype = shape, dtype


@pytest.mark.parametrize("op", ["shsa_fused", "shsa_fused_backward"])
def test_calls_that_failed_on_the_h200_are_declined_until_retested(op, monkeypatch):
    from shvit_kernels.backends import triton as triton_backend

    def reasons(c, p, h, w, dtype=torch.bfloat16):
        x = _CudaTensorStandIn(2, c, h, w, dtype=dtype)
        return triton_backend.NOT_SUPPORTED[op](x=x, qkv_weight=_CudaTensorStandIn(2 * Q + p, p, 1, 1), qk_dim=Q)

    monkeypatch.delenv("SHVIT_KERNELS_RETEST_GPU_FAILURES", raising=False)
    p_equals_c = reasons(40, 40, 4, 4)
    assert len(p_equals_c) == 1 and "H200" in p_equals_c[0]
    assert (reasons(96, 66, 1, 1) != []) == (op == "shsa_fused_backward")  # wrong weight gradients at 1 token
    assert reasons(40, 40, 4, 4, dtype=torch.float32) == [] and reasons(40, 40, 5, 4) == []  # fp32; 20 tokens
    monkeypatch.setenv("SHVIT_KERNELS_RETEST_GPU_FAILURES", "1")
    assert reasons(40, 40, 4, 4) == []


def test_interpreter_computes_bf16_dots_and_casts_as_a_gpu():
    """conftest's emulation: without it the interpreter's bf16 tl.dot multiplies bit patterns and its fp32 ->
    bf16 cast truncates; with it, exact products summed in fp32 and round-to-nearest-even casts."""
    import triton as tr
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks Triton's CPU interpreter")

    @tr.jit
    def dot_and_cast(a_ptr, b_ptr, c_ptr, r_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        i, j, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + i[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + j[None, :])
        c = tl.dot(a, b, tl.zeros((M, N), dtype=tl.float32))
        tl.store(c_ptr + i[:, None] * N + j[None, :], c)
        tl.store(r_ptr + i[:, None] * N + j[None, :], c.to(tl.bfloat16))

    a, b = torch.randn(16, 32).bfloat16(), torch.randn(32, 16).bfloat16()
    c, rounded = torch.empty(16, 16), torch.empty(16, 16, dtype=torch.bfloat16)
    dot_and_cast[(1,)](a, b, c, rounded, 16, 16, 32)
    torch.testing.assert_close(c, (a.double() @ b.double()).float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(rounded, c.bfloat16())

    @tr.jit
    def tf32x3_dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        i, j, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + i[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + j[None, :])
        tl.store(c_ptr + i[:, None] * N + j[None, :], tl.dot(a, b, input_precision="tf32x3"))

    a, b = torch.randn(16, 64), torch.randn(64, 16)
    tf32x3_dot[(1,)](a, b, c, 16, 16, 64)
    exact = a.double() @ b.double()
    err = (c.double() - exact).abs().max().item()
    assert 0 < err < 1e-4, err  # not the interpreter's exact fp32 products, yet about fp32's accuracy


# ---------------------------------------------------------------------------------------------------------
# The GPU check's cases end to end (forward and autograd backward through the ops), as on a GPU
# ---------------------------------------------------------------------------------------------------------
# The small ones of shvit_kernels.testing.cases (the interpreter takes ~20 s for a 64x64 stem): every kernel,
# the awkward shapes, both weight layouts, train / eval / inference forms.
SMOKE_CASES = ["conv-infer-stem-odd-3x3s2", "conv-train-stem-odd-3x3s2", "conv-eval-dw3x3s1-odd",
               "conv-train-dw3x3s1-odd", "conv-eval-1x1-input-major-weight", "conv-train-1x1-input-major-weight",
               "ffn-odd", "ffn-input-major-weights", "shsa-infer-p75-odd", "shsa-train-p75-odd",
               "shsa-eval-n1-batch1", "shsa-train-p-equals-c"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", SMOKE_CASES)
def test_gpu_check_cases_in_the_interpreter(name, dtype):
    from helpers import compare_backend
    from shvit_kernels.testing.cases import CASES

    if DEVICE == "cuda":
        pytest.skip("on a GPU, tests/test_op_accuracy.py runs every case on the triton backend")
    # CPU tensors let in (the interpreter runs them); every per-call reason of the backend still applies
    with dispatch.patched_backend("triton", device_types=("cuda", "cpu"), availability=lambda: []):
        compare_backend(dict(CASES)[name], dtype, "cpu", True, "triton")
