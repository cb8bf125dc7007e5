"""Saved tensors recomputed in the backward pass instead of held (issue #16's memory).

Inside ``shvit_kernels.recompute_cheap_tensors`` (SHViT's training forward enters it) an op that keeps its conv
output saves that instead of its output, wherever the output is saved, and ``shvit::conv_bn_train_output`` gives the
output back in the backward. It must be the forward's bit for bit on the same backend, so a training step has the
same gradients with and without it, while the output itself is freed after the forward.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import shvit
import shvit_kernels as K
from shvit_kernels import dispatch
from shvit_kernels.ops import conv_bn as conv_ops

BACKENDS = [b for b in dispatch.usable_backends("cpu", include_reference=True) if b in ("cpp", "reference")]


def conv_bn_args(dtype, channels_last, relu, residual, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    c_in, c_out = (8, 8) if groups > 1 else (6, 10)
    k = 3 if groups > 1 else 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c_in, 5, 7, generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(c_out, c_in // groups, k, k, generator=g) * 0.3).to(dtype)
    bn_w = (torch.rand(c_out, generator=g) + 0.5).to(dtype)
    bn_b = (torch.randn(c_out, generator=g) * 0.2).to(dtype)
    res = torch.randn(3, c_out, 5, 7, generator=g).to(dtype).contiguous(memory_format=fmt) if residual else None
    return x, w, bn_w, bn_b, 1, k // 2, groups, 1e-5, relu, res


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_recomputed_output_is_the_forwards(backend, dtype, channels_last, relu, residual):
    """conv_bn_train_output on the forward's kept conv output and statistics gives the forward's output exactly,
    in the forward's layout."""
    args = conv_bn_args(dtype, channels_last, relu, residual)
    with K.use_backend(backend):
        out, mean, var, y = conv_ops.conv_bn_train_op(*args, True)
        again = conv_ops.conv_bn_train_output_op(y, args[2], args[3], mean, var, args[7], relu, args[9])
    assert again.stride() == out.stride()
    assert torch.equal(again, out)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_train_output_passes_opcheck(backend, channels_last):
    x, w, bn_w, bn_b, stride, padding, groups, eps, relu, res = conv_bn_args(torch.float32, channels_last, True, True)
    out, mean, var, y = conv_ops.conv_bn_train_op(x, w, bn_w, bn_b, stride, padding, groups, eps, relu, res, True)
    for residual in (res, None):
        with K.use_backend(backend):
            torch.library.opcheck(torch.ops.shvit.conv_bn_train_output.default,
                                  (y, bn_w, bn_b, mean, var, eps, True, residual))


def tiny_model():
    torch.manual_seed(0)
    return shvit.create_model("shvit_s1", num_classes=10, depth=(1, 1, 1)).to(memory_format=torch.channels_last).train()


