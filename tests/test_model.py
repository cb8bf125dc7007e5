"""The SHViT model package: module tree, initialisation, API, input checks, op usage, BN training, fusion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shvit
import shvit_kernels
from shvit.fuse import FusedConv2d, FusedFFN, FusedLinear, FusedSHSA, FusedSqueezeExcite, fuse_bn_linear
from shvit.model import BN_Linear, Conv2d_BN, FFN, PatchMerging, Residual, SHSA, SqueezeExcite

from helpers import max_rel_err, randomize_norms

VARIANTS = ["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"]
PARAMS = {"shvit_s1": 6_330_808, "shvit_s2": 11_483_072, "shvit_s3": 14_245_273, "shvit_s4": 16_588_484}


# --------------------------------------------------------------------------------------------------------
# Structure and initialisation
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_is_exact(name):
    model = shvit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_module_tree_has_the_authors_names():
    model = shvit.create_model("shvit_s1", distillation=True)
    stem = model.patch_embed
    assert [type(m) for m in stem] == [Conv2d_BN, nn.ReLU] * 3 + [Conv2d_BN]
    assert [stem[i].c.out_channels for i in (0, 2, 4, 6)] == [16, 32, 64, 128]
    assert all(stem[i].c.stride == (2, 2) for i in (0, 2, 4, 6))

    conv_bn = model.blocks1[0].conv.m
    assert isinstance(model.blocks1[0].conv, Residual) and isinstance(conv_bn, Conv2d_BN)
    assert dict(conv_bn.named_children()).keys() == {"c", "bn"}
    assert isinstance(conv_bn.bn, nn.BatchNorm2d) and conv_bn.c.bias is None
    assert isinstance(model.blocks1[0].mixer, nn.Identity)  # stage 1 is type "i"

    attn = model.blocks2[3].mixer.m
    assert isinstance(attn, SHSA)
    assert isinstance(attn.pre_norm, nn.GroupNorm) and attn.pre_norm.num_groups == 1
    assert attn.qkv.c.in_channels == 48 and attn.qkv.c.out_channels == 2 * 16 + 48
    assert isinstance(attn.proj, nn.Sequential) and isinstance(attn.proj[0], nn.ReLU)
    assert isinstance(attn.proj[1], Conv2d_BN)

    merge = model.blocks2[1]
    assert isinstance(merge, PatchMerging)
    assert merge.conv2.c.groups == 512 and merge.conv2.c.stride == (2, 2)
    assert merge.se.fc1.weight.shape == (128, 512, 1, 1) and merge.se.fc2.weight.shape == (512, 128, 1, 1)
    for downsample in (model.blocks2[0], model.blocks2[2]):
        assert isinstance(downsample[0].m, Conv2d_BN) and isinstance(downsample[1].m, FFN)

    assert len(model.blocks1) == 2 and len(model.blocks2) == 3 + 4 and len(model.blocks3) == 3 + 5
    assert isinstance(model.head, BN_Linear) and isinstance(model.head_dist, BN_Linear)


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = shvit.create_model("shvit_s1")
    block = model.blocks2[3]
    for zero_init in (block.conv.m, block.mixer.m.proj[1], block.ffn.m.pw2):
        assert torch.all(zero_init.bn.weight == 0) and torch.all(zero_init.bn.bias == 0)
    for one_init in (model.blocks2[0][0].m, model.blocks2[2][0].m, block.ffn.m.pw1, block.mixer.m.qkv, model.patch_embed[0]):
        assert torch.all(one_init.bn.weight == 1) and torch.all(one_init.bn.bias == 0)
    assert torch.all(block.mixer.m.pre_norm.weight == 1) and torch.all(block.mixer.m.pre_norm.bias == 0)
    head = model.head.l.weight
    assert torch.all(model.head.l.bias == 0)
    assert abs(head.std().item() - 0.02) < 1e-3 and head.abs().max() <= 2.0
    # The conv keeps PyTorch's default (kaiming-uniform, a=sqrt(5)): bound 1/sqrt(fan_in).
    fan_in = 3 * 3 * 3
    assert model.patch_embed[0].c.weight.abs().max() <= fan_in ** -0.5


# --------------------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------------------
def test_list_models_and_constructors():
    assert shvit.list_models() == VARIANTS
    assert shvit.list_models("*s4") == ["shvit_s4"]
    for name in VARIANTS:
        model = getattr(shvit, name)(num_classes=7)
        assert model.variant == name and model.num_classes == 7 and model.head.l.out_features == 7


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown SHViT model 'shvit_s5'.*shvit_s1, shvit_s2, shvit_s3, shvit_s4"):
        shvit.create_model("shvit_s5")


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 96, 160)])
def test_forward_shapes_and_intermediates(shape):
    model = shvit.create_model("shvit_s1", num_classes=10).eval()
    x = torch.randn(shape)
    b, _, h, w = shape
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        final, stages = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert logits.shape == (b, 10)
    up = lambda n, s: -(-n // s)  # noqa: E731  (stride-2, pad-1 convs round up)
    expected = [(b, c, up(h, s), up(w, s)) for c, s in ((128, 16), (224, 32), (320, 64))]
    assert [tuple(t.shape) for t in stages] == expected
    assert [info["reduction"] for info in model.feature_info] == [16, 32, 64]
    assert torch.equal(final, features) and torch.equal(stages[-1], features) and torch.equal(only[0], features)
    pooled = model.forward_head(features, pre_logits=True)
    assert torch.allclose(pooled, features.mean((2, 3)))
    assert torch.allclose(model.forward_head(features), logits)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 4, 64, 64), "expects 3 input channels"),
        ((1, 1, 64, 64), "expects 3 input channels"),
        ((3, 64, 64), "4-D input"),
        ((1, 1, 3, 64, 64), "4-D input"),
        ((1, 3, 48, 48), "at least 64"),
        ((1, 3, 64, 32), "at least 64"),
        ((1, 3, 72, 72), "multiples of 16"),
        ((1, 3, 64, 100), "spatial size 64x100"),
        ((0, 3, 64, 64), "at least one image"),
    ],
)
def test_bad_input_raises_a_clear_error(shape, message):
    model = shvit.create_model("shvit_s1").eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape))
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(torch.randn(shape))


def test_in_chans_is_honoured():
    model = shvit.create_model("shvit_s1", in_chans=1).eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))


def test_distillation_head_pair_in_training_average_in_eval():
    model = randomize_norms(shvit.create_model("shvit_s1", num_classes=5, distillation=True))
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (2, 5)
    model.eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = (model.head(pooled) + model.head_dist(pooled)) / 2
        assert torch.allclose(model(x), expected)
        assert torch.allclose(model.fuse()(x), expected, rtol=1e-5, atol=1e-5)


def test_reset_classifier():
    model = shvit.create_model("shvit_s1", distillation=True).eval()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.head.l.out_features == 3 and model.head_dist.l.out_features == 3
    assert torch.all(model.head.l.bias == 0)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_features(x).mean((2, 3)))


# --------------------------------------------------------------------------------------------------------
# Every compute step goes through the op library
# --------------------------------------------------------------------------------------------------------
OPS = ("conv_bn", "conv_bias_act", "ffn", "ffn_fused", "shsa", "shsa_fused", "squeeze_excite", "patch_embed",
       "pooled_linear")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the shvit_kernels functional ops (the model looks them up at call time)."""
    calls = {name: [] for name in OPS}
    for name in OPS:
        original = getattr(shvit_kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name].append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(shvit_kernels, name, spy)
    return calls


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_unfused_forward_runs_on_the_ops(op_calls):
    model = shvit.create_model("shvit_s1").eval()
    n_ffn, n_shsa = _count(model, FFN), _count(model, SHSA)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(op_calls["ffn"]) == n_ffn and len(op_calls["shsa"]) == n_shsa
    # Conv2d_BN outside FFNs and SHSA.qkv: stem 4, per BasicBlock dw + (proj), per PatchMerging 3, per downsample pair 1.
    n_conv = _count(model, Conv2d_BN) - 2 * n_ffn - n_shsa
    assert len(op_calls["conv_bn"]) == n_conv
    stem = op_calls["conv_bn"][:4]
    assert [c["relu"] for c in stem] == [True, True, True, False]
    with_residual = sum(c["residual"] is not None for c in op_calls["conv_bn"])
    n_dw_residual = sum(isinstance(m, Residual) and isinstance(m.m, Conv2d_BN) for m in model.modules())
    assert with_residual == n_dw_residual + n_shsa  # dw convs and the SHSA projections add the residual
    assert not op_calls["conv_bias_act"] and not op_calls["ffn_fused"] and not op_calls["shsa_fused"]


