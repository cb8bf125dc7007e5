"""The benchmark machinery (benchmarks/): counters, plain baselines, the paper suite on a tiny setting, rendering.

These check that the machinery works, not how fast anything is; they stay short for CI.
"""

import argparse
import json
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shvit
import shvit_kernels
from shvit_kernels import dispatch
from shvit_kernels.ops.conv_bn import conv_bias_act_reference
from shvit_kernels.ops.shsa import shsa_fused_reference

from benchmarks import paper_protocol, render, shapes
from benchmarks.plain import to_plain


def test_traffic_and_flops_of_a_known_conv():
    # 1x1 conv, 8 -> 4 channels, 2x3 pixels, batch 2, fp32, with residual: every tensor once.
    layer = shapes.Layer("conv_bias_act", 8, 4, 2, 3, k=1, residual=True)
    x, w, b, out = 2 * 8 * 6, 4 * 8, 4, 2 * 4 * 6
    assert shapes.traffic_bytes(layer, 2, torch.float32, "forward") == 4 * (x + w + b + out + out)
    assert shapes.traffic_bytes(layer, 2, torch.bfloat16, "forward") == 2 * (x + w + b + out + out)
    assert shapes.flops(layer, 2, "forward") == 2 * 2 * 6 * 4 * 8
    assert shapes.flops(layer, 2, "both") == 3 * shapes.flops(layer, 2, "forward")


@pytest.mark.parametrize("layer", [
    shapes.Layer("conv_bias_act", 16, 32, 14, 14, k=3, stride=2, relu=True),
    shapes.Layer("conv_bias_act", 24, 24, 7, 7, k=3, groups=24),
])
def test_conv_flops_match_torch_flop_counter(layer):
    fn, t = layer.case(2)(torch.float32, "cpu", False)
    with FlopCounterMode(display=False) as counter:
        conv_bias_act_reference(t["x"], t["weight"], t["bias"], layer.stride, layer.k // 2, layer.groups, layer.relu, None)
    assert counter.get_total_flops() == shapes.flops(layer, 2, "forward")


def test_shsa_flops_match_torch_flop_counter():
    layer = shapes.Layer("shsa_fused", 64, 64, 4, 4, p=24)
    _, t = layer.case(3)(torch.float32, "cpu", False)
    with FlopCounterMode(display=False) as counter:
        shsa_fused_reference(t["x"], t["qkv_weight"], t["qkv_bias"], shapes.QK, 1e-5)
    assert counter.get_total_flops() == shapes.flops(layer, 3, "forward")


def test_layers_follow_the_model():
    layers = dict(shapes.model_layers("shvit_s1"))
    ops = {layer.op for layer in layers}
    assert ops == set(shapes.FORWARD_OPS)
    stem = shapes.Layer("conv_bias_act", 3, 16, 224, 224, k=3, stride=2, relu=True)
    assert layers[stem] == 1
    assert sum(c for layer, c in layers.items() if layer.op == "shsa_fused") == 4 + 5  # S1 depths (s-blocks)


def test_plain_baseline_times_its_own_input_layout(tmp_path, monkeypatch):
    """The plain copy runs an NCHW input in either layout (its stem takes no kernel flag: the input is moved) and
    keeps its own measured layout: a choice timed on plain torch must not decide the fused model's, as it did when
    the eager peer ran first in a benchmark (the fused model then ran its NCHW path, 0.6x its speed)."""
    from shvit_kernels import autotune

    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    autotune.clear()
    fused = shvit.fuse(shvit.create_model("shvit_s1", num_classes=10).eval())
    plain = to_plain(fused)
    x = torch.randn(2, 3, 64, 64)
    try:
        with autotune.autotune("inference"), torch.inference_mode():
            for layout in ("auto", "channels_last"):
                plain.input_layout = layout
                torch.testing.assert_close(plain(x), fused(x), rtol=1e-4, atol=1e-4)
            keys = [k for k in autotune.cached_choices() if k.startswith("model_input_layout")]
    finally:
        autotune.clear()
    assert len(keys) == 2 and {k.split()[2] for k in keys} == {"FusedStem", "PlainFusedStem"}, keys


def test_plain_baseline_uses_no_custom_ops_and_matches():
    model = shvit.create_model("shvit_s1").eval()
    fused = shvit.fuse(model)
    plain = to_plain(fused)
    x = torch.randn(1, 3, 64, 64)
    seen = []

    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.namespace)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Spy():
            y = plain(x)
        ref = fused(x)
    assert "shvit" not in seen
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _suite_args(tmp_path, peers, dtype="fp32"):
    return argparse.Namespace(
        model="shvit_s1", batch_size=2, img_size=64, device="cpu", dtype=dtype, threads=1, nchw=False,
        warmup=0.0, window=0.01, rounds=1, output=str(tmp_path / "paper.json"), json=False, peers=peers,
    )


