"""create_model(..., features_only=True, out_indices=...): timm's backbone convention."""

from __future__ import annotations

import pytest
import torch

import shvit
from shvit.features import SHViTFeatures
from helpers import max_rel_err, randomize_norms, require_timm

SIZE = 128


def test_features_only_returns_the_stage_maps_with_feature_info():
    torch.manual_seed(3)
    full = randomize_norms(shvit.create_model("shvit_s1")).eval()
    torch.manual_seed(3)
    backbone = randomize_norms(shvit.create_model("shvit_s1", features_only=True)).eval()
    assert isinstance(backbone, SHViTFeatures)
    assert backbone.feature_info.channels() == [128, 224, 320]
    assert backbone.feature_info.reduction() == [16, 32, 64]
    assert backbone.feature_info.module_name() == ["blocks1", "blocks2", "blocks3"]
    assert not any(k.startswith("head") for k in backbone.state_dict())
    x = torch.randn(2, 3, SIZE, 2 * SIZE)
    with torch.no_grad():
        maps = backbone(x)
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 16), (2, 224, 4, 8), (2, 320, 2, 4)]
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("out_indices, stages, kept", [((1,), [1], 2), ((0, 2), [0, 2], 3), ((-1,), [2], 3), (2, [1, 2], 3), ((0,), [0], 1)])
def test_out_indices_select_and_prune(out_indices, stages, kept):
    backbone = shvit.create_model("shvit_s2", features_only=True, out_indices=out_indices).eval()
    assert list(backbone.out_indices) == stages
    assert backbone.feature_info.channels() == [(128, 308, 448)[i] for i in stages]
    assert [n for n, _ in backbone.named_children() if n.startswith("blocks")] == [f"blocks{i + 1}" for i in range(kept)]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, SIZE, SIZE))
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
    assert [SIZE // m.shape[-1] for m in maps] == backbone.feature_info.reduction()


def test_pretrained_backbone_and_fuse(tmp_path):
    full = randomize_norms(shvit.create_model("shvit_s1", num_classes=5)).eval()
    path = tmp_path / "ckpt.pth"
    shvit.save_checkpoint(full, path)
    backbone = shvit.create_model("shvit_s1", pretrained=str(path), features_only=True, out_indices=(1, 2)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        fused = backbone.fuse()
        assert fused.is_fused and not fused.training
        for got, ref, want in zip(fused(x), backbone(x), expected):
            assert torch.equal(ref, want)
            assert max_rel_err(got, want) <= 1e-5


def test_training_mode_backbone_gives_gradients():
    backbone = shvit.create_model("shvit_s1", features_only=True).train()
    sum(m.float().mean() for m in backbone(torch.randn(2, 3, SIZE, SIZE))).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_bad_feature_arguments_raise():
    with pytest.raises(ValueError, match="features_only=True"):
        shvit.create_model("shvit_s1", out_indices=(0,))
    with pytest.raises(ValueError, match="stage indices"):
        shvit.create_model("shvit_s1", features_only=True, out_indices=(3,))
    with pytest.raises(ValueError, match="repeat"):
        shvit.create_model("shvit_s1", features_only=True, out_indices=(2, -1))
    with pytest.raises(ValueError, match="last stages"):
        shvit.create_model("shvit_s1", features_only=True, out_indices=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        shvit.create_model("shvit_s1", features_only=True)(torch.randn(1, 3, 100, 100))


def test_feature_info_agrees_with_timm():
    timm = require_timm("timm.models.shvit")
    theirs = timm.create_model("shvit_s3", pretrained=False, features_only=True, out_indices=(0, 2))
    ours = shvit.create_model("shvit_s3", features_only=True, out_indices=(0, 2))
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
