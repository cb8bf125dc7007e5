"""Defects a fault probe found (issue 15), one test each: zero-size dimensions, the cpp output cache, NaN through
the ReLU backward, state left by a failed call, and clear errors for bad arguments on every backend."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import shvit_kernels as K
from shvit_kernels import dispatch
from shvit_kernels.backends import cpp

from helpers import DEVICE
from shvit_kernels.dispatch import usable_backends

requires_cpp = pytest.mark.skipif(cpp.variant() is None, reason="; ".join(dispatch.unavailable_reasons("cpp")) or "cpp unavailable")
BACKENDS = ["reference", *usable_backends(DEVICE)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _act(*shape, fmt=torch.contiguous_format, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------------------------
# Zero-size dimensions: a clear error naming the argument, on every backend (cpp died with SIGFPE / bad_alloc).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_zero_size_conv_weight_is_a_clear_error(backend, fmt):
    x = _act(2, 8, 6, 6, fmt=fmt)
    with K.use_backend(backend), pytest.raises(ValueError, match="'weight' must not be empty"):
        K.conv_bias_act(x, torch.randn(0, 8, 1, 1, device=DEVICE), torch.randn(0, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_zero_hidden_ffn_is_a_clear_error(backend, fmt):
    x = _act(2, 8, 6, 6, fmt=fmt)
    w1, b1, w2, b2 = (torch.randn(0, 8, 1, 1), torch.randn(0), torch.randn(8, 0, 1, 1), torch.randn(8))
    with K.use_backend(backend), pytest.raises(ValueError, match="'w1' must not be empty"):
        K.ffn_fused(x, *(t.to(DEVICE) for t in (w1, b1, w2, b2)))


@requires_cpp
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_cpp_kernels_reject_zero_size_weights_directly(fmt):
    """Called without the Python checks (torch.ops / the extension), the C++ kernels raise instead of crashing."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    m = cpp.extension()
    with pytest.raises(RuntimeError, match="'weight' must not be empty"):
        m.conv_bias_act(x, torch.randn(0, 8, 1, 1), torch.randn(0), 1, 0, 1, False, None)
    with pytest.raises(RuntimeError, match="'w1' must not be empty"):
        m.ffn_fused(x, torch.randn(0, 8, 1, 1), torch.randn(0), torch.randn(8, 0, 1, 1), torch.randn(8))
    with pytest.raises(RuntimeError, match="must not be empty"):
        m.conv_bn_train(x, torch.randn(0, 8, 3, 3), torch.randn(0), torch.randn(0), 1, 1, 1, 1e-5, False, None, False)


@requires_cpp
def test_custom_op_with_zero_size_weight_is_a_clear_error():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with K.use_backend("cpp"), pytest.raises(RuntimeError, match="must not be empty"):
        torch.ops.shvit.conv_bias_act(x, torch.randn(0, 8, 1, 1), None, 1, 0, 1, False, None)


# ---------------------------------------------------------------------------------------------------------------
# The cpp output cache: outputs are ordinary resizable tensors; the cache is bounded and can be emptied.
# ---------------------------------------------------------------------------------------------------------------
def _big_cpp_output():
    """A cpp conv output of 4.7 MB, which the output cache serves."""
    x = torch.randn(2, 64, 96, 96).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, 64, 1, 1) / 8, torch.randn(64)
    with K.use_backend("cpp"):
        return K.conv_bias_act(x, w, b)


@requires_cpp
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_cached_output_can_be_resized_and_used():
    y = _big_cpp_output()
    y.resize_(4, 64, 96, 96)  # grows: reallocated through the CPU allocator, old block back to the cache
    y.fill_(1.5)
    assert float(y.sum()) == 1.5 * y.numel()
    z = _big_cpp_output()
    torch.add(torch.ones(3, 64, 97, 97), 1, out=z)  # out= of another size
    assert z.shape == (3, 64, 97, 97) and bool((z == 2).all())


@requires_cpp
def test_output_cache_is_bounded_and_can_be_emptied():
    K.empty_cache()
    y = _big_cpp_output()
    nbytes = y.numel() * y.element_size()
    del y
    assert cpp.output_cache_bytes() >= nbytes
    assert K.empty_cache() >= nbytes and cpp.output_cache_bytes() == 0
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 1, 1)  # held: its packed copy is remembered while it lives
    with K.use_backend("cpp"):
        K.conv_bias_act(x, w, None)
    held = cpp.packed_weight_count()
    assert held >= 1
    K.empty_cache(packed_weights=False)
    assert cpp.packed_weight_count() == held
    K.empty_cache()
    assert cpp.packed_weight_count() == 0
    with pytest.raises(TypeError, match="'packed_weights' must be a bool, got str"):
        K.empty_cache(packed_weights="no")
    previous = cpp.set_output_cache_limit(nbytes - 1)  # smaller than one block: nothing is kept
    try:
        del_me = _big_cpp_output()
        del del_me
        assert cpp.output_cache_bytes() == 0
    finally:
        cpp.set_output_cache_limit(previous)
    assert previous == 512 << 20


