"""The ops as PyTorch ops: opcheck, torch.compile, autocast, layouts, dispatch control and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shvit_kernels as K
from helpers import run
from shvit_kernels import dispatch
from shvit_kernels.testing.cases import (conv_case, ffn_case, patch_embed_case, pooled_linear_case, shsa_case,
                                         squeeze_excite_case)

SMALL_CASES = [
    ("conv-infer-stem", conv_case(2, 3, 8, 8, 8, 3, 2, 1, True, False, None)),
    ("conv-infer-dw-residual", conv_case(2, 8, 8, 5, 4, 3, 1, 8, False, True, None)),
    ("conv-train-1x1-relu", conv_case(2, 8, 12, 3, 3, 1, 1, 1, True, False, True)),
    ("conv-train-dw-s2-residual", conv_case(2, 8, 8, 6, 6, 3, 2, 8, False, True, True)),
    ("ffn", ffn_case(2, 8, 3, 3)),
    ("shsa-infer", shsa_case(2, 12, 7, 3, 3, None)),
    ("shsa-train", shsa_case(2, 12, 7, 3, 3, True)),
    ("squeeze-excite", squeeze_excite_case(2, 12, 3, 4, 5)),
    ("patch-embed", patch_embed_case(2, 3, (4, 6, 8, 10), 17, 16)),
    ("patch-embed-out-channels-last", patch_embed_case(2, 3, (4, 6, 8, 10), 17, 16, out_channels_last=True)),
    ("pooled-linear", pooled_linear_case(2, 12, 3, 4, 7)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name,build", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
@pytest.mark.parametrize("backend", dispatch.usable_backends("cpu", include_reference=True))
def test_opcheck_every_op(backend, name, build, channels_last):
    """opcheck each custom op this case runs, with the backend's kernel (ops it has no kernel for are skipped)."""
    fn, tensors = build(torch.float32, "cpu", channels_last)
    with dispatch.record() as recorded:
        run(fn, tensors, None)
    calls = [(call.op, call.args) for call in recorded]
    assert {op.endswith("_backward") for op, _ in calls} == {True, False}, "forward and backward ops must both run"
    checked = []
    for op, args in calls:
        if dispatch.explain(op, *args).not_supported[backend]:
            continue
        # Gradients flow only where the backend also has the op's backward, so the forced run stays on it.
        with_grad = not op.endswith("_backward") and dispatch.kernel(backend, f"{op}_backward") is not None
        args = tuple(
            a.detach().clone().requires_grad_(with_grad and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        with K.use_backend(backend):
            torch.library.opcheck(getattr(torch.ops.shvit, op).default, args)
        checked.append(op)
    if not checked:
        pytest.skip(f"{backend} has no kernel for {sorted({op for op, _ in calls})}")


@pytest.mark.parametrize("name,build", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_compile_fullgraph_each_op(name, build):
    """Fake kernels and autograd registrations let each op trace into one graph (forward and backward)."""
    torch._dynamo.reset()
    fn, tensors = build(torch.float32, "cpu", False)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_e, grads_e, _, grad_out = run(fn, tensors, None)
    out_c, grads_c, _, _ = run(compiled, tensors, None, grad_out)
    torch.testing.assert_close(out_c, out_e)
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k])


def test_compile_inductor_shsa():
    torch._dynamo.reset()
    fn, tensors = shsa_case(2, 24, 10, 4, 4, None)(torch.float32, "cpu", False)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(**tensors), fn(**tensors))


