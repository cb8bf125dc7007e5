"""cuda backend: binding logic on any machine; kernels vs the references where CUDA and the extension exist.

The GPU tests (marked ``gpu``) skip unless torch has a CUDA device and ``shvit_kernels._C_cuda`` is built.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import shvit_kernels
from shvit_kernels import dispatch
from shvit_kernels.backends import cuda as cuda_backend
from shvit_kernels.ops import conv_bn as conv_ops
from shvit_kernels.ops import shsa as shsa_ops
from shvit_kernels.testing import check_kernel

QK = 16
HAS_GPU = torch.cuda.is_available() and not dispatch.unavailable_reasons("cuda")
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and the built shvit_kernels._C_cuda extension")


# ---------------------------------------------------------------------------------------------------------
# Argument builders (one per op, in schema order)
# ---------------------------------------------------------------------------------------------------------
def dw_args(device="cpu", dtype=torch.float32, b=2, c=8, h=6, w=7, stride=1, relu=True, residual=False, cl=False):
    x = torch.randn(b, c, h, w, device=device, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, 3, 3, device=device, dtype=dtype) * 0.3
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = torch.randn(b, c, oh, ow, device=device, dtype=dtype) if residual else None
    if res is not None and cl:
        res = res.contiguous(memory_format=torch.channels_last)
    return x, weight, res


def shsa_fused_args(device="cpu", dtype=torch.float32, b=2, c=24, p=16, h=4, w=5, qk_dim=QK, cl=False):
    x = torch.randn(b, c, h, w, device=device, dtype=dtype) * 2 + 0.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wq = torch.randn(2 * qk_dim + p, p, 1, 1, device=device, dtype=dtype) * p ** -0.5
    bq = torch.randn(2 * qk_dim + p, device=device, dtype=dtype) * 0.1
    return (x, wq, bq, qk_dim, 1e-5)


def shsa_train_args(device="cpu", dtype=torch.float32, b=2, c=24, p=16, h=4, w=5, qk_dim=QK, cl=False):
    x, wq, _, _, _ = shsa_fused_args(device, dtype, b, c, p, h, w, qk_dim, cl)
    o = 2 * qk_dim + p
    f = dict(device=device, dtype=dtype)
    gn_w, gn_b = 1 + 0.1 * torch.randn(p, **f), 0.1 * torch.randn(p, **f)
    bn_w, bn_b = 1 + 0.1 * torch.randn(o, **f), 0.1 * torch.randn(o, **f)
    return (x, gn_w, gn_b, wq, bn_w, bn_b, qk_dim, 1e-5, 1e-5)


def conv_bias_act_args(**kw):
    relu = kw.pop("relu", True)
    stride = kw.get("stride", 1)
    x, weight, res = dw_args(relu=relu, **kw)
    bias = torch.randn(x.shape[1], device=x.device, dtype=x.dtype) * 0.1
    return (x, weight, bias, stride, 1, x.shape[1], relu, res)


def conv_bn_train_args(**kw):
    relu = kw.pop("relu", True)
    stride = kw.get("stride", 1)
    x, weight, res = dw_args(relu=relu, **kw)
    c = x.shape[1]
    gamma = 1 + 0.1 * torch.randn(c, device=x.device, dtype=x.dtype)
    beta = 0.1 * torch.randn(c, device=x.device, dtype=x.dtype)
    return (x, weight, gamma, beta, stride, 1, c, 1e-5, relu, res)


# ---------------------------------------------------------------------------------------------------------
# CPU-side: availability, per-call reasons, dispatch
# ---------------------------------------------------------------------------------------------------------
def cuda_reasons(op, *args, device_type="cuda"):
    """cuda's not_supported reasons for ``op(*args)`` as if the extension and a GPU were here (CPU tensors)."""
    with dispatch.patched_backend("cuda", availability=lambda: []):
        return dispatch.explain(op, *args, device_type=device_type).not_supported["cuda"]


def test_every_op_is_registered_with_reasons():
    with_kernel = {op for op in dispatch.ops() if dispatch.kernel("cuda", op) is not None}
    assert with_kernel == set(cuda_backend.NOT_SUPPORTED)