# ---------------------------------------------------------------------------------------------------------------
# NaN gradients propagate through the ReLU backward as in the reference (grad_out * (out > 0)).
# ---------------------------------------------------------------------------------------------------------------
def _nan_grad_like(out):
    g = torch.randn_like(out)
    g[out <= 0] = float("nan")  # where the ReLU is closed: 0 * NaN is NaN
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_relu_backward_propagates_nan_like_the_reference(backend, fmt):
    def grads(name):
        torch.manual_seed(1)
        x = _act(2, 8, 6, 6, fmt=fmt).requires_grad_()
        w = (torch.randn(8, 1, 3, 3, device=DEVICE) / 3).requires_grad_()
        bn_w, bn_b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
        with K.use_backend(name):
            outs = [
                K.conv_bias_act(x, w, torch.zeros(8, device=DEVICE), padding=1, groups=8, relu=True),
                K.conv_bn(x, w, bn_w, bn_b, None, None, padding=1, groups=8, training=True, relu=True),
            ]
            return [torch.autograd.grad(o, x, _nan_grad_like(o.detach()))[0] for o in outs]

    for got, want in zip(grads(backend), grads("reference")):
        assert torch.equal(got.isnan(), want.isnan()), f"{backend}: NaN pattern differs from the reference"
        assert got.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shsa_backward_propagates_nan_like_the_reference(backend):
    def grad(name):
        torch.manual_seed(2)
        x = _act(2, 24, 4, 4).requires_grad_()
        w = (torch.randn(40, 8, 1, 1, device=DEVICE) / 3)
        with K.use_backend(name):
            out = K.shsa_fused(x, w, torch.zeros(40, device=DEVICE))
            return torch.autograd.grad(out, x, _nan_grad_like(out.detach()))[0]

    assert torch.equal(grad(backend).isnan(), grad("reference").isnan())


@requires_cpp
def test_cpp_ffn_backward_propagates_nan_like_the_reference():
    from shvit_kernels.ops.ffn import ffn_fused_backward_reference

    x = torch.randn(2, 8, 4, 4)
    w1, b1, w2, b2 = torch.randn(16, 8, 1, 1), torch.randn(16), torch.randn(8, 16, 1, 1), torch.randn(8)
    g = torch.randn_like(x)
    g[0, 0, 0, 0] = float("nan")
    got = cpp.extension().ffn_fused_backward(g, x, w1, b1, w2, b2)
    want = ffn_fused_backward_reference(g, x, w1, b1, w2, b2)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())


# ---------------------------------------------------------------------------------------------------------------
# A failed call changes no state.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_training_conv_bn_leaves_running_stats_alone(backend):
    x = _act(4, 8, 6, 6)
    w = torch.randn(8, 8, 1, 1, device=DEVICE)
    running_mean = torch.randn(8, device=DEVICE)
    bad_var = torch.rand(5, device=DEVICE)
    before = running_mean.clone()
    with K.use_backend(backend), pytest.raises(ValueError, match="'running_var'"):
        K.conv_bn(x, w, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), running_mean, bad_var, training=True)
    assert torch.equal(running_mean, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_training_shsa_leaves_running_stats_alone(backend):
    x = _act(2, 24, 4, 4)
    n = 40
    rm, rv_bad = torch.randn(n, device=DEVICE), torch.rand(n + 1, device=DEVICE)
    before = rm.clone()
    args = (torch.ones(8), torch.zeros(8), torch.randn(n, 8, 1, 1), torch.ones(n), torch.zeros(n))
    with K.use_backend(backend), pytest.raises(ValueError, match="'running_var'"):
        K.shsa(x, *(t.to(DEVICE) for t in args), rm, rv_bad, training=True)
    assert torch.equal(rm, before)


# ---------------------------------------------------------------------------------------------------------------
# Clear errors for bad arguments, whichever backend is chosen.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_x", [[[1.0]], np.zeros((2, 8, 6, 6), dtype=np.float32)], ids=["list", "numpy"])
def test_x_that_is_not_a_tensor_is_a_type_error(bad_x):
    w = torch.randn(8, 8, 1, 1)
    checks = [
        lambda: K.conv_bias_act(bad_x, w),
        lambda: K.conv_bn(bad_x, w, torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8)),
        lambda: K.ffn_fused(bad_x, torch.randn(16, 8, 1, 1), torch.zeros(16), torch.randn(8, 16, 1, 1), torch.zeros(8)),
        lambda: K.shsa_fused(bad_x, torch.randn(40, 8, 1, 1), torch.zeros(40)),
    ]
    for check in checks:
        with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
            check()