def test_paper_suite_bf16_reports_agreement_with_fp32(tmp_path, monkeypatch):
    """A bf16 run keeps ONNX Runtime in fp32 as its yardstick and reports top-1 agreement with the fp32 model."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(paper_protocol, "probe", lambda device, dtypes: {})
    monkeypatch.setattr(paper_protocol, "AGREEMENT_IMAGES", 5)  # three batches of 2
    assert paper_protocol.run_paper_suite(_suite_args(tmp_path, "eager,onnxruntime,fused", "bf16")) == 0
    data = json.loads((tmp_path / "paper.json").read_text())
    assert "ONNX Runtime CPU (fp32)" in [r["name"] for r in data["inference"]]
    agreement = data["low_precision_vs_fp32"]
    assert agreement["images"] == 6 and 0.0 <= agreement["top1_agreement"] <= 1.0
    # bf16 keeps 8 bits of mantissa: logits within a few percent of fp32, not identical.
    assert 0.0 < agreement["max_rel_logit_err"] < 0.1


def test_paper_suite_tiny_run_and_render(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_protocol, "probe", lambda device, dtypes: {
        "bandwidth_GBps": 10.0, "copy_bytes": 1, "matmul_TFLOPs": {"fp32": 0.1}, "threads": 1, "matmul_size": 1})
    assert paper_protocol.run_paper_suite(_suite_args(tmp_path, "eager,eager-cl,cuda-graph,fused,train")) == 0
    data = json.loads((tmp_path / "paper.json").read_text())
    names = [r["name"] for r in data["inference"]]
    assert names[0].startswith("eager") and "shvit_kernels fused (auto)" in names
    assert all(r["img_per_s"] > 0 for r in data["inference"] + data["training"])
    assert any(s["peer"] == "cuda-graph" for s in data["skipped"])  # no GPU on the CI machine: skipped with a reason
    assert data["training"] and "saved_for_backward_MiB" in data["training"][0]["extra"]
    assert data["environment"]["torch"] and data["probe"]["bandwidth_GBps"] == 10.0

    ops_json = tmp_path / "ops.json"
    layer = shapes.Layer("ffn_fused", 32, 32, 4, 4)
    extra = dict(model="shvit_s1", op="ffn_fused", layer=layer.label(), batch=2, mode="forward", backend="reference",
                 dtype="float32", device="cpu", seconds=1e-4, bytes=shapes.traffic_bytes(layer, 2, torch.float32, "forward"),
                 flops=shapes.flops(layer, 2, "forward"))
    extra.update(GBps=extra["bytes"] / 1e-4 / 1e9, TFLOPs=extra["flops"] / 1e-4 / 1e12, intensity=extra["flops"] / extra["bytes"])
    ops_json.write_text(json.dumps({"benchmarks": [{"extra_info": extra}], "shvit": {
        "device": "cpu", "dtype": "fp32", "grid": "small", "threads": 1, "environment": {"torch": "x"}, "command": "pytest",
        "probe": data["probe"]}}))
    written = render.render([str(tmp_path / "paper.json"), str(ops_json)], str(tmp_path / "out"))
    md = (tmp_path / "out" / "README.md").read_text()
    assert "| eager (plain torch, NCHW) |" in md and "ffn 32->64->32 4x4" in md
    for key, path in written.items():
        assert (tmp_path / "out" / path.split("/")[-1]).stat().st_size > 0, key


def test_render_lists_the_session_folders_newest_first(tmp_path):
    for folder, title in (("cpu_a_2026-12-01", "Older run"), ("cpu_b_2026-12-03b", "Newest run"),
                          ("cpu_c_2026-12-03", "Middle run")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "NOTES.md").write_text(f"# {title}\n\nbody\n")
    (tmp_path / "no_notes_2026-12-09").mkdir()  # a folder without notes is not a session's
    lines = [line for line in render.session_index(str(tmp_path)) if line.startswith("- ")]
    assert lines == ["- [`cpu_b_2026-12-03b/`](cpu_b_2026-12-03b/NOTES.md): Newest run",
                     "- [`cpu_c_2026-12-03/`](cpu_c_2026-12-03/NOTES.md): Middle run",
                     "- [`cpu_a_2026-12-01/`](cpu_a_2026-12-01/NOTES.md): Older run"]
    assert render.session_index(str(tmp_path / "no_notes_2026-12-09")) == []


def test_unknown_peer_is_an_error():
    with pytest.raises(ValueError, match="unknown"):
        paper_protocol.parse_peers("eager,warp-drive", torch.device("cpu"))


def test_training_profile_counts_a_backward_as_twice_its_forward():
    from benchmarks.profile_train import _kind_and_flops
    from shvit_kernels import dispatch

    x, w = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3)
    conv = (x, w, torch.ones(16), torch.zeros(16), 2, 1, 1, 1e-5, True, None)
    label, forward = _kind_and_flops("conv_bn_train", conv)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.conv2d(x, w, None, 2, 1)
    assert label == "conv_bn_train dense 3x3 (8->16)" and forward == counter.get_total_flops()
    names = dispatch.op_arguments("conv_bn_train_backward")
    grad = torch.randn(2, 16, 3, 3)
    backward_args = tuple({"grad_out": grad, **dict(zip(dispatch.op_arguments("conv_bn_train"), conv))}.get(n)
                          for n in names)
    assert _kind_and_flops("conv_bn_train_backward", backward_args) == (label, 2 * forward)


def test_training_profile_tiny_run_has_both_phases_and_the_optimizer(monkeypatch, tmp_path, capsys):
    from benchmarks import device, profile_train

    monkeypatch.setattr(device, "probe", lambda device, dtypes: {
        "matmul_TFLOPs": {"bf16": 0.1}, "core_peak_GFLOPs": {"fp32_fma": 100.0, "bf16_dot": 50.0},
        "bf16_products": "fp32"})
    threads = torch.get_num_threads()
    out = tmp_path / "profile_train.json"
    try:
        assert profile_train.main(["--img-size", "64", "--batch-size", "2", "--iters", "1", "--rounds", "1",
                                   "--amp", "bf16", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r["img_size"] == 64 and r["amp"] == "bf16" and set(r["step_ms"]) == {"fused", "plain eager"}
    assert {row["phase"] for row in r["rows"]} == {"forward", "backward", "optimizer"}
    for phase in ("forward", "backward"):
        assert any(row["phase"] == phase and row["kind"] == "conv_bn_train 1x1" and row["ms"] > 0 for row in r["rows"])
    assert "of 100 GFLOP/s (1 thread(s)" in capsys.readouterr().out  # the faster arithmetic usable in bf16


def _train_vs_peers(argv):
    """benchmarks/train_vs_peers.py's main() in this process; it sets the thread count, which is put back."""
    from benchmarks import train_vs_peers

    threads = torch.get_num_threads()
    try:
        return train_vs_peers.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_train_vs_peers_tiny_run_reports_medians_ratios_and_targets(tmp_path):
    out = tmp_path / "train_vs_peers.json"
    assert _train_vs_peers(["--img-size", "64", "--batch-size", "2", "--steps", "1", "--rounds", "2", "--warmup", "1",
                            "--variants", "fused,eager", "--skip-peak", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["cpu"] and data["environment"]["torch"] and data["round_orders"] == [
        ["fused", "eager"], ["eager", "fused"]]
    for name in ("fused", "eager"):
        v = data["variants"][name]
        assert len(v["ms_per_step_rounds"]) == 2 and v["ms_per_step_median"] > 0 and v["img_per_s_median"] > 0
        assert len(v["warmup_step_s"]) == 1 and "peak_bytes" not in v
    speed = data["ratios"]["fused_vs_eager"]["speed"]
    assert speed == pytest.approx(data["variants"]["eager"]["ms_per_step_median"]
                                  / data["variants"]["fused"]["ms_per_step_median"])
    assert data["targets"]["speed_vs_eager"] == {"target": 1.3, "measured": speed, "met": speed >= 1.3}
    assert data["targets"]["speed_vs_compile"]["met"] is None  # compile not run: no verdict
    assert data["targets"]["memory_vs_eager"]["met"] is None  # --skip-peak


def test_train_vs_peers_leaves_the_step_after_another_variant_untimed(monkeypatch):
    """A variant whose first step after another variant's is slow (its caches refilled) is timed at its steady
    speed: each variant's steps in a round follow one untimed step."""
    import time as _time
    import types

    from benchmarks import train_vs_peers

    last = []

    class Trainee:
        def step(self):
            _time.sleep(0.03 if last and last[-1] is not self else 0.001)
            last.append(self)

    monkeypatch.setattr(train_vs_peers, "training_setup", lambda *args: (torch.nn.Linear(1, 1), None, None))
    monkeypatch.setattr(train_vs_peers, "make_variant", lambda *args: Trainee())
    args = types.SimpleNamespace(model="shvit_s1", img_size=64, batch_size=2, warmup=1, rounds=3, steps=2, amp="none")
    report, _ = train_vs_peers.time_variants(args, ["a", "b"])
    assert all(ms < 10 for v in report.values() for ms in v["ms_per_step_rounds"]), report


def test_train_vs_peers_keep_variants_step_under_their_setting():
    from benchmarks.profile_train import training_setup
    from benchmarks.train_vs_peers import make_variant
    from shvit_kernels.ops import conv_bn as conv_ops

    model, x, labels = training_setup("shvit_s1", 64, 2, torch.device("cpu"))
    before = shvit_kernels.set_keep_conv_outputs(conv_ops.DEFAULT_KEEP_MIN_MACS)
    try:
        for name, expected in (("fused-keep-all", True), ("fused-keep-none", False)):
            flags = []

            def spy(call):
                if call.op == "conv_bn_train":
                    flags.append(dict(zip(dispatch.op_arguments(call.op), call.args))["keep_conv_output"])

            trainee = make_variant(name, model, x, labels, "none")
            with dispatch.observe(spy):
                trainee.step()
            assert flags and all(f == expected for f in flags), name
            assert shvit_kernels.set_keep_conv_outputs(conv_ops.DEFAULT_KEEP_MIN_MACS) == conv_ops.DEFAULT_KEEP_MIN_MACS
    finally:
        shvit_kernels.set_keep_conv_outputs(before)


def test_train_vs_peers_peak_of_a_step_in_a_fresh_process(tmp_path):
    out = tmp_path / "train_vs_peers.json"
    assert _train_vs_peers(["--img-size", "64", "--batch-size", "2", "--steps", "1", "--rounds", "1", "--warmup", "1",
                            "--variants", "eager", "--output", str(out)]) == 0
    eager = json.loads(out.read_text())["variants"]["eager"]
    assert eager["peak_bytes"] > 0 and "peak" in eager["peak_measure"] and "peak_error" not in eager


def test_onnxruntime_nodes_are_grouped_like_the_fused_ops():
    from benchmarks.profile_model import onnxruntime_kind

    def node(op, *shapes):
        return {"args": {"op_name": op, "input_type_shape": [{"float": list(s)} for s in shapes]}}

    assert onnxruntime_kind(node("Conv", (16, 128, 14, 14), (128, 1, 3, 3))) == "Conv depthwise 3x3"
    assert onnxruntime_kind(node("FusedConv", (16, 128, 14, 14), (256, 128, 1, 1))) == "Conv 1x1"
    assert onnxruntime_kind(node("Conv", (16, 16, 112, 112), (32, 16, 3, 3))) == "Conv dense 3x3 (16->32)"
    assert onnxruntime_kind(node("Softmax", (16, 49, 49))) == "Softmax"


def tiny_model_profile(monkeypatch, tmp_path, *flags) -> dict:
    """profile_model.main on S1 at 64 px, batch 1, one iteration, a stub probe; returns its JSON."""
    from benchmarks import device, profile_model

    monkeypatch.setattr(device, "probe", lambda device, dtypes: {
        "matmul_TFLOPs": {"fp32": 0.1}, "core_peak_GFLOPs": {"fp32_fma": 100.0}, "bf16_products": "fp32"})
    monkeypatch.setitem(profile_model.bench.PAPER_IMG_SIZE, "shvit_s1", 64)
    threads = torch.get_num_threads()
    out = tmp_path / "profile.json"
    try:
        assert profile_model.main(["--batch-size", "1", "--iters", "1", *flags, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_model_profile_with_onnxruntime_tiny_run(monkeypatch, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from benchmarks import profile_model

    o = tiny_model_profile(monkeypatch, tmp_path, "--onnxruntime")["onnxruntime"]
    kinds = {row["kind"]: row for row in o["rows"]}
    assert kinds["Conv 1x1"]["ms"] > 0 and "Conv dense 3x3 (3->16)" in kinds, sorted(kinds)
    assert o["node_ms"] > 0 and "same folded model" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_model.main(["--dtype", "bf16", "--onnxruntime"])


def test_model_profile_isolated_times_every_kind(monkeypatch, tmp_path, capsys):
    r = tiny_model_profile(monkeypatch, tmp_path, "--isolated")
    kernel_rows = [row for row in r["rows"] if row["kind"] != "outside the ops"]
    assert kernel_rows and all(row["isolated_ms"] > 0 for row in kernel_rows)
    b = r["forward_vs_kernels"]
    assert 0 < b["kernels_back_to_back_ms"] and 0 < b["forward_ms"] and b["rounds"] >= 3
    assert "back to back" in capsys.readouterr().out


def test_paired_speedup_is_the_median_of_ratios_within_rounds():
    from shvit.bench import paired_speedup

    # A drifting machine: the reference's rounds slow down with the variant's, 2x apart in every round.
    assert paired_speedup([10.0, 20.0, 40.0], [20.0, 40.0, 80.0]) == (2.0, 2.0, 2.0)
    assert paired_speedup([10.0, 10.0, 10.0], [5.0, 20.0, 30.0]) == (2.0, 0.5, 3.0)
    assert paired_speedup([], [1.0]) is None and paired_speedup([1.0], [1.0, 2.0]) is None


def test_measure_keeps_every_rounds_time_and_render_shows_the_paired_ratio():
    from shvit import bench

    model = torch.nn.Conv2d(3, 4, 3)
    variants = [bench.Variant("a", model), bench.Variant("b", model)]
    results = bench.measure(variants, [torch.randn(1, 3, 8, 8)], torch.device("cpu"), torch.float32, 0.0, 0.002, 3)
    assert [len(r.ms_per_round) for r in results] == [3, 3]
    assert statistics.median(results[1].ms_per_round) == pytest.approx(results[1].ms_per_batch_median)
    rows = [dict(name=r.name, img_per_s=r.img_per_s, ms_per_batch_median=r.ms_per_batch_median,
                 ms_per_batch_min=r.ms_per_batch_min, ms_per_batch_max=r.ms_per_batch_max,
                 max_rel_diff_vs_first=0.0, ms_per_round=r.ms_per_round) for r in results]
    table = render.detail_table({"results": rows}, "results")
    expected = bench.paired_speedup(results[1].ms_per_round, results[0].ms_per_round)
    assert f"{expected[0]:.2f}x ({expected[1]:.2f}..{expected[2]:.2f})" in table
    rows[1].pop("ms_per_round")  # results saved before rounds were kept
    assert "| n/a |" in render.detail_table({"results": rows}, "results")


def test_measure_leaves_the_call_after_another_variant_untimed():
    """A model whose first call after the other variant's is slow (its caches refilled) is timed at its steady speed:
    each window opens with an untimed call."""
    import time as _time

    from shvit import bench

    last = []

    class Model(torch.nn.Module):
        def forward(self, x):
            _time.sleep(0.03 if last and last[-1] is not self else 0.001)
            last.append(self)
            return x

    variants = [bench.Variant("a", Model()), bench.Variant("b", Model())]
    results = bench.measure(variants, [torch.randn(1, 3, 8, 8)], torch.device("cpu"), torch.float32, 0.0, 0.01, 3)
    assert all(r.ms_per_batch_max < 10 for r in results), [r.ms_per_round for r in results]


@pytest.mark.skipif(shvit_kernels.backends.cpp.variant() is None, reason="the cpp backend is not built")
def test_cpu_peak_memory_counts_outputs_the_cpp_cache_would_serve():
    """A block the cpp output cache kept from before the measurement is handed back first: an output of the same
    size inside the block is counted, not hidden in the starting resident set."""
    from benchmarks.device import PeakMemory

    x = torch.randn(2, 64, 96, 96).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, 64, 1, 1) / 8, torch.randn(64)
    with shvit_kernels.use_backend("cpp"):
        y = shvit_kernels.conv_bias_act(x, w, b)
        nbytes = y.numel() * y.element_size()  # 4.7 MB
        del y  # its block goes to the cache
        assert shvit_kernels.backends.cpp.output_cache_bytes() >= nbytes
        with PeakMemory(torch.device("cpu")) as peak:
            y = shvit_kernels.conv_bias_act(x, w, b)
    if "upper bound" in peak.measure:
        pytest.skip(f"this kernel cannot reset the peak resident set: {peak.measure}")
    assert peak.bytes >= 0.9 * nbytes, (peak.bytes, nbytes, peak.measure)


def test_onnxruntime_convs_are_matched_to_the_fused_ops_by_shape():
    from benchmarks.vs_onnxruntime import matched_convs

    x = torch.zeros(16, 128, 14, 14)
    w1, w2, b = torch.zeros(256, 128, 1, 1), torch.zeros(128, 256, 1, 1), torch.zeros(1)
    assert matched_convs("ffn_fused", (x, w1, b, w2, b)) == [
        ((16, 128, 14, 14), (256, 128, 1, 1)), ((16, 256, 14, 14), (128, 256, 1, 1))]
    stem = [torch.zeros(16, 3, 3, 3), b, torch.zeros(32, 16, 3, 3), b, torch.zeros(64, 32, 3, 3), b,
            torch.zeros(128, 64, 3, 3), b]
    assert [k[0] for k in matched_convs("patch_embed", (torch.zeros(2, 3, 224, 224), *stem))] == [
        (2, 3, 224, 224), (2, 16, 112, 112), (2, 32, 56, 56), (2, 64, 28, 28)]
    assert matched_convs("conv_bias_act", (x, w1, b, 1, 0, 1, False, None)) == [((16, 128, 14, 14), (256, 128, 1, 1))]
    assert matched_convs("shsa_fused", (x, w1)) == []


def test_onnxruntime_convs_with_padded_channels_are_found():
    from benchmarks.vs_onnxruntime import find_conv

    profiled = {((16, 3, 256, 256), (32, 3, 3, 3)): 1.0, ((16, 32, 128, 128), (64, 32, 3, 3)): 2.0,
                ((16, 224, 8, 8), (224, 1, 3, 3)): 3.0}
    assert find_conv(((16, 3, 256, 256), (28, 3, 3, 3)), profiled) == ((16, 3, 256, 256), (32, 3, 3, 3))
    assert find_conv(((16, 28, 128, 128), (56, 28, 3, 3)), profiled) == ((16, 32, 128, 128), (64, 32, 3, 3))
    assert find_conv(((16, 224, 8, 8), (224, 1, 3, 3)), profiled) == ((16, 224, 8, 8), (224, 1, 3, 3))
    assert find_conv(((16, 3, 256, 256), (8, 3, 3, 3)), profiled) is None  # 8 -> 32 is not a padding
    assert find_conv(((16, 3, 128, 128), (28, 3, 3, 3)), profiled) is None