def _in_fresh_process(extension, code: str) -> None:
    """Run ``code`` in a new interpreter where ``shvit_kernels._C_cuda`` is missing (extension None) or a stand-in
    module (as a build without a GPU would be), as a user's install would be, not by patching the backend."""
    prelude = (
        "import sys, types\n"
        + ("sys.modules['shvit_kernels._C_cuda'] = None\n" if extension is None
           else "sys.modules['shvit_kernels._C_cuda'] = types.ModuleType('shvit_kernels._C_cuda')\n")
    )
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_availability_reasons_without_the_extension():
    _in_fresh_process(None, """
        import torch
        from shvit_kernels import dispatch
        from shvit_kernels.backends import cuda
        (reason,) = cuda.availability_reasons()
        assert "CUDA extension is not built" in reason and "nvcc" in reason and "_C_cuda" in reason, reason
        assert dispatch.unavailable_reasons("cuda") == [reason]
        x = torch.randn(2, 8, 6, 7)
        try:
            dispatch.kernel("cuda", "conv_bias_act")(x, torch.randn(8, 1, 3, 3), None, 1, 1, 8, True, None)
        except RuntimeError as e:
            assert "CUDA extension is not built" in str(e), e
        else:
            raise AssertionError("the cuda kernel ran without its extension")
    """)


def test_availability_reasons_with_the_extension_and_no_device():
    _in_fresh_process("stand-in", """
        import torch
        from shvit_kernels.backends import cuda
        torch.cuda.is_available = lambda: False
        assert cuda.availability_reasons() == ["no CUDA device"], cuda.availability_reasons()
        torch.cuda.is_available = lambda: True
        assert cuda.availability_reasons() == []
    """)


@pytest.mark.skipif(HAS_GPU, reason="checks the state of a machine without CUDA or without the extension")
def test_unavailable_here_with_reason():
    reasons = dispatch.unavailable_reasons("cuda")
    assert reasons and ("not built" in reasons[0] or "no CUDA device" in reasons[0])
    rows = [r for r in shvit_kernels.backend_table() if r["backend"] == "cuda"]
    assert rows and all(not r["usable"] and r["why"] for r in rows)


@pytest.mark.parametrize("op,build", [
    ("conv_bias_act", lambda: conv_bias_act_args()),
    ("conv_bn_train", lambda: conv_bn_train_args()),
    ("shsa_fused", lambda: shsa_fused_args()),
    ("shsa_train", lambda: shsa_train_args()),
])
def test_cpu_tensors_are_declined(op, build):
    reasons = cuda_reasons(op, *build(), device_type="cpu")
    assert any("runs on cuda only" in r for r in reasons), reasons


def test_reasons_name_every_tensor_off_x_device():
    args = conv_bias_act_args(residual=True)
    out = conv_ops.conv_bias_act_reference(*args)
    x, rest = args[0], [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args[1:]]
    reasons = cuda_reasons("conv_bias_act_backward", torch.ones_like(out, device="meta"), x, *rest, out.to("meta"))
    assert any(all(f"'{n}'" in r for n in ("grad_out", "weight", "bias", "residual", "out")) for r in reasons), reasons


def test_float64_is_declined():
    reasons = cuda_reasons("conv_bias_act", *conv_bias_act_args(dtype=torch.float64))
    assert any("float64" in r for r in reasons)


@pytest.mark.parametrize("weight_shape,stride,padding,groups", [
    ((8, 8, 1, 1), 1, 0, 1),     # 1x1
    ((8, 8, 3, 3), 2, 1, 1),     # dense 3x3 (the stem)
    ((8, 1, 3, 3), 3, 1, 8),     # stride 3
    ((8, 1, 3, 3), 1, 0, 8),     # padding 0
    ((8, 1, 5, 5), 1, 2, 8),     # 5x5 depthwise
    ((8, 2, 3, 3), 1, 1, 4),     # grouped, not depthwise
])
def test_non_depthwise_convs_are_declined(weight_shape, stride, padding, groups):
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(*weight_shape)
    for reasons in (
        cuda_reasons("conv_bias_act", x, w, None, stride, padding, groups, False, None),
        cuda_reasons("conv_bn_train", x, w, torch.ones(w.shape[0]), torch.zeros(w.shape[0]), stride, padding, groups,
                     1e-5, False, None),
    ):
        assert any(cuda_backend.DEPTHWISE_ONLY in r for r in reasons), reasons


def test_depthwise_3x3_shape_is_accepted():
    for stride in (1, 2):
        assert cuda_reasons("conv_bias_act", *conv_bias_act_args(stride=stride)) == []