def test_fused_forward_runs_on_the_fused_ops(op_calls):
    model = shvit.create_model("shvit_s1")
    fused = model.fuse()
    with torch.no_grad():
        fused(torch.randn(1, 3, 64, 64))
    assert len(op_calls["ffn_fused"]) == _count(model, FFN)
    assert len(op_calls["shsa_fused"]) == _count(model, SHSA)
    assert len(op_calls["squeeze_excite"]) == _count(model, SqueezeExcite)
    assert len(op_calls["patch_embed"]) == 1  # the stem's four convs
    assert len(op_calls["pooled_linear"]) == _count(model, BN_Linear) == 1  # the pooling and the head
    expected_convs = _count(model, Conv2d_BN) - 4 - 2 * _count(model, FFN) - _count(model, SHSA)
    assert len(op_calls["conv_bias_act"]) == expected_convs
    assert not op_calls["conv_bn"] and not op_calls["ffn"] and not op_calls["shsa"]
    # With a hook on the head, the head module is called on the pooled map (one more 1x1 conv_bias_act call).
    seen = []
    fused.head.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        fused(torch.randn(1, 3, 64, 64))
    assert seen == [1] and len(op_calls["pooled_linear"]) == 1
    assert len(op_calls["conv_bias_act"]) == 2 * expected_convs + 1


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_squeeze_excite_matches_the_module(dtype):
    """The fused gate (its 1x1 convs on conv_bias_act) computes the unfused module's function, keeps its parameter
    names and shapes, and leaves the module it was built from untouched."""
    torch.manual_seed(0)
    se = SqueezeExcite(48).eval()
    with torch.no_grad():
        for p in se.parameters():
            p.normal_(0, 0.3)
    before = {k: v.clone() for k, v in se.state_dict().items()}
    fused = shvit.fuse(se)
    assert isinstance(fused, FusedSqueezeExcite) and isinstance(fused.fc1, FusedConv2d)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in se.state_dict().items()}
    x = torch.randn(3, 48, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = se.double()(x.double())
        got = fused.to(dtype)(x.to(dtype)).double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert all(torch.equal(v.float(), before[k].float()) for k, v in se.float().state_dict().items())


# --------------------------------------------------------------------------------------------------------
# Training-mode BatchNorm behaves like nn.BatchNorm2d
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_conv2d_bn_training_matches_nn_batchnorm(momentum):
    ours = Conv2d_BN(8, 8, 3, 1, 1)
    ours.bn.momentum = momentum
    randomize_norms(ours)
    conv, bn = copy.deepcopy(ours.c), copy.deepcopy(ours.bn)
    ours.train(), bn.train()
    for _ in range(3):
        x = torch.randn(2, 8, 6, 6)
        out = ours(x, relu=True)
        expected = torch.relu(bn(conv(x)))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert ours.bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(ours.bn.running_var, bn.running_var)
    ours.eval(), bn.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(ours(x, residual=x), x + bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert ours.bn.num_batches_tracked.item() == 3  # eval does not count


@pytest.mark.parametrize("momentum", [0.1, None])  # None takes the two-conv path (per-BN cumulative momentum)
def test_residual_ffn_training_matches_plain_torch(momentum):
    block = Residual(FFN(8, 16))
    for bn in (block.m.pw1.bn, block.m.pw2.bn):
        bn.momentum = momentum
    randomize_norms(block)
    conv1, bn1 = copy.deepcopy(block.m.pw1.c), copy.deepcopy(block.m.pw1.bn)
    conv2, bn2 = copy.deepcopy(block.m.pw2.c), copy.deepcopy(block.m.pw2.bn)
    block.train()
    for _ in range(2):
        x = torch.randn(3, 8, 5, 5)
        expected = x + bn2(conv2(torch.relu(bn1(conv1(x)))))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    for ours, ref in ((block.m.pw1.bn, bn1), (block.m.pw2.bn, bn2)):
        assert ours.num_batches_tracked.item() == 2
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)


def _shsa_reference(m: SHSA, x: torch.Tensor, qkv_bn: nn.BatchNorm2d, proj_bn: nn.BatchNorm2d) -> torch.Tensor:
    """The spec's SHSA in plain torch (q^T k attention on the first P channels), plus the residual."""
    b, c, h, w = x.shape
    xa = F.group_norm(x[:, : m.pdim], 1, m.pre_norm.weight, m.pre_norm.bias, m.pre_norm.eps)
    q, k, v = qkv_bn(m.qkv.c(xa)).flatten(2).split([m.qk_dim, m.qk_dim, m.pdim], dim=1)
    attn = (q.transpose(1, 2) @ k * m.qk_dim ** -0.5).softmax(dim=-1)
    ya = (v @ attn.transpose(1, 2)).reshape(b, m.pdim, h, w)
    return x + proj_bn(m.proj[1].c(torch.relu(torch.cat([ya, x[:, m.pdim :]], dim=1))))


@pytest.mark.parametrize("training", [True, False])
def test_residual_shsa_matches_plain_torch(training):
    block = randomize_norms(Residual(SHSA(24, 16, 10)))
    qkv_bn, proj_bn = copy.deepcopy(block.m.qkv.bn), copy.deepcopy(block.m.proj[1].bn)
    block.train(training), qkv_bn.train(training), proj_bn.train(training)
    x = torch.randn(2, 24, 4, 6)
    expected = _shsa_reference(block.m, x, qkv_bn, proj_bn)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.m.qkv.bn.running_var, qkv_bn.running_var)
    assert block.m.qkv.bn.num_batches_tracked.item() == qkv_bn.num_batches_tracked.item()