@pytest.mark.parametrize("name,build", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_autocast_bf16(name, build):
    """Under autocast the activation and conv weights run in bf16 and the result is close to fp32."""
    fn, tensors = build(torch.float32, "cpu", False)
    ref, *_ = run(fn, tensors, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads, _, _ = run(fn, tensors, None, torch.randn(ref.shape).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    for k, g in grads.items():
        assert g.dtype == tensors[k].dtype, f"grad {k} must come back in its parameter's dtype"
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


@pytest.mark.parametrize("name,build", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_channels_last_in_channels_last_out(name, build):
    fn, tensors = build(torch.float32, "cpu", True)
    out = fn(**{k: v.clone() for k, v in tensors.items()})
    # A map comes back channels_last; pooled_linear's (N, K) result contiguous.
    assert out.is_contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out.is_contiguous()
    same_nchw = fn(**{k: v.contiguous() for k, v in tensors.items()})
    # NCHW in, NCHW out, unless the call asks for channels_last (patch_embed's out_channels_last)
    if getattr(fn, "keywords", {}).get("out_channels_last"):
        assert same_nchw.is_contiguous(memory_format=torch.channels_last) and not same_nchw.is_contiguous()
    else:
        assert same_nchw.is_contiguous()
    torch.testing.assert_close(out, same_nchw)


# ---------------------------------------------------------------------------------------------------------
# Dispatch control
# ---------------------------------------------------------------------------------------------------------


def _shsa_args():
    fn, t = shsa_case(1, 12, 7, 3, 3, None)(torch.float32, "cpu", False)
    return fn, t


@pytest.mark.parametrize("backend", dispatch.usable_backends("cpu", include_reference=True))
def test_conv_bn_backward_skips_the_input_gradient_autograd_does_not_need(backend):
    """A network's first conv (its input needs no gradient) asks its backward for no input gradient; a conv whose
    input needs one gets it, equal to the one computed without the flag."""
    calls = []
    real = dispatch.kernel(backend, "conv_bn_train_backward")

    def spy(*args):
        calls.append(args[dispatch.op_arguments("conv_bn_train_backward").index("input_grad")])
        return real(*args)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    weight = torch.randn(8, 3, 3, 3, requires_grad=True)
    gamma, beta = torch.rand(8) + 0.5, torch.randn(8)
    grads = {}
    with dispatch.patched_backend(backend, kernels={"conv_bn_train_backward": spy}), K.use_backend(backend):
        for needs in (False, True):
            xi = x.clone().requires_grad_(needs)
            weight.grad = None
            K.conv_bn(xi, weight, gamma, beta, None, None, stride=2, padding=1, training=True, relu=True).square().sum().backward()
            grads[needs] = (weight.grad.clone(), xi.grad)
    assert calls == [False, True]
    assert grads[False][1] is None and grads[True][1] is not None and grads[True][1].abs().sum() > 0
    torch.testing.assert_close(grads[False][0], grads[True][0], rtol=0, atol=0)


def test_use_backend_forces_and_restores():
    fn, t = _shsa_args()
    args = (t["x"], t["qkv_weight"], t["qkv_bias"], 16, 1e-5)
    with K.use_backend("reference"):
        assert K.forced_backend() == "reference"
        assert K.chosen_backend("shsa_fused", "cpu", *args) == "reference"
    assert K.forced_backend() is None


def test_slower_reasons_steer_automatic_choice_only(monkeypatch):
    """A kernel measured slower for a call is skipped automatically, yet runs when its backend is forced."""
    fn, t = _shsa_args()
    args = (t["x"], t["qkv_weight"], t["qkv_bias"], 16, 1e-5)
    planted = dict(
        availability=lambda: [], kernels={"shsa_fused": lambda *a: None}, slower={"shsa_fused": lambda **_: ["measured slower"]}
    )
    with dispatch.patched_backend("cpp", start_empty=True, **planted):
        choice = dispatch.explain("shsa_fused", *args)
        assert choice.not_supported["cpp"] == []
        assert choice.slower["cpp"] == ["measured slower"]
        assert choice.backend == "reference" and K.chosen_backend("shsa_fused", "cpu", *args) == "reference"
        for forced in (K.use_backend("cpp"), K.prefer_backend("cpp")):
            with forced:
                assert K.chosen_backend("shsa_fused", "cpu", *args) == "cpp"


def test_forced_backend_that_cannot_run_raises_with_reasons():
    fn, t = _shsa_args()
    with K.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run op 'shsa_fused'"):
            fn(**t)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        K.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with K.use_backend("fast"):
            pass


def test_environment_variable_forces_backend():
    code = (
        "import shvit_kernels as K; print(K.forced_backend()); "
        "import torch; x = torch.randn(1, 4, 4, 4); w = torch.randn(4, 1, 3, 3); "
        "print(K.chosen_backend('conv_bias_act', 'cpu', x, w, None, 1, 1, 4, False, None))"
    )
    env = dict(os.environ, SHVIT_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["reference", "reference"]
    env["SHVIT_KERNELS_BACKEND"] = "nope"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "SHVIT_KERNELS_BACKEND='nope'" in res.stderr


def test_backend_table_explains_every_unusable_backend():
    rows = K.backend_table()
    assert {r["op"] for r in rows} >= {"conv_bias_act", "conv_bn_train", "ffn_fused", "shsa_fused", "shsa_train"}
    for r in rows:
        assert r["usable"] or r["why"], f"{r} is unusable without a reason"
    assert all(r["usable"] for r in rows if r["backend"] == "reference")


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------------------


def test_bad_conv_inputs():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="'x' must be a 4-D tensor"):
        K.conv_bias_act(x[0], w, padding=1, groups=8)
    with pytest.raises(ValueError, match="'x' has 8 channels but 'weight'"):
        K.conv_bias_act(x, torch.randn(8, 2, 3, 3), padding=1, groups=8)
    with pytest.raises(TypeError, match="'x' must be a floating-point tensor"):
        K.conv_bias_act(x.long(), w, padding=1, groups=8)
    with pytest.raises(TypeError, match="'weight' has dtype torch.float64"):
        K.conv_bias_act(x, w.double(), padding=1, groups=8)
    with pytest.raises(ValueError, match="'residual' must have shape"):
        K.conv_bias_act(x, w, padding=1, groups=8, residual=torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="'x' has 8 channels, which 'groups'=3 does not divide"):
        K.conv_bias_act(x, torch.randn(8, 8, 1, 1), groups=3)
    with pytest.raises(ValueError, match=r"'weight' \(9, 4, 1, 1\) has 9 output channels, which 'groups'=2"):
        K.conv_bias_act(x, torch.randn(9, 4, 1, 1), groups=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        K.conv_bias_act(torch.randn(1, 8, 1, 1), torch.randn(8, 8, 3, 3))
    with pytest.raises(ValueError, match="'bias' must have shape"):
        K.conv_bias_act(x, w, torch.randn(7), padding=1, groups=8)
    g, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="'running_mean' is required when training=False"):
        K.conv_bn(x, w, g, b, None, None, padding=1, groups=8, training=False)
    with pytest.raises(ValueError, match="more than one value per channel"):
        K.conv_bn(torch.randn(1, 8, 1, 1), torch.randn(8, 8, 1, 1), g, b, None, None, training=True)
    with pytest.raises(TypeError, match="'bn_weight' must be float32 or the dtype of 'x'"):
        K.conv_bn(x.bfloat16(), w.bfloat16(), g.double(), b, None, None, padding=1, groups=8, training=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device type")
def test_device_mismatch():
    x = torch.randn(2, 8, 6, 6, device="cuda")
    with pytest.raises(ValueError, match="'weight' is on cpu but 'x' is on cuda"):
        K.conv_bias_act(x, torch.randn(8, 1, 3, 3), padding=1, groups=8)


def test_bad_shsa_inputs():
    x = torch.randn(2, 12, 3, 3)
    w = torch.randn(2 * 16 + 7, 7, 1, 1)
    b = torch.randn(39)
    with pytest.raises(ValueError, match="partial dim P=20 .* exceeds the channels of 'x' \\(12\\)"):
        K.shsa_fused(x, torch.randn(52, 20, 1, 1), torch.randn(52))
    with pytest.raises(ValueError, match="'qkv_weight' must have shape \\(39, 7, 1, 1\\) = \\(2\\*qk_dim \\+ P, P, 1, 1\\) with qk_dim=16, P=7"):
        K.shsa_fused(x, torch.randn(40, 7, 1, 1), b)
    with pytest.raises(ValueError, match="'qkv_bias' must have shape"):
        K.shsa_fused(x, w, torch.randn(38))
    with pytest.raises(ValueError, match="'qk_dim' must be a positive int"):
        K.shsa_fused(x, w, b, qk_dim=0)
    with pytest.raises(ValueError, match="'gn_weight' must have shape \\(7\\)"):
        K.shsa(x, torch.ones(6), torch.zeros(7), w, torch.ones(39), torch.zeros(39), None, None, training=True)


def test_bad_ffn_inputs():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="'w1' must have shape \\(16, 8, 1, 1\\) \\(hidden, C=8, 1, 1\\), got \\(16, 7, 1, 1\\)"):
        K.ffn_fused(x, torch.randn(16, 7, 1, 1), torch.randn(16), torch.randn(8, 16, 1, 1), torch.randn(8))
    with pytest.raises(ValueError, match="'w2' must have shape \\(8, 16, 1, 1\\)"):
        K.ffn_fused(x, torch.randn(16, 8, 1, 1), torch.randn(16), torch.randn(8, 15, 1, 1), torch.randn(8))
    # The BN form, in training too, where the two Conv+BN ops would otherwise report a bad 'residual'.
    bn = lambda c: (torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c))  # noqa: E731
    for training in (True, False):
        with pytest.raises(ValueError, match="'pw2\\[0\\] \\(weight\\)' must have shape \\(8, 16, 1, 1\\), got \\(9, 16, 1, 1\\)"):
            K.ffn(x, (torch.randn(16, 8, 1, 1), *bn(16)), (torch.randn(9, 16, 1, 1), *bn(9)), training=training)
        with pytest.raises(ValueError, match="'pw1\\[0\\] \\(weight\\)' must have shape \\(16, 8, 1, 1\\)"):
            K.ffn(x, (torch.randn(16, 7, 1, 1), *bn(16)), (torch.randn(8, 16, 1, 1), *bn(8)), training=training)


def test_large_magnitude_low_precision_attention_stays_finite():
    for dtype in (torch.bfloat16, torch.float16):
        fn, t = shsa_case(2, 24, 10, 4, 4, None)(torch.float32, "cpu", False)
        t = {k: v.to(dtype) for k, v in t.items()}
        t["x"] = t["x"] * 1e4
        out = fn(**t)
        assert torch.isfinite(out).all(), f"{dtype}: non-finite output for |x| ~ 1e4"


def test_prefer_backend_falls_back_where_the_backend_cannot_run():
    fn, t = _shsa_args()
    with K.prefer_backend("cuda"):  # never takes CPU tensors
        assert K.forced_backend() == "cuda"
        out = fn(**t)
    with K.use_backend("reference"):
        torch.testing.assert_close(out, fn(**t))


def test_import_without_compiled_extension_warns_once_and_uses_reference():
    """A machine where the C++ extension was not built: import works, one clear warning, reference ops run."""
    code = r"""
import importlib.abc, sys, warnings
class NoExtensions(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("shvit_kernels._C"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoExtensions())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import shvit_kernels, shvit
    import shvit_kernels as again
import torch
m = shvit.create_model("shvit_s1").eval()
with torch.no_grad():
    y = shvit.fuse(m)(torch.randn(1, 3, 64, 64))
mine = [str(w.message) for w in caught if "shvit_kernels" in str(w.message)]
print(len(mine)); print(mine[0] if mine else ""); print(tuple(y.shape))
print(shvit_kernels.chosen_backend("shsa_fused", "cpu", torch.randn(1, 8, 2, 2), torch.randn(36, 4, 1, 1), torch.randn(36), 16, 1e-5))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    count, message, shape, backend = res.stdout.strip().split("\n")
    assert count == "1", res.stdout
    assert "C++ CPU backend is unavailable" in message and "reference" in message
    assert shape == "(1, 1000)" and backend == "reference"


@pytest.mark.parametrize("name,build", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_autograd_path_gives_the_custom_ops_results_bit_for_bit(name, build, dtype):
    """Eager calls under autograd skip the custom-op machinery (an autograd.Function around the chosen kernels):
    outputs, every gradient and the running statistics are those of the custom op's own autograd, bit for bit;
    under bf16 autocast too."""
    from shvit_kernels.ops import _common

    fn, tensors = build(torch.float32, "cpu", True)
    results = {}
    for path, functions in (("fast", _common._eager_autograd), ("op", {})):
        saved, _common._eager_autograd = _common._eager_autograd, functions
        try:
            with dispatch.record() as calls, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
                results[path] = run(fn, {k: v.clone() for k, v in tensors.items()}, None,
                                    grad_out=results["fast"][3] if path == "op" else None)
        finally:
            _common._eager_autograd = saved
        # (the backward ops are plain calls on either path: autograd runs them without grad)
        assert {c.direct for c in calls if not c.op.endswith("_backward")} == {path == "fast"}, path
    fast, op = results["fast"], results["op"]
    torch.testing.assert_close(fast[0], op[0], rtol=0, atol=0)
    for k in op[1]:
        torch.testing.assert_close(fast[1][k], op[1][k], rtol=0, atol=0, msg=f"grad {k}")
    for k in op[2]:
        torch.testing.assert_close(fast[2][k], op[2][k], rtol=0, atol=0, msg=f"stat {k}")


def test_plain_eager_calls_bypass_the_op_machinery_only_when_nothing_observes_it():
    """Plain eager calls run the kernel directly (under autograd inside the op's formula); compile, profiler,
    modes, autocast without autograd and subclasses get the custom op."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(2, 8, 5, 5), torch.randn(8, 8, 1, 1), torch.randn(8)

    def direct(x=x, w=w):
        with dispatch.record() as calls:
            out = K.conv_bias_act(x, w, b, relu=True)
        (call,) = calls
        return call.direct, out

    is_direct, out = direct()
    assert is_direct
    torch.testing.assert_close(out, torch.ops.shvit.conv_bias_act(x, w, b, 1, 0, 1, True, None), rtol=0, atol=0)
    param = torch.nn.Parameter(w.clone())
    # Under autograd the kernel runs inside the op's own formula, as an autograd.Function autograd sees.
    assert direct(w=param)[0]
    assert "conv_bias_act_eager_autograd" in type(K.conv_bias_act(x, param, b, relu=True).grad_fn).__name__
    with torch.no_grad():
        assert direct(w=param)[0]
    with K.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):  # the call, not a bf16 kernel
        assert not direct()[0]
    with torch.profiler.profile():
        assert not direct()[0]
    with K.use_backend("reference"), FlopCounterMode(display=False) as counter:
        assert not direct()[0]
    # The mode saw the custom op (no flop formula) and not the aten conv inside it, which a bypass would show.
    assert counter.get_total_flops() == 0

    class Tagged(torch.Tensor):
        pass

    assert not direct(x=x.as_subclass(Tagged))[0]