def test_kept_conv_outputs_are_declined():
    """The cuda Conv+BN pair recomputes the conv output: asked to keep one, or given one, it says so and the
    dispatcher moves on."""
    args = conv_bn_train_args()
    assert cuda_reasons("conv_bn_train", *args) == []
    assert any("keep_conv_output" in r for r in cuda_reasons("conv_bn_train", *args, True))
    x, weight, gamma, beta, stride, padding, groups, eps, relu, res = args
    out = torch.relu(torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, groups))
    bargs = (torch.randn_like(out), x, weight, gamma, beta, torch.zeros_like(gamma), torch.ones_like(gamma), out,
             stride, padding, groups, eps, relu, res is not None, True)
    assert cuda_reasons("conv_bn_train_backward", *bargs) == []
    assert any("conv_output" in r for r in cuda_reasons("conv_bn_train_backward", *bargs, out.clone()))


def test_shsa_limits():
    args = shsa_fused_args(p=129, c=140)
    assert any("P up to 128" in r for r in cuda_reasons("shsa_fused", *args))
    args = shsa_fused_args(p=75, c=80)  # odd P is fine
    assert cuda_reasons("shsa_fused", *args) == []
    args = shsa_train_args(qk_dim=8)
    assert any("qk_dim == 16" in r for r in cuda_reasons("shsa_train", *args))


def test_dispatcher_never_picks_cuda_for_cpu_tensors():
    with dispatch.patched_backend("cuda", availability=lambda: []):
        for op, args in (("conv_bias_act", conv_bias_act_args()), ("shsa_fused", shsa_fused_args()),
                         ("conv_bn_train", conv_bn_train_args()), ("shsa_train", shsa_train_args())):
            assert shvit_kernels.chosen_backend(op, "cpu", *args) != "cuda"
            # Even preferring cuda skips it for CPU tensors.
            with shvit_kernels.prefer_backend("cuda"):
                assert shvit_kernels.chosen_backend(op, "cpu", *args) != "cuda"


def test_forcing_cuda_on_cpu_tensors_is_a_clear_error():
    x, weight, _ = dw_args()
    with shvit_kernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run op 'conv_bias_act'"):
            shvit_kernels.conv_bias_act(x, weight, None, stride=1, padding=1, groups=x.shape[1])
    with dispatch.patched_backend("cuda", availability=lambda: []), shvit_kernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' runs on cuda only, not cpu"):
            shvit_kernels.conv_bias_act(x, weight, None, stride=1, padding=1, groups=x.shape[1])