def test_training_step_gives_gradients_everywhere():
    model = shvit.create_model("shvit_s1", num_classes=4, distillation=True).train()
    logits, logits_dist = model(torch.randn(2, 3, 64, 64))
    (logits.square().mean() + logits_dist.square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert model.patch_embed[0].bn.num_batches_tracked.item() == 1


# --------------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, shape", [(name, (2, 3, 96, 160)) for name in VARIANTS] + [("shvit_s1", (1, 3, 64, 64))]
)
def test_fused_model_matches_the_unfused_eval_model(name, shape):
    model = randomize_norms(shvit.create_model(name)).eval()
    fused = shvit.fuse(model)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert max_rel_err(got, expected) < 1e-5


def test_fuse_leaves_the_original_untouched_and_folds_everything():
    model = randomize_norms(shvit.create_model("shvit_s1")).train()
    before = copy.deepcopy(model.state_dict())
    fused = model.fuse()
    assert model.training and not model.is_fused
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not fused.training and fused.is_fused
    leftovers = [n for n, m in fused.named_modules() if isinstance(m, (Conv2d_BN, BN_Linear, nn.BatchNorm2d, nn.GroupNorm))]
    assert not leftovers
    assert isinstance(fused.blocks1[0].conv, FusedConv2d) and fused.blocks1[0].conv.groups == 128  # residual folded
    assert isinstance(fused.blocks2[0][0], FusedConv2d)
    assert isinstance(fused.blocks1[0].ffn.m, FusedFFN) and isinstance(fused.blocks2[3].mixer.m, FusedSHSA)
    assert type(fused.head) is FusedLinear and isinstance(fused.head, nn.Linear)


