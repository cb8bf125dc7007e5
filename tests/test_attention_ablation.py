"""benchmarks/attention_ablation.py: its multi-head mixer is right, 'equal FLOPs' holds, and the script runs."""

import json

import torch

import shvit
from benchmarks.attention_ablation import MultiHeadMixer, build, gflops_per_image, main
from helpers import max_rel_err, randomize_norms


def test_one_head_multi_head_mixer_is_shsa():
    block = randomize_norms(shvit.Residual(shvit.SHSA(64, 16, 24))).eval()
    mixer = MultiHeadMixer(64, 24, heads=1, qk_per_head=16, v_per_head=24).eval()
    mixer.load_state_dict(block.m.state_dict())
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        assert max_rel_err(mixer(x), block(x)) <= 1e-5


def test_equal_flops_variant_has_shsa_flops_and_more_heads():
    shsa, equal, full = (build("shvit_s1", v, 4, 4, "infer") for v in ("shsa", "mhsa-equal", "mhsa-all"))
    mixers = [m for m in equal.modules() if isinstance(m, MultiHeadMixer)]
    assert len(mixers) == 9 and all(m.heads == 4 for m in mixers)  # every attention block of S1
    assert abs(gflops_per_image(equal, 64) - gflops_per_image(shsa, 64)) <= 1e-9
    assert gflops_per_image(full, 64) > gflops_per_image(shsa, 64)


def test_ablation_script_smoke(tmp_path):
    out = tmp_path / "att.json"
    assert main(["--sizes", "64", "--batch", "2", "--warmup", "0", "--window", "0.01", "--rounds", "2", "--variants", "shsa,mhsa-equal",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["shsa", "mhsa-equal"] and all(r["img_per_s"] > 0 for r in rows)
    assert all(r["peak_bytes"] is not None and r["rounds"] == 2 for r in rows)
