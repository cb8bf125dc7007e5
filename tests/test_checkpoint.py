"""Checkpoints: the accepted formats, readable errors, saving, pretrained= from a path or a URL."""

from __future__ import annotations

import os

import pytest
import torch

import shvit
from shvit import checkpoint as ckpt
from shvit.checkpoint import CheckpointError

from helpers import authors_to_timm_names


@pytest.fixture(scope="module")
def source_model():
    """An S1 with every tensor random, so a load that skips anything shows up."""
    torch.manual_seed(1)
    model = shvit.create_model("shvit_s1", num_classes=10)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


def fresh(num_classes=10, name="shvit_s1", **kwargs):
    return shvit.create_model(name, num_classes=num_classes, **kwargs)


def assert_same_weights(a, b, skip_head=False):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not (skip_head and k.startswith("head")) and not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


to_timm = authors_to_timm_names


# --------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["shvit", "authors"])
def test_save_and_load_round_trip(source_model, tmp_path, layout):
    path = tmp_path / "model.pth"
    shvit.save_checkpoint(source_model, path, layout=layout)
    saved = torch.load(path, weights_only=True)
    assert saved["variant"] == "shvit_s1" and saved["num_classes"] == 10
    assert ("model" in saved) == (layout == "authors")
    model = fresh()
    result = shvit.load_checkpoint(model, path)
    assert result == ckpt.LoadResult([], [], [])
    assert_same_weights(model, source_model)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},  # the authors' release format
        lambda sd: sd,  # bare state_dict
        lambda sd: {"module." + k: v for k, v in sd.items()},  # saved from DistributedDataParallel
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: to_timm(sd),
        lambda sd: {"model": to_timm(sd)},
    ],
    ids=["authors", "bare", "ddp", "state_dict_entry", "timm", "timm_in_model"],
)
def test_accepted_formats(source_model, wrap):
    state = source_model.state_dict()
    model = fresh()
    shvit.load_checkpoint(model, wrap(state))
    assert_same_weights(model, source_model)


def test_timm_layout_renames_every_container(source_model):
    timm_state = to_timm(source_model.state_dict())
    assert "stages.1.downsample.4.m.pw1.c.weight" in timm_state and "stages.1.downsample.2.se.fc1.weight" in timm_state and "stages.2.blocks.4.mixer.m.qkv.c.weight" in timm_state
    assert shvit.timm_to_authors(timm_state).keys() == source_model.state_dict().keys()


def test_fp16_checkpoint_loads_into_fp32_model(source_model):
    half = {k: v.half() if v.is_floating_point() else v for k, v in source_model.state_dict().items()}
    model = fresh()
    shvit.load_checkpoint(model, {"model": half})
    assert model.head.l.weight.dtype == torch.float32
    assert torch.equal(model.head.l.weight, half["head.l.weight"].float())