def test_fused_1x1_weights_are_input_major_in_fp32_and_bf16_on_cpu_only():
    """The C++ GEMMs read an input-channel-major 1x1 weight in place; the layout follows the device."""
    fused = shvit.fuse(randomize_norms(shvit.create_model("shvit_s1")).eval())
    pw1 = fused.blocks1[0].ffn.m.pw1.weight
    assert not pw1.is_contiguous() and pw1.transpose(0, 1).is_contiguous()
    qkv = fused.blocks2[3].mixer.m.qkv.weight  # shsa_fused's GEMM reads W^T in place too
    assert not qkv.is_contiguous() and qkv.transpose(0, 1).is_contiguous()
    for module in fused.modules():
        if isinstance(module, FusedConv2d) and module.kernel_size != (1, 1):
            assert module.weight.is_contiguous()
    # Conversions keep the rule: fp32 and bf16 on the CPU input major (also after channels_last), otherwise plain.
    fused.to(memory_format=torch.channels_last)
    assert fused.blocks1[0].ffn.m.pw1.weight.transpose(0, 1).is_contiguous()
    bf16 = fused.bfloat16().blocks1[0].ffn.m.pw1.weight
    assert not bf16.is_contiguous() and bf16.transpose(0, 1).is_contiguous()
    assert fused.half().blocks1[0].ffn.m.pw1.weight.is_contiguous()
    assert not fused.float().blocks1[0].ffn.m.pw1.weight.is_contiguous()
    meta = copy.deepcopy(fused).to("meta")
    assert meta.blocks1[0].ffn.m.pw1.weight.is_contiguous()


