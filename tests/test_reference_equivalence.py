"""Equivalence with the authors' implementation: stored logits of their S1 and their state_dict layout.

The data files live beside the spec (``SHVIT_SPEC_DIR``, else ``shared/spec`` in the checkout, else
``../shared/spec`` beside the checkout, where CI and developers have it). They are required: a missing file fails these tests rather than skipping them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shvit

from helpers import spec_file

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max |logit error| / max |logit|, fp32


@pytest.fixture(scope="module")
def reference():
    data = torch.load(spec_file("shvit_s1_reference.pt"), map_location="cpu", weights_only=True)

    def upcast(t):  # stored as fp16; compare in fp32
        return t.float() if torch.is_tensor(t) and t.is_floating_point() else t

    tensors = {k: upcast(v) for k, v in data.items() if k != "state_dict"}
    return {**tensors, "state_dict": {k: upcast(v) for k, v in data["state_dict"].items()}}


@pytest.fixture(scope="module")
def official_keys():
    with open(spec_file("official_keys.json")) as f:
        return json.load(f)


def load_reference_model(reference) -> shvit.SHViT:
    model = shvit.create_model("shvit_s1")
    shvit.load_checkpoint(model, {"model": reference["state_dict"]})  # the authors' release format
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape and torch.isfinite(got).all()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_eval_logits_match_the_authors(reference):
    model = load_reference_model(reference).eval()
    with torch.no_grad():
        logits = model(reference["input"])
    assert relative_error(logits, reference["logits_eval"]) < TOLERANCE


def test_fused_logits_match_the_authors_fused_model(reference):
    fused = shvit.fuse(load_reference_model(reference))
    with torch.no_grad():
        logits = fused(reference["input"])
    assert relative_error(logits, reference["logits_fused"]) < TOLERANCE


def test_train_mode_logits_match_the_authors(reference):
    model = load_reference_model(reference).train()
    with torch.no_grad():
        logits = model(reference["input_train"])
    assert relative_error(logits, reference["logits_train"]) < TOLERANCE
    assert model.head.bn.num_batches_tracked.item() == 1


def test_reference_checks_can_fail(reference):
    """The stored logits are sensitive to the weights: one perturbed BN breaks the match."""
    model = load_reference_model(reference).eval()
    with torch.no_grad():
        model.blocks2[3].mixer.m.qkv.bn.running_mean[0] += 1.0
        logits = model(reference["input"])
    assert relative_error(logits, reference["logits_eval"]) > TOLERANCE


@pytest.mark.parametrize(
    "entry",
    [f"shvit_s{i}{suffix}" for i in range(1, 5) for suffix in ("", "_distill")],
)
def test_state_dict_keys_and_shapes_match_the_authors(official_keys, entry):
    name, distillation = entry.removesuffix("_distill"), entry.endswith("_distill")
    state = shvit.create_model(name, distillation=distillation).state_dict()
    expected = official_keys[entry]
    assert sorted(state) == sorted(expected), (
        f"missing: {sorted(set(expected) - set(state))[:10]}, extra: {sorted(set(state) - set(expected))[:10]}"
    )
    wrong = {k: (list(v.shape), expected[k]) for k, v in state.items() if list(v.shape) != expected[k]}
    assert not wrong
