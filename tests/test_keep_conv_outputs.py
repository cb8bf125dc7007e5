"""Training Conv+BN keeping its conv output for the backward pass instead of recomputing it (issue #16).

``shvit_kernels.set_keep_conv_outputs`` / ``keep_conv_outputs`` decide per conv by the multiply-adds one output value
costs; kept or recomputed, the backward must get the same conv output, so every gradient is the same bit for bit.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import shvit
import shvit_kernels as K
from shvit_kernels import dispatch
from shvit_kernels.ops import conv_bn as conv_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
    torch.manual_seed(0)
    return shvit.create_model("shvit_s1", num_classes=10).to(memory_format=torch.channels_last).train()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (4,), generator=g)


def training_step(model, keep, backend=None):
    """(loss, {name: grad}, {name: buffer}, [(op, keep flag or kept output given)]) of one step under ``keep``."""
    m = copy.deepcopy(model)
    x, labels = batch()
    calls = []

    def spy(call):
        a = dict(zip(dispatch.op_arguments(call.op), call.args))
        if call.op == "conv_bn_train":
            calls.append(("forward", tuple(a["weight"].shape), a["keep_conv_output"]))
        elif call.op == "conv_bn_train_backward":
            calls.append(("backward", tuple(a["weight"].shape), a["conv_output"] is not None))

    with K.keep_conv_outputs(keep), dispatch.observe(spy), (K.use_backend(backend) if backend else _nothing()):
        loss = F.cross_entropy(m(x), labels)
        loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    buffers = {n: b for n, b in m.named_buffers() if b.is_floating_point()}
    return loss.detach(), grads, buffers, calls


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def macs_per_output(weight_shape):
    return weight_shape[1] * weight_shape[2] * weight_shape[3]


@pytest.mark.parametrize("backend", [None, "reference"], ids=["automatic", "reference"])
def test_kept_and_recomputed_conv_outputs_give_the_same_step_bit_for_bit(backend):
    model = tiny_model()
    results = {keep: training_step(model, keep, backend) for keep in ("none", "all", 300)}
    loss, grads, buffers, _ = results["none"]
    for keep in ("all", 300):
        other_loss, other_grads, other_buffers, _ = results[keep]
        assert torch.equal(other_loss, loss), keep
        for name in grads:
            assert torch.equal(other_grads[name], grads[name]), f"keep={keep}: grad {name}"
        for name in buffers:
            assert torch.equal(other_buffers[name], buffers[name]), f"keep={keep}: buffer {name}"


def test_the_threshold_picks_the_convs_by_their_multiply_adds_per_output():
    model = tiny_model()
    for keep, expected in (("none", lambda m: False), ("all", lambda m: True), (300, lambda m: m >= 300)):
        *_, calls = training_step(model, keep)
        forward = [(shape, flag) for phase, shape, flag in calls if phase == "forward"]
        backward = [(shape, flag) for phase, shape, flag in calls if phase == "backward"]
        assert forward and len(backward) == len(forward)
        assert all(flag == expected(macs_per_output(shape)) for shape, flag in forward), keep
        # The backward of each call gets the kept output exactly when its forward kept one.
        assert sorted(backward) == sorted(forward), keep
    flags = {flag for _, shape, flag in training_step(model, 300)[3]}
    assert flags == {True, False}, "threshold 300 should split S1's convs"


def test_kept_outputs_cost_their_size_in_saved_memory():
    """What autograd saves grows by exactly the kept conv outputs: nothing is kept twice or by accident."""
    model = tiny_model()
    x, _ = batch()

    def saved_bytes(keep):
        m = copy.deepcopy(model)
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
            return t

        kept = []

        def spy(call):
            if call.op == "conv_bn_train":
                a = dict(zip(dispatch.op_arguments(call.op), call.args))
                if a["keep_conv_output"]:
                    out_shape = conv_ops.conv_output_shape(a["x"], a["weight"], a["stride"], a["padding"])
                    kept.append(math.prod(out_shape) * a["x"].element_size())

        with K.keep_conv_outputs(keep), dispatch.observe(spy), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(x)
        del out
        return total, sum(kept)

    none_bytes, none_kept = saved_bytes("none")
    all_bytes, all_kept = saved_bytes("all")
    assert none_kept == 0 and all_kept > 0
    assert all_bytes - none_bytes == all_kept


def test_no_output_is_kept_without_autograd():
    model = tiny_model()
    x, _ = batch()
    flags = []

    def spy(call):
        if call.op == "conv_bn_train":
            flags.append(dict(zip(dispatch.op_arguments(call.op), call.args))["keep_conv_output"])

    with K.keep_conv_outputs("all"), dispatch.observe(spy):
        with torch.no_grad():
            model(x)
        frozen = copy.deepcopy(model).requires_grad_(False)
        frozen(x)
    assert flags and not any(flags)


def test_setting_and_restoring_the_threshold():
    previous = K.set_keep_conv_outputs("all")
    try:
        assert K.set_keep_conv_outputs(512) == 0.0
        with K.keep_conv_outputs("none"):
            assert not conv_ops.keeps_conv_output(torch.empty(8, 4096, 1, 1))
        assert conv_ops.keeps_conv_output(torch.empty(8, 512, 1, 1))
        assert not conv_ops.keeps_conv_output(torch.empty(8, 56, 3, 3))  # 504 multiply-adds
    finally:
        K.set_keep_conv_outputs(previous)


@pytest.mark.parametrize("bad", [-1, float("nan"), "some", True, None])
def test_bad_thresholds_are_clear_errors(bad):
    with pytest.raises(ValueError, match="set_keep_conv_outputs: expected 'all', 'none' or a number"):
        K.set_keep_conv_outputs(bad)


def test_environment_variable_sets_the_default_and_a_bad_one_warns():
    code = "import shvit_kernels as K; print(K.set_keep_conv_outputs(0))"
    env = dict(os.environ, PYTHONPATH=ROOT)
    for value, expected in (("all", "0.0"), ("none", "inf"), ("96", "96.0")):
        env["SHVIT_KERNELS_KEEP_CONV_OUTPUTS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)
    env["SHVIT_KERNELS_KEEP_CONV_OUTPUTS"] = "lots"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(conv_ops.DEFAULT_KEEP_MIN_MACS)
    assert "SHVIT_KERNELS_KEEP_CONV_OUTPUTS" in out.stderr and "'lots'" in out.stderr


def test_kept_output_ops_pass_opcheck_and_compile_in_one_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 48, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(32, 48, 1, 1) / 7).requires_grad_()
    gamma, beta = torch.rand(32).add_(0.5).requires_grad_(), torch.randn(32).requires_grad_()
    args = (x, w, gamma, beta, 1, 0, 1, 1e-5, True, None, True)
    for backend in dispatch.usable_backends("cpu", include_reference=True):
        with K.use_backend(backend):
            torch.library.opcheck(torch.ops.shvit.conv_bn_train.default, args)
    out, mean, var, y = torch.ops.shvit.conv_bn_train(*args)
    bargs = (torch.randn_like(out), x.detach(), w.detach(), gamma.detach(), beta.detach(), mean, var, out.detach(),
             1, 0, 1, 1e-5, True, False, True, y)
    for backend in dispatch.usable_backends("cpu", include_reference=True):
        with K.use_backend(backend):
            torch.library.opcheck(torch.ops.shvit.conv_bn_train_backward.default, bargs)

    def fn(x, w, gamma, beta):
        return K.conv_bn(x, w, gamma, beta, None, None, training=True, relu=True)

    torch._dynamo.reset()
    with K.keep_conv_outputs("all"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(x, w, gamma, beta)
        got.sum().backward()
    grads = [t.grad.clone() for t in (x, w, gamma, beta)]
    for t in (x, w, gamma, beta):
        t.grad = None
    with K.keep_conv_outputs("none"):
        want = fn(x, w, gamma, beta)
        want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got_grad, t in zip(grads, (x, w, gamma, beta)):
        torch.testing.assert_close(got_grad, t.grad, rtol=0, atol=0)