def test_meta_tensors_are_a_clear_error():
    x = torch.empty(2, 8, 6, 6, device="meta")
    w = torch.empty(8, 8, 1, 1, device="meta")
    with pytest.raises(ValueError, match="'x' is on the meta device"):
        K.conv_bias_act(x, w)
    with pytest.raises(ValueError, match="'x' is on the meta device"):
        K.shsa_fused(x, torch.empty(40, 8, 1, 1, device="meta"), torch.empty(40, device="meta"))
    with pytest.raises(ValueError, match="'weight' is on the meta device"):
        K.conv_bias_act(torch.randn(2, 8, 6, 6), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_ffn_with_wrong_bn_size_is_a_clear_error(backend):
    x = _act(2, 8, 4, 4)
    pw1 = (torch.randn(16, 8, 1, 1), torch.ones(16), torch.zeros(16), torch.zeros(16), torch.ones(15))
    pw2 = (torch.randn(8, 16, 1, 1), torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8))
    on = lambda p: tuple(t.to(DEVICE) for t in p)  # noqa: E731
    with K.use_backend(backend), pytest.raises(ValueError, match=r"'pw1\[4\] \(running_var\)' must have shape \(16\)"):
        K.ffn(x, on(pw1), on(pw2), training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_negative_eps_is_rejected_on_every_backend(backend, training):
    x = _act(4, 8, 6, 6)
    w = torch.randn(8, 8, 1, 1, device=DEVICE)
    stats = (torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), torch.zeros(8, device=DEVICE),
             torch.ones(8, device=DEVICE))
    with K.use_backend(backend), pytest.raises(ValueError, match="'eps' must be a finite number >= 0"):
        K.conv_bn(x, w, *stats, training=training, eps=-1e-3)
    n = 40
    shsa_args = [t.to(DEVICE) for t in (torch.ones(8), torch.zeros(8), torch.randn(n, 8, 1, 1), torch.ones(n),
                                        torch.zeros(n), torch.zeros(n), torch.ones(n))]
    with K.use_backend(backend), pytest.raises(ValueError, match="'bn_eps' must be a finite number >= 0"):
        K.shsa(x[:, :8].repeat(1, 3, 1, 1), *shsa_args, training=training, bn_eps=-1.0)
    with K.use_backend(backend), pytest.raises(ValueError, match="'gn_eps' must be a finite number >= 0"):
        K.shsa_fused(x[:, :8].repeat(1, 3, 1, 1), shsa_args[2], torch.zeros(n, device=DEVICE), gn_eps=-1.0)


@pytest.mark.parametrize("field,bad,message", [
    ("w1", torch.randn(4, 7, 1, 1), r"'w1' must have shape \(4, 8, 1, 1\)"),
    ("w2", torch.randn(8, 3, 1, 1), r"'w2' must have shape \(8, 4, 1, 1\)"),
    ("b2", torch.randn(7), r"'b2' must have shape \(8\)"),
    ("w1", torch.randn(4, 8, 1, 1).double(), r"'w1' has dtype torch.float64 but 'x' has torch.float32"),
])
def test_squeeze_excite_bad_arguments_are_clear_errors(field, bad, message):
    args = dict(x=torch.randn(2, 8, 3, 3), w1=torch.randn(4, 8, 1, 1), b1=torch.randn(4), w2=torch.randn(8, 4, 1, 1),
                b2=torch.randn(8))
    args[field] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        K.squeeze_excite(**args)


def test_squeeze_excite_without_biases_uses_zero_biases():
    x, w1, w2 = torch.randn(2, 8, 3, 3), torch.randn(4, 8, 1, 1), torch.randn(8, 4, 1, 1)
    torch.testing.assert_close(K.squeeze_excite(x, w1, None, w2, None),
                               K.squeeze_excite(x, w1, torch.zeros(4), w2, torch.zeros(8)))


@pytest.mark.parametrize("field,bad,message", [
    ("x", torch.randn(2, 8), r"'x' must be a 4-D tensor"),
    ("x", torch.randn(0, 8, 3, 3), r"'x' must not be empty"),
    ("weight", torch.randn(5, 7), r"'weight' must have shape \(\*, 8\)"),
    ("weight", torch.randn(5, 8, 1, 1), r"'weight' must be a 2-D tensor"),
    ("weight", torch.randn(5, 8).double(), r"'weight' has dtype torch.float64 but 'x' has torch.float32"),
    ("bias", torch.randn(4), r"'bias' must have shape \(5\)"),
])
def test_pooled_linear_bad_arguments_are_clear_errors(field, bad, message):
    args = dict(x=torch.randn(2, 8, 3, 3), weight=torch.randn(5, 8), bias=torch.randn(5))
    args[field] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        K.pooled_linear(**args)


def test_pooled_linear_without_bias_uses_a_zero_bias():
    x, w = torch.randn(2, 8, 3, 3), torch.randn(5, 8)
    torch.testing.assert_close(K.pooled_linear(x, w), K.pooled_linear(x, w, torch.zeros(5)))
    torch.testing.assert_close(K.pooled_linear(x, w), x.mean((2, 3)) @ w.t())