def test_a_model_fused_or_converted_under_inference_mode_keeps_normal_weights():
    """Inference tensors have no version counter, so the CPU kernels cannot keep packed copies of them and would
    repack every weight on every call (S4's bf16 forward 1.25x slower); the fused modules keep normal tensors."""
    model = randomize_norms(shvit.create_model("shvit_s1")).eval()
    x = torch.randn(2, 3, 64, 64).bfloat16()
    with torch.inference_mode():
        fused = shvit.fuse(model).bfloat16().to(memory_format=torch.channels_last)
    assert not any(t.is_inference() for t in (*fused.parameters(), *fused.buffers()))
    assert fused.blocks1[0].ffn.m.pw1.weight.transpose(0, 1).is_contiguous()  # still input major
    expected = shvit.fuse(model).bfloat16().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected(x), rtol=0, atol=0)
    from shvit_kernels.backends import cpp

    if cpp.variant() is not None:  # the packed copies are kept between calls
        cpp.clear_packed_weights()
        with torch.inference_mode():
            fused(x)
            held = cpp.packed_weight_count()
            fused(x)
        assert held > 0 and cpp.packed_weight_count() == held


def test_depthwise_residual_folds_into_the_centre_tap():
    block = randomize_norms(Residual(Conv2d_BN(6, 6, 3, 1, 1, groups=6))).eval()
    fused = shvit.fuse(block)
    assert isinstance(fused, FusedConv2d)
    w, b = shvit_kernels.fold_bn(block.m.c.weight, block.m.bn.weight, block.m.bn.bias, block.m.bn.running_mean, block.m.bn.running_var, 1e-5)
    assert torch.allclose(fused.weight[:, 0, 1, 1] - w[:, 0, 1, 1], torch.ones(6))
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)