# ---------------------------------------------------------------------------------------------------------
# GPU: every kernel vs its reference, forward and backward, fp32/fp16/bf16, NCHW and channels_last
# ---------------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gpu_grid(cases, case_id):
    """GPU-only test over dtypes x layouts x cases."""
    marks = [
        gpu,
        pytest.mark.gpu,
        pytest.mark.parametrize("dtype", DTYPES),
        pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"]),
        pytest.mark.parametrize("case", cases, ids=case_id),
    ]

    def apply(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn

    return apply


def _check(op, args, reference, names):
    """cuda kernel vs the reference run in args' dtype (eager) and in float64."""
    return check_kernel(dispatch.kernel("cuda", op), reference, args, name=op, outputs=names, check_layout=0)


DW_CASES = [
    dict(b=2, c=40, h=9, w=11, stride=1, relu=True, residual=False),
    dict(b=2, c=40, h=9, w=11, stride=2, relu=False, residual=True),
    dict(b=3, c=64, h=17, w=34, stride=2, relu=True, residual=True),
    dict(b=1, c=16, h=7, w=7, stride=1, relu=False, residual=False),
    # One per NCHW tile (chosen from the output map): 14x14 -> 16x16 tile, 7x7 -> 4 channels x 8x8,
    # 4x4 -> 16 channels x 4x4 (40 channels: a partial last chunk), and a stride-2 map ending at 4x4.
    dict(b=2, c=24, h=14, w=14, stride=1, relu=True, residual=True),
    dict(b=2, c=40, h=14, w=14, stride=2, relu=False, residual=False),
    dict(b=3, c=40, h=4, w=4, stride=1, relu=True, residual=True),
    dict(b=2, c=40, h=7, w=7, stride=2, relu=True, residual=False),
]


def dw_id(c):
    return f"s{c['stride']}-{c['h']}x{c['w']}-c{c['c']}"


@gpu_grid(DW_CASES, dw_id)
def test_gpu_conv_bias_act(dtype, cl, case):
    args = conv_bias_act_args(device="cuda", dtype=dtype, cl=cl, **case)
    (out,) = _check("conv_bias_act", args, conv_ops.conv_bias_act_reference, ["out"])
    grad_out = torch.randn_like(out)
    bargs = (grad_out, *args, out)
    _check("conv_bias_act_backward", bargs, conv_ops.conv_bias_act_backward_reference,
           ["grad_x", "grad_weight", "grad_bias", "grad_residual"])


@gpu_grid(DW_CASES, dw_id)
def test_gpu_conv_bn_train(dtype, cl, case):
    args = conv_bn_train_args(device="cuda", dtype=dtype, cl=cl, **case)
    out, mean, var, kept = _check("conv_bn_train", args, conv_ops.conv_bn_train_reference,
                                  ["out", "mean", "var", "kept conv output (empty)"])
    assert kept.numel() == 0
    x, weight, gamma, beta, stride, padding, groups, eps, relu, res = args
    bargs = (torch.randn_like(out), x, weight, gamma, beta, mean, var, out, stride, padding, groups, eps, relu,
             res is not None)
    _check("conv_bn_train_backward", bargs, conv_ops.conv_bn_train_backward_reference,
           ["grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias", "grad_residual"])


SHSA_CASES = [
    dict(b=2, c=24, p=16, h=4, w=5),
    dict(b=2, c=80, p=75, h=7, w=7),     # odd P, N not a multiple of the tile
    dict(b=1, c=128, p=128, h=14, w=14),  # largest P
    dict(b=1, c=64, p=48, h=32, w=32),   # N = 1024: many key tiles
]


def shsa_id(c):
    return f"p{c['p']}-n{c['h'] * c['w']}"


@gpu_grid(SHSA_CASES, shsa_id)
def test_gpu_shsa_fused(dtype, cl, case):
    args = shsa_fused_args(device="cuda", dtype=dtype, cl=cl, **case)
    (out,) = _check("shsa_fused", args, shsa_ops.shsa_fused_reference, ["out"])
    x, wq, bq, qk_dim, gn_eps = args
    bargs = (torch.randn_like(out), x, wq, bq, out, qk_dim, gn_eps)
    _check("shsa_fused_backward", bargs, shsa_ops.shsa_fused_backward_reference, ["grad_x", "grad_weight", "grad_bias"])


@gpu_grid(SHSA_CASES, shsa_id)
def test_gpu_shsa_train(dtype, cl, case):
    args = shsa_train_args(device="cuda", dtype=dtype, cl=cl, **case)
    out, mean, var = _check("shsa_train", args, shsa_ops.shsa_train_reference, ["out", "mean", "var"])
    x, gn_w, gn_b, wq, bn_w, bn_b, qk_dim, gn_eps, bn_eps = args
    bargs = (torch.randn_like(out), x, gn_w, gn_b, wq, bn_w, bn_b, mean, var, out, qk_dim, gn_eps, bn_eps)
    _check("shsa_train_backward", bargs, shsa_ops.shsa_train_backward_reference,
           ["grad_x", "grad_gn_weight", "grad_gn_bias", "grad_weight", "grad_bn_weight", "grad_bn_bias"])


@gpu
@pytest.mark.gpu
def test_gpu_strided_and_expanded_inputs():
    """A sliced input and an expanded (stride 0) grad_out take the general-stride paths."""
    x_big = torch.randn(2, 16, 12, 20, device="cuda")
    x = x_big[:, :, 1:10, ::2]
    w = torch.randn(16, 1, 3, 3, device="cuda")
    args = (x, w, None, 1, 1, 16, True, None)
    (out,) = _check("conv_bias_act", args, conv_ops.conv_bias_act_reference, ["out"])
    grad_out = torch.ones(1, device="cuda").expand_as(out)
    _check("conv_bias_act_backward", (grad_out, *args, out), conv_ops.conv_bias_act_backward_reference,
           ["grad_x", "grad_weight", "grad_bias", "grad_residual"])
    sx = torch.randn(2, 40, 6, 14, device="cuda")[:, :, :, 3:10]
    sargs = (sx, *shsa_fused_args(device="cuda", c=40, p=24, h=6, w=7)[1:])
    (sout,) = _check("shsa_fused", sargs, shsa_ops.shsa_fused_reference, ["out"])
    _check("shsa_fused_backward", (torch.ones(1, device="cuda").expand_as(sout), *sargs[:3], sout, *sargs[3:]),
           shsa_ops.shsa_fused_backward_reference, ["grad_x", "grad_weight", "grad_bias"])


@gpu
@pytest.mark.gpu
def test_gpu_public_api_autograd_through_cuda():
    x = torch.randn(2, 32, 8, 8, device="cuda", requires_grad=True)
    w = (torch.randn(32, 1, 3, 3, device="cuda") * 0.3).requires_grad_()
    gamma, beta = torch.ones(32, device="cuda", requires_grad=True), torch.zeros(32, device="cuda", requires_grad=True)
    grads = {}
    for name in ("cuda", "reference"):
        with shvit_kernels.use_backend(name):
            out = shvit_kernels.conv_bn(x, w, gamma, beta, None, None, padding=1, groups=32, training=True, relu=True)
            grads[name] = torch.autograd.grad(out.square().sum(), (x, w, gamma, beta))
    for a, b in zip(grads["cuda"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_gpu_bad_input_errors_name_the_argument():
    x, weight, _ = dw_args(device="cuda")
    with pytest.raises(RuntimeError, match="'weight' must be a CUDA tensor"):
        dispatch.kernel("cuda", "conv_bias_act")(x, weight.cpu(), None, 1, 1, 8, False, None)
    with pytest.raises(RuntimeError, match="'residual' must have shape"):
        dispatch.kernel("cuda", "conv_bias_act")(x, weight, None, 1, 1, 8, False, torch.randn(2, 8, 3, 3, device="cuda"))
    with pytest.raises(RuntimeError, match="'padding' must be 1"):
        dispatch.kernel("cuda", "conv_bias_act")(x, weight, None, 1, 0, 8, False, None)
    with pytest.raises(RuntimeError, match="'x' must be float32, float16 or bfloat16"):
        dispatch.kernel("cuda", "conv_bias_act")(x.double(), weight.double(), None, 1, 1, 8, False, None)
    sx, wq, bq, _, eps = shsa_fused_args(device="cuda")
    with pytest.raises(RuntimeError, match="'qkv_bias' must have 48 elements"):
        dispatch.kernel("cuda", "shsa_fused")(sx, wq, bq[:-1], QK, eps)
    with pytest.raises(RuntimeError, match="'qk_dim' must be 16"):
        dispatch.kernel("cuda", "shsa_fused")(sx, wq, bq, 8, eps)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_gpu_reductions_are_deterministic(cl):
    """Batch statistics and every gradient summed over the batch come out bit-identical on a second run (the
    kernels reduce per-block partials in a fixed order; float atomics would differ from run to run)."""
    k = {op: dispatch.kernel("cuda", op) for op in dispatch.ops()}

    def dw():
        out, mean, var, _ = k["conv_bn_train"](*bn_args)
        x, weight, gamma, beta, stride, padding, groups, eps, relu, res = bn_args
        grads = k["conv_bn_train_backward"](grad_dw, x, weight, gamma, beta, mean, var, out, stride, padding, groups,
                                            eps, relu, res is not None)
        return (out, mean, var, *grads)

    def shsa():
        out, mean, var = k["shsa_train"](*sargs)
        x, gn_w, gn_b, wq, bn_w, bn_b, qk_dim, gn_eps, bn_eps = sargs
        grads = k["shsa_train_backward"](grad_shsa, x, gn_w, gn_b, wq, bn_w, bn_b, mean, var, out, qk_dim, gn_eps,
                                         bn_eps)
        fused = k["shsa_fused_backward"](grad_shsa, x, wq, fargs[2], out, qk_dim, gn_eps)
        return (out, mean, var, *grads, *fused)

    bn_args = conv_bn_train_args(device="cuda", cl=cl, b=64, c=64, h=14, w=14, stride=1)
    grad_dw = torch.randn(64, 64, 14, 14, device="cuda")
    sargs = shsa_train_args(device="cuda", cl=cl, b=64, c=128, p=64, h=14, w=14)
    fargs = shsa_fused_args(device="cuda", cl=cl, b=64, c=128, p=64, h=14, w=14)
    grad_shsa = torch.randn(64, 128, 14, 14, device="cuda")
    for run in (dw, shsa):
        first, second = run(), run()
        for i, (a, b) in enumerate(zip(first, second)):
            assert torch.equal(a, b), f"{run.__name__} output {i} differs between two runs"