def test_missing_step_counters_are_accepted(source_model):
    state = {k: v for k, v in source_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = fresh()
    assert shvit.load_checkpoint(model, state).missing_keys == []


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_variant_is_refused(source_model, tmp_path):
    path = tmp_path / "s1.pth"
    shvit.save_checkpoint(source_model, path)
    with pytest.raises(CheckpointError, match=r"checkpoint is for shvit_s1 but the model is shvit_s2"):
        shvit.load_checkpoint(fresh(name="shvit_s2"), path)


def test_bare_state_dict_of_another_variant_names_it(source_model):
    with pytest.raises(CheckpointError) as info:
        shvit.load_checkpoint(fresh(name="shvit_s3"), source_model.state_dict())
    message = str(info.value)
    assert "looks like a shvit_s1 checkpoint" in message
    assert "shape mismatches" in message and "more" in message  # a readable, truncated list
    assert len(message.splitlines()) < 50


def test_missing_and_unexpected_keys_are_listed(source_model):
    state = dict(source_model.state_dict())
    del state["blocks2.3.mixer.m.qkv.c.weight"]
    state["blocks9.0.foo"] = torch.zeros(1)
    model = fresh()
    with pytest.raises(CheckpointError) as info:
        shvit.load_checkpoint(model, state)
    message = str(info.value)
    assert "missing keys (1):\n    blocks2.3.mixer.m.qkv.c.weight" in message
    assert "unexpected keys (1):\n    blocks9.0.foo" in message


def test_shape_mismatch_is_listed_with_both_shapes(source_model):
    state = dict(source_model.state_dict())
    state["blocks1.0.ffn.m.pw1.c.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(CheckpointError, match=r"blocks1\.0\.ffn\.m\.pw1\.c\.weight: checkpoint \[3, 3, 1, 1\] vs model \[256, 128, 1, 1\]"):
        shvit.load_checkpoint(fresh(), state)


def test_non_state_dict_and_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a state_dict(.|\n)*epoch"):
        shvit.load_checkpoint(fresh(), {"epoch": 3, "head.l.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        shvit.load_checkpoint(fresh(), tmp_path / "nope.pth")


def test_fused_models_are_not_checkpoint_targets(source_model, tmp_path):
    fused = source_model.fuse()
    with pytest.raises(CheckpointError, match="fused model"):
        shvit.load_checkpoint(fused, source_model.state_dict())
    with pytest.raises(ValueError, match="unfused"):
        shvit.save_checkpoint(fused, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="layout"):
        shvit.save_checkpoint(source_model, tmp_path / "x.pth", layout="timm")


# --------------------------------------------------------------------------------------------------------
# Another number of classes (fine-tuning)
# --------------------------------------------------------------------------------------------------------
def test_other_head_size_needs_drop_head(source_model):
    model = fresh(num_classes=3)
    with pytest.raises(CheckpointError, match="head.l.weight: checkpoint \\[10, 320\\] vs model \\[3, 320\\](.|\n)*drop_head=True"):
        shvit.load_checkpoint(model, source_model.state_dict())
    head_before = model.head.l.weight.clone()
    shvit.load_checkpoint(model, source_model.state_dict(), drop_head=True)
    assert_same_weights(model, source_model, skip_head=True)
    assert torch.equal(model.head.l.weight, head_before)


def test_non_strict_loads_what_fits_and_warns(source_model):
    model = fresh(num_classes=3)
    with pytest.warns(UserWarning, match="shape mismatches"):
        result = shvit.load_checkpoint(model, source_model.state_dict(), strict=False)
    assert [k for k, _, _ in result.mismatched_keys] == ["head.l.weight", "head.l.bias"]
    assert_same_weights(model, source_model, skip_head=True)


# --------------------------------------------------------------------------------------------------------
# pretrained=
# --------------------------------------------------------------------------------------------------------
def test_pretrained_from_a_local_path(source_model, tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"model": source_model.state_dict()}, path)
    model = shvit.create_model("shvit_s1", pretrained=str(path), num_classes=10)
    assert_same_weights(model, source_model)


def test_pretrained_from_a_url_is_downloaded_and_cached(source_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = tmp_path / "shvit_s1_test.pth"
    shvit.save_checkpoint(source_model, path, layout="authors")
    model = shvit.create_model("shvit_s1", pretrained=path.resolve().as_uri(), num_classes=10)
    assert_same_weights(model, source_model)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "shvit_s1_test.pth").is_file()


def test_pretrained_with_other_num_classes_keeps_a_fresh_head(source_model, tmp_path):
    path = tmp_path / "ten.pth"
    shvit.save_checkpoint(source_model, path)
    model = shvit.create_model("shvit_s1", pretrained=str(path), num_classes=4)
    assert model.head.l.out_features == 4 and torch.all(model.head.l.bias == 0)
    assert_same_weights(model, source_model, skip_head=True)


def test_pretrained_true_uses_the_release_url(source_model, monkeypatch):
    requested = []

    def fake_download(url, **kwargs):  # the network is not reachable in tests
        requested.append(url)
        return {"model": source_model.state_dict()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = shvit.shvit_s1(pretrained=True, num_classes=10)
    assert requested == ["https://github.com/ysj9909/SHViT/releases/download/v1.0/shvit_s1.pth"]
    assert_same_weights(model, source_model)
    for i in range(1, 5):
        assert shvit.PRETRAINED_CFGS[f"shvit_s{i}"]["url"].endswith(f"/v1.0/shvit_s{i}.pth")


def test_pretrained_of_another_variant_is_refused(source_model, tmp_path):
    path = tmp_path / "s1.pth"
    torch.save({"model": source_model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="looks like a shvit_s1 checkpoint"):
        shvit.create_model("shvit_s2", pretrained=os.fspath(path))
