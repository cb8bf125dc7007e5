"""shvit.accelerate: timm's SHViT and the authors' module tree onto the kernels; shvit.fuse refuses what it cannot fuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import shvit
from tests.authors_tree import AuthorsSHViT
from helpers import max_rel_err, randomize_norms, require_timm, spec_file

SIZE = 64
TRAIN_SIZE = 224  # batch statistics of a few values per channel (64 px: one per image) amplify rounding
TOLERANCE = 1e-5


def _timm():
    return require_timm("timm.models.shvit")


def timm_model(name="shvit_s1", **kwargs):
    timm = _timm()
    return randomize_norms(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))


def _bn_state(model: nn.Module) -> list:
    return [t.clone() for k, t in model.state_dict().items() if "running" in k or "num_batches" in k]


@pytest.mark.parametrize("name", ["shvit_s1", "shvit_s4"])
def test_timm_model_eval_outputs_match(name):
    source = timm_model(name).eval()
    fast = shvit.accelerate(source)
    assert isinstance(fast, shvit.SHViT) and fast.variant == name and not fast.training
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_err(fast(x), source(x)) <= TOLERANCE
        assert max_rel_err(fast.fuse()(x), source(x)) <= TOLERANCE


def test_timm_model_train_mode_outputs_running_stats_and_gradients_match():
    source = timm_model().train()
    fast = shvit.accelerate(source)
    assert fast.training and all(m.training for m in fast.modules())
    x = torch.randn(4, 3, TRAIN_SIZE, TRAIN_SIZE)
    ref_model, fast_copy = copy.deepcopy(source), fast
    ref_out, out = ref_model(x), fast_copy(x)
    assert max_rel_err(out, ref_out) <= TOLERANCE
    for ours, theirs in zip(_bn_state(fast_copy), _bn_state(ref_model)):
        assert torch.allclose(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)
    # Gradients through a dozen training BatchNorms amplify fp32 rounding; compare them in fp64.
    source64 = copy.deepcopy(source).double()
    fast64, x64 = shvit.accelerate(source64), x.double()
    source64(x64).square().mean().backward()
    fast64(x64).square().mean().backward()
    theirs = {next(iter(shvit.timm_to_authors({k: None}))): p.grad for k, p in source64.named_parameters()}
    for k, p in fast64.named_parameters():
        # Some are zero in exact arithmetic (a bias followed by a training BatchNorm): absolute floor.
        torch.testing.assert_close(p.grad, theirs[k], rtol=1e-8, atol=1e-12, msg=k)


def test_training_state_is_kept():
    source = timm_model().train()
    for p in source.patch_embed.parameters():
        p.requires_grad_(False)
    for m in source.modules():  # frozen BatchNorms, as in fine-tuning
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.momentum = 0.05
    source.stages[1].blocks[0].mixer.m.pre_norm.eps = 1e-6
    with torch.no_grad():
        source(torch.randn(2, 3, SIZE, SIZE))  # BN counters move only where BNs train (head)
    fast = shvit.accelerate(source)
    assert fast.training and fast.head.bn.training
    assert not fast.blocks2[3].mixer.m.training and not fast.blocks1[0].conv.m.training  # follow their BNs
    assert all(not p.requires_grad for p in fast.patch_embed.parameters())
    assert all(p.requires_grad for p in fast.blocks1.parameters())
    assert fast.blocks2[3].mixer.m.qkv.bn.momentum == 0.05 and fast.blocks2[3].mixer.m.pre_norm.eps == 1e-6
    assert fast.head.bn.num_batches_tracked.item() == 1
    # Frozen BNs use running stats, the head's BN batch stats (of 4 values per feature: compare in fp64).
    fast64, ref = shvit.accelerate(copy.deepcopy(source).double()), copy.deepcopy(source).double()
    fast, x = fast64, torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    assert max_rel_err(fast(x), ref(x)) <= 1e-10
    for ours, theirs in zip(_bn_state(fast), _bn_state(ref)):
        assert torch.equal(ours, theirs) or torch.allclose(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)


def test_device_dtype_and_source_untouched():
    source = timm_model().eval().double()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    fast = shvit.accelerate(source)
    assert next(fast.parameters()).dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_err(fast(x), source(x)) <= 1e-12


def test_authors_module_tree_matches_in_eval_and_train():
    torch.manual_seed(1)
    source = randomize_norms(AuthorsSHViT(num_classes=10, distillation=True))
    fast = shvit.accelerate(source.eval())
    assert fast.distillation and fast.variant == "shvit_s1"
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_err(fast(x), source(x)) <= TOLERANCE
    source.train()
    fast = shvit.accelerate(source)
    ref = copy.deepcopy(source)
    x = torch.randn(4, 3, TRAIN_SIZE, TRAIN_SIZE)
    (a, a_dist), (b, b_dist) = fast(x), ref(x)
    assert max_rel_err(a, b) <= TOLERANCE and max_rel_err(a_dist, b_dist) <= TOLERANCE


def test_own_model_is_copied():
    model = shvit.create_model("shvit_s1", num_classes=10)
    fast = shvit.accelerate(model)
    assert fast is not model and isinstance(fast, shvit.SHViT)


def test_unsupported_models_raise_clear_errors():
    with pytest.raises(shvit.AccelerateError, match="expects an SHViT"):
        shvit.accelerate(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(shvit.AccelerateError, match="wraps one in .module"):
        wrapper = nn.Module()
        wrapper.module = AuthorsSHViT()
        shvit.accelerate(wrapper)
    authors = AuthorsSHViT()
    authors.blocks2[3].mixer.m.proj[0] = nn.GELU()
    with pytest.raises(shvit.AccelerateError, match="GELU"):
        shvit.accelerate(authors)
    authors = AuthorsSHViT()
    authors.blocks1[0].conv.drop = 0.1
    with pytest.raises(shvit.AccelerateError, match="stochastic depth"):
        shvit.accelerate(authors)


def test_unsupported_timm_settings_raise():
    with pytest.raises(shvit.AccelerateError, match="drop_rate"):
        shvit.accelerate(timm_model(drop_rate=0.2))
    with pytest.raises(shvit.AccelerateError, match="GELU"):
        shvit.accelerate(timm_model(act_layer=nn.GELU))
    with pytest.raises(shvit.AccelerateError, match="unfused"):
        shvit.accelerate(timm_model().eval().fuse())
    with pytest.raises(shvit.AccelerateError, match="AdaptiveMaxPool2d"):
        shvit.accelerate(timm_model(global_pool="max"))


def test_fuse_raises_on_what_it_cannot_fuse():
    with pytest.raises(TypeError, match=r"shvit.accelerate\(model\) first"):
        shvit.fuse(AuthorsSHViT())
    with pytest.raises(TypeError, match="no shvit modules"):
        shvit.fuse(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(TypeError, match="already fused"):
        shvit.fuse(shvit.create_model("shvit_s1").fuse())


def test_authors_tree_matches_the_reference_logits_and_so_does_its_acceleration():

    data = torch.load(spec_file("shvit_s1_reference.pt"), map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()}
    authors = AuthorsSHViT(num_classes=state["head.l.weight"].shape[0])
    authors.load_state_dict(state)
    x, x_train = data["input"].float(), data["input_train"].float()
    with torch.no_grad():
        expected = data["logits_eval"].float()
        assert max_rel_err(authors.eval()(x), expected) <= TOLERANCE  # the test's tree is the authors' model
        assert max_rel_err(shvit.accelerate(authors)(x), expected) <= TOLERANCE
        expected_train = data["logits_train"].float()
        fast = shvit.accelerate(authors.train())
        assert fast.training
        assert max_rel_err(fast(x_train), expected_train) <= TOLERANCE
