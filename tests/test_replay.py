"""Replayed kernel chains (shvit_kernels.replay) and the fused model's replayed inference forward."""

import copy
import io
import pickle

import pytest
import torch

import shvit
import shvit_kernels
from shvit import bench
from shvit_kernels import dispatch
from shvit_kernels.replay import KernelChain, replayable


@pytest.fixture
def fused_s1():
    torch.manual_seed(0)
    model = shvit.create_model("shvit_s1").eval()
    # Trained-looking BatchNorms: at initialisation some residual branches are zero and their outputs equal their
    # inputs, which a recording cannot tell apart (it declines; see the test below).
    bench._randomize_bn(model)
    return shvit.fuse(model)


def chains(model):
    return [c for c, _ in model.__dict__.get("_kernel_chains", {}).values()]


def module_path(model, x):
    with torch.inference_mode():
        return model.forward_head(model._module_features(*model._enter(x)))


def test_fused_forward_replays_its_kernels_with_the_same_result(fused_s1, monkeypatch):
    replays = []
    replay_call = KernelChain.__call__
    monkeypatch.setattr(KernelChain, "__call__", lambda self, x: replays.append(1) or replay_call(self, x))
    x = torch.randn(2, 3, 64, 64)
    expected = module_path(fused_s1, x)
    with torch.inference_mode():
        first = fused_s1(x)  # records (and checks the recording by replaying it once)
        replays.clear()
        second = fused_s1(x)
    assert replays == [1]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    (chain,) = chains(fused_s1)
    assert chain is not None and len(chain) > 40
    if not dispatch.unavailable_reasons("cpp"):  # cpp steps call the compiled function, without its Python wrapper
        from shvit_kernels.backends import cpp
        kernels = [step[0] for step in chain._steps]
        assert not any(k.__name__.startswith("cpp_") for k in kernels)
        assert sum(k is getattr(cpp._module, k.__name__, None) for k in kernels) > 30
    # a new input with the same signature: still the module path's answer
    y = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fused_s1(y), module_path(fused_s1, y))


def test_replay_follows_in_place_weight_changes_and_replaced_modules(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused_s1(x)
    with torch.no_grad():
        fused_s1.blocks2[1].conv1.weight.mul_(1.5)  # in place: the chain's recorded version moves
    with torch.inference_mode():
        assert torch.equal(fused_s1(x), module_path(fused_s1, x))
    replacement = copy.deepcopy(fused_s1.blocks3[3].ffn)
    with torch.no_grad():
        replacement.m.pw2.bias.add_(1.0)
    fused_s1.blocks3[3].ffn = replacement  # a new module object: the tree check sees it
    with torch.inference_mode():
        got = fused_s1(x)
    assert torch.equal(got, module_path(fused_s1, x))
    conv = fused_s1.blocks1[1].conv
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 0.5)  # a new parameter object under the same name
    with torch.inference_mode():
        got = fused_s1(x)
    assert torch.equal(got, module_path(fused_s1, x))


def test_hooks_see_every_call_while_they_are_set(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    seen = []
    with torch.inference_mode():
        fused_s1(x)
        handle = fused_s1.blocks1[0].ffn.register_forward_hook(lambda *_: seen.append(1))
        fused_s1(x)
        fused_s1(x)
        handle.remove()
        fused_s1(x)
    assert seen == [1, 1]


def test_a_forward_replaced_on_an_instance_is_called(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    block = fused_s1.blocks2[3]
    original = block.forward
    with torch.inference_mode():
        expected = fused_s1(x)
        fused_s1(x)
        block.forward = lambda t: original(t) * 0  # a patched forward (not a hook): the chain must not skip it
        patched = fused_s1(x)
        via_modules = module_path(fused_s1, x)
        del block.forward
        restored = fused_s1(x)
    assert torch.equal(patched, via_modules) and not torch.equal(patched, expected)
    assert torch.equal(restored, expected)


def test_no_replay_under_autograd_observers_or_forced_backends(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused_s1(x)
        with dispatch.record() as calls:
            fused_s1(x)  # observed: the modules run, so the observer sees every kernel
        assert len(calls) > 40
        with shvit_kernels.use_backend("reference"):
            with dispatch.record() as forced:
                fused_s1(x)
        assert {c.backend for c in forced} == {"reference"}
    out = fused_s1(x)  # grad enabled: the autograd path
    assert not replayable(x)  # under autograd
    assert out.shape == (1, 1000)


def test_a_function_with_a_torch_op_between_its_kernels_is_not_replayed():
    w = torch.randn(8, 8, 1, 1)
    b = torch.randn(8)

    def fn(t):
        t = shvit_kernels.conv_bias_act(t, w, b)
        return shvit_kernels.conv_bias_act(t * 2, w, b)  # the multiply is not a kernel

    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        chain, out = KernelChain.capture(fn, x, [w, b])
        assert chain is None and torch.equal(out, fn(x))


def test_a_chain_reads_earlier_outputs_and_the_input_by_position():
    w1, w2 = torch.randn(8, 8, 1, 1), torch.randn(8, 8, 1, 1)
    b = torch.randn(8)

    def fn(t):  # the last call's residual is the input, not the previous output
        h = shvit_kernels.conv_bias_act(t, w1, b, relu=True)
        return shvit_kernels.conv_bias_act(h, w2, b, residual=t)

    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        chain, out = KernelChain.capture(fn, x, [w1, w2, b])
        assert chain is not None and len(chain) == 2 and torch.equal(out, fn(x))
        y = torch.randn(2, 8, 5, 5)
        assert torch.equal(chain(y), fn(y))


def test_a_model_that_replayed_pickles_and_deep_copies(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = fused_s1(x)
        fused_s1(x)
    buffer = io.BytesIO()
    torch.save(fused_s1, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(fused_s1)
    pickle.dumps(fused_s1)
    assert "_kernel_chains" not in loaded.__dict__ and "_kernel_chains" not in clone.__dict__
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected) and torch.equal(clone(x), expected)


def test_moving_the_model_drops_its_chains(fused_s1):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused_s1(x)
    assert chains(fused_s1)
    fused_s1.to(torch.bfloat16)
    assert not chains(fused_s1)
    with torch.inference_mode():
        assert fused_s1(x.bfloat16()).dtype == torch.bfloat16


def test_a_freshly_initialised_model_replays_too():
    # Its zero-initialised residual branches copy their inputs, so two values of the recording are equal; the
    # first is released once used and the recording still finds each argument's one source.
    torch.manual_seed(0)
    fresh = shvit.fuse(shvit.create_model("shvit_s1").eval())
    x, y = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fresh(x), module_path(fresh, x))
        assert torch.equal(fresh(y), module_path(fresh, y))
    assert [c is not None for c in chains(fresh)] == [True]


def test_a_chain_whose_values_cannot_be_told_apart_is_declined():
    w, w2, b = torch.randn(8, 8, 1, 1), torch.randn(8, 8, 1, 1), torch.randn(8)

    def fn(t):  # h1 and h2 are equal, and both are read later: which one the last call reads cannot be told
        h1 = shvit_kernels.conv_bias_act(t, w, b)
        h2 = shvit_kernels.conv_bias_act(t, w, b)
        return shvit_kernels.conv_bias_act(h2, w2, b, residual=h1)

    x = torch.randn(1, 8, 4, 4)
    with torch.inference_mode():
        chain, out = KernelChain.capture(fn, x, [w, w2, b])
        assert chain is None and torch.equal(out, fn(x))