def test_bn_linear_fold_formula():
    head = randomize_norms(BN_Linear(12, 5)).eval()
    linear = fuse_bn_linear(head)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_runs_the_conv_kernel_and_matches_linear(dtype):
    """The fused head is one conv_bias_act call on (N, C, 1, 1) for 2-D inputs, F.linear's result to rounding;
    other ranks keep nn.Linear's semantics."""
    from shvit_kernels import dispatch

    head = fuse_bn_linear(randomize_norms(BN_Linear(40, 7)).eval()).to(dtype)
    x = torch.randn(5, 40, dtype=dtype)
    with torch.no_grad(), dispatch.record() as calls:
        out = head(x)
    assert [c.op for c in calls] == ["conv_bias_act"] and out.shape == (5, 7)
    expected = F.linear(x.double(), head.weight.double(), head.bias.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    x3 = torch.randn(2, 3, 40, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(head(x3), F.linear(x3, head.weight, head.bias))


# ---------------------------------------------------------------------------------------------------------------
# Input layout of a fused model (issue #14 point 3): any layout in, the kernels' layout inside, the input's out.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tuning_on(tmp_path, monkeypatch):
    from shvit_kernels import autotune

    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    autotune.clear()
    with autotune.autotune("inference"):
        yield autotune
    autotune.clear()


def _first_conv_layout(model, x):
    from shvit_kernels import dispatch

    with torch.inference_mode(), dispatch.record() as calls:
        model(x)
    first = calls[0].args[0]
    if calls[0].op == "patch_embed" and calls[0].args[9]:  # the stem takes the input as it is, returns channels_last
        return "channels_last"
    return "channels_last" if first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous() else "nchw"


def test_fused_model_takes_either_layout_and_answers_in_the_inputs():
    torch.manual_seed(0)
    fused = shvit.fuse(randomize_norms(shvit.create_model("shvit_s1", num_classes=10)).eval())
    x = torch.randn(2, 3, 128, 128)  # the last stage 2x2: the two layouts differ
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits, logits_cl = fused(x), fused(x_cl)
        feats, feats_cl = fused.forward_features(x), fused.forward_features(x_cl)
        _, stages = fused.forward_intermediates(x)
        _, stages_cl = fused.forward_intermediates(x_cl)
    assert max_rel_err(logits, logits_cl) < 1e-5
    assert feats.is_contiguous() and max_rel_err(feats, feats_cl) < 1e-5
    assert feats_cl.is_contiguous(memory_format=torch.channels_last) and not feats_cl.is_contiguous()
    assert all(s.is_contiguous() for s in stages)
    assert all(s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous() for s in stages_cl)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_cpu_stem_takes_an_nchw_input_unmoved(dtype):
    """A channels_last run of an NCHW batch: the stem reads the input as given and returns channels_last (no
    separate move of the whole batch), with the same bits as a channels_last input, in every forward."""
    from shvit_kernels import dispatch

    torch.manual_seed(0)
    fused = shvit.fuse(randomize_norms(shvit.create_model("shvit_s1", num_classes=10)).eval()).to(dtype)
    fused.input_layout = "channels_last"
    x = torch.randn(2, 3, 128, 128).to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with dispatch.record() as calls:
            logits = fused(x)
        stem = calls[0]
        assert stem.op == "patch_embed" and stem.args[0] is x and stem.args[9] is True
        assert calls[1].args[0].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(logits, fused(x_cl))
        assert torch.equal(fused(x), logits)  # replayed
        feats = fused.forward_features(x)
        assert feats.is_contiguous() and torch.equal(feats, fused.forward_features(x_cl))
        _, stages = fused.forward_intermediates(x)
        _, stages_cl = fused.forward_intermediates(x_cl)
    assert all(s.is_contiguous() and torch.equal(s, t) for s, t in zip(stages, stages_cl))


def test_patch_embed_rejects_a_non_bool_layout_flag():
    x = torch.randn(2, 3, 32, 32)
    stem, c = [], 3
    for c_out in (4, 6, 8, 10):
        stem += [torch.randn(c_out, c, 3, 3), torch.randn(c_out)]
        c = c_out
    with pytest.raises(TypeError, match="'out_channels_last' must be a bool, got str"):
        shvit_kernels.patch_embed(x, *stem, out_channels_last="yes")


def test_input_layout_settings():
    fused = shvit.fuse(shvit.create_model("shvit_s1", num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    fused.input_layout = "channels_last"
    assert _first_conv_layout(fused, x) == "channels_last"
    fused.input_layout = "as_given"
    assert _first_conv_layout(fused, x) == "nchw"
    fused.input_layout = "sideways"
    with pytest.raises(ValueError, match="input_layout must be"):
        with torch.inference_mode():
            fused(x)


def test_automatic_layout_is_measured_once_per_signature(tuning_on):
    fused = shvit.fuse(shvit.create_model("shvit_s1", num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    layouts = {k: v for k, v in tuning_on.cached_choices().items() if k.startswith("model_input_layout")}
    assert len(layouts) == 1 and set(layouts.values()) <= {"channels_last", "nchw"}
    from shvit_kernels import dispatch

    with torch.inference_mode(), dispatch.record() as calls:
        fused(x)
    convs = sum(c.op == "conv_bias_act" for c in calls)
    with torch.inference_mode(), dispatch.record() as calls_again:
        fused(x)
    assert len(calls) == len(calls_again) and convs < 40, "a tuned signature must not be timed again"


def test_layout_is_not_timed_under_a_forced_backend(tuning_on):
    """A choice timed under a forced backend would hold for automatic dispatch: forcing takes channels_last."""
    fused = shvit.fuse(shvit.create_model("shvit_s1", num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    for forcing in (shvit_kernels.use_backend("reference"), shvit_kernels.prefer_backend("reference")):
        with forcing:
            assert _first_conv_layout(fused, x) == "channels_last"
    assert not [k for k in tuning_on.cached_choices() if k.startswith("model_input_layout")]
    with torch.inference_mode():
        fused(x)  # automatic: now it is timed
    assert [k for k in tuning_on.cached_choices() if k.startswith("model_input_layout")]


def test_counting_flops_does_not_count_the_layout_tuning(tuning_on):
    """FlopCounterMode over the ops' reference code: the first call (which would tune the layout) counts the
    same as later ones (the tuning's timed runs would otherwise be counted, about 9x)."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = shvit.fuse(shvit.create_model("shvit_s1", num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for _ in range(2):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), shvit_kernels.inline_reference():
            fused(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("kind", ["fused", "unfused-eval", "unfused-train"])
def test_whole_model_compiles_without_graph_breaks(kind):
    """torch.compile(fullgraph=True) takes the whole model (a break would raise): the fused forward with its
    pooled head, and training through the Conv+BN ops' autograd."""
    torch._dynamo.reset()
    model = randomize_norms(shvit.create_model("shvit_s1", num_classes=10, depth=(1, 1, 1)))
    model = model.fuse() if kind == "fused" else model.train(kind == "unfused-train")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    if kind == "unfused-train":
        compiled(x).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        return
    with torch.no_grad():
        assert max_rel_err(compiled(x), model(x)) <= 1e-6