def training_grads(model, x, labels, recompute, amp):
    m = copy.deepcopy(model)
    with K.recompute_cheap_tensors(recompute), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = m(x)
    F.cross_entropy(logits.float(), labels).backward()
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_has_the_same_gradients_with_recomputed_outputs(backend, amp):
    """SHViT's training forward recomputes outputs by default; every gradient matches the run that holds them.
    The run is also compared against one that holds them, with ``recompute_cheap_tensors(False)`` nested inside
    the model's own block, so the switch is shown to take effect."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (4,), generator=g)
    calls = []
    with K.use_backend(backend), dispatch.observe(lambda call: calls.append(call.op)):
        recomputed = training_grads(model, x, labels, True, amp)
        n_recomputed = calls.count("conv_bn_train_output")
        held = training_grads(model, x, labels, False, amp)
    assert n_recomputed > 0 and calls.count("conv_bn_train_output") == n_recomputed, "the switch had no effect"
    for name, grad in held.items():
        assert torch.equal(recomputed[name], grad), name


def test_output_is_freed_after_the_forward_and_recomputed_for_the_backward():
    """Inside the block the output of a Conv+BN that keeps its conv output is not held by the graph (neither by
    its own op for the ReLU mask nor by the op it feeds); outside it, it is."""
    x, w, bn_w, bn_b, *_ = conv_bn_args(torch.float32, True, True, False)
    w.requires_grad_(True)
    w2 = torch.randn(4, 10, 1, 1, requires_grad=True)
    ones, zeros = torch.ones(4), torch.zeros(4)
    grads = []
    for recompute in (True, False):
        with K.keep_conv_outputs("all"), K.recompute_cheap_tensors(recompute):
            hidden = K.conv_bn(x, w, bn_w, bn_b, None, None, training=True, relu=True)
            out = K.conv_bn(hidden, w2, ones, zeros, None, None, training=True)
        alive = weakref.ref(hidden)
        del hidden
        gc.collect()
        assert (alive() is None) == recompute
        out.square().sum().backward()
        grads.append((w.grad.clone(), w2.grad.clone()))
        w.grad = w2.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_residual_stream_recomputes_one_link_deep():
    """out2 = f(out1) + out1 is recomputed from out1's recipe in turn; out3 = g(out2) + out2 would need a chain of
    two and keeps out2's output for real. Gradients match the run that holds everything."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    ws = [torch.nn.Parameter(torch.randn(8, 8, 1, 1, generator=g) * 0.3) for _ in range(3)]
    ones, zeros = torch.ones(8), torch.zeros(8)
    grads, freed = [], []
    for recompute in (True, False):
        with K.keep_conv_outputs("all"), K.recompute_cheap_tensors(recompute):
            out1 = K.conv_bn(x, ws[0], ones, zeros, None, None, training=True, relu=True)
            out2 = K.conv_bn(out1, ws[1], ones, zeros, None, None, training=True, residual=out1)
            out3 = K.conv_bn(out2, ws[2], ones, zeros, None, None, training=True, residual=out2)
            out4 = K.conv_bn(out3, ws[0], ones, zeros, None, None, training=True)
        refs = [weakref.ref(t) for t in (out1, out2, out3)]
        del out1, out2, out3
        gc.collect()
        freed.append([r() is None for r in refs])
        out4.square().sum().backward()
        grads.append([w.grad.clone() for w in ws])
        for w in ws:
            w.grad = None
    assert freed == [[True, True, False], [False, False, False]]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_other_saved_tensor_hooks_keep_their_tensors():
    """Inside a user's saved-tensor hooks (activation offloading, checkpointing) the user's hooks see every saved
    tensor: the recomputation stays off."""
    x, w, bn_w, bn_b, *_ = conv_bn_args(torch.float32, True, True, False)
    w.requires_grad_(True)
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with K.keep_conv_outputs("all"), K.recompute_cheap_tensors():
            hidden = K.conv_bn(x, w, bn_w, bn_b, None, None, training=True, relu=True)
    assert any(t is hidden for t in seen)
    hidden.sum().backward()


def test_a_function_compiled_inside_the_block_traces_and_matches_eager():
    """torch.compile(fullgraph=True) of training Conv+BN ops called inside the block: the traced graph saves what it
    saves (nothing is offered while tracing) and its gradients are eager's."""
    torch._dynamo.reset()
    x, w, bn_w, bn_b, *_ = conv_bn_args(torch.float32, True, True, False)
    w = torch.nn.Parameter(w)
    w2 = torch.nn.Parameter(torch.randn(10, 10, 1, 1) * 0.3)

    def block(x):
        hidden = K.conv_bn(x, w, bn_w, bn_b, None, None, training=True, relu=True)
        return K.conv_bn(hidden, w2, bn_w, bn_b, None, None, training=True, residual=hidden)

    grads = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        with K.keep_conv_outputs("all"), K.recompute_cheap_tensors():
            out = fn(x)
        out.square().sum().backward()
        grads.append((out.detach(), w.grad.clone(), w2.grad.clone()))
        w.grad = w2.grad = None
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)


def test_recompute_switch_takes_a_bool():
    with pytest.raises(TypeError, match="'enabled' must be a bool"):
        with K.recompute_cheap_tensors("yes"):
            pass
