"""Export: ONNX (both exporters, fused and unfused, dynamic batch, ONNX Runtime), torch.export, torch.jit.trace."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import shvit
import shvit_kernels
from shvit.export import export_onnx
from helpers import max_rel_err, randomize_norms

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

STANDARD_DOMAINS = ("", "ai.onnx")
SIZE = 64


def small_model(fused: bool) -> nn.Module:
    model = randomize_norms(shvit.create_model("shvit_s1", num_classes=10, depth=(1, 1, 1))).eval()
    return model.fuse() if fused else model


def onnx_ops(path) -> set:
    return {(node.domain, node.op_type) for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_onnx_export_has_standard_ops_dynamic_batch_and_matches(tmp_path, fused, dynamo):
    model = small_model(fused)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, img_size=SIZE, batch_size=2, dynamo=dynamo, verify=True)
    ops = onnx_ops(path)
    assert {domain for domain, _ in ops} <= set(STANDARD_DOMAINS), sorted(ops)
    assert ("", "Softmax") in ops and ("", "Conv") in ops  # the attention and the convs, as ONNX ops
    assert report["verified_batch"] == 3  # exported at batch 2, run at batch 3
    assert report["max_rel_diff"] <= 1e-5
    assert not model.training


def test_onnx_export_restores_training_mode_and_checks_arguments(tmp_path):
    model = small_model(fused=False).train()
    export_onnx(model, tmp_path / "m.onnx", img_size=SIZE, verify=False)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx("model", tmp_path / "m.onnx")


def test_cli_export_writes_a_verified_file(tmp_path, capsys):
    from shvit.__main__ import main

    model = randomize_norms(shvit.create_model("shvit_s1", num_classes=7))
    ckpt = tmp_path / "ckpt.pth"
    shvit.save_checkpoint(model, ckpt)
    out = tmp_path / "s1.onnx"
    assert main(["export", "--model", "shvit_s1", "--checkpoint", str(ckpt), "--img-size", str(SIZE), "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert "wrote" in line and "max rel. diff" in line and "fused" in line
    diff = float(line.rsplit("max rel. diff", 1)[1].strip())
    assert diff <= 1e-5
    assert {d for d, _ in onnx_ops(out)} <= set(STANDARD_DOMAINS)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": torch.randn(1, 3, SIZE, SIZE).numpy()})
    assert logits.shape == (1, 7)  # the checkpoint's head, batch 1 from a file traced at batch 2


def test_cli_export_bad_input_is_a_clear_error(tmp_path, capsys):
    from shvit.__main__ import main

    assert main(["export", "--model", "shvit_s9", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "shvit_s9" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# torch.jit.trace and torch.export keep the custom ops (the fast kernels); inline_reference inlines them
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_jit_trace_has_no_tracer_warnings_and_runs_other_batches(fused):
    model = small_model(fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, torch.randn(2, 3, SIZE, SIZE))
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) or "shvit" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert "shvit::" in str(traced.inlined_graph)  # the trace calls the custom ops, i.e. the fast kernels
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_err(traced(x), model(x)) <= 1e-6


def test_jit_trace_under_inline_reference_records_only_aten_ops():
    model = small_model(fused=True)
    with shvit_kernels.inline_reference():
        traced = torch.jit.trace(model, torch.randn(2, 3, SIZE, SIZE))
    assert "shvit::" not in str(traced.inlined_graph)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_err(traced(x), model(x)) <= 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_torch_export_keeps_custom_ops_with_dynamic_batch(fused):
    model = small_model(fused)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    assert "torch.ops.shvit." in program.graph_module.code
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_err(program.module()(x), model(x)) <= 1e-6
    with shvit_kernels.inline_reference():
        inlined = torch.export.export(model, (torch.randn(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    assert "torch.ops.shvit." not in inlined.graph_module.code
    with torch.no_grad():
        assert max_rel_err(inlined.module()(x), model(x)) <= 1e-5


def test_inline_reference_nests_and_follows_onnx_export_flag(monkeypatch):
    from shvit_kernels.tracing import inlining_reference

    assert not inlining_reference()
    with shvit_kernels.inline_reference():
        assert inlining_reference()
        with shvit_kernels.inline_reference(False):
            assert not inlining_reference()
        assert inlining_reference()
    assert not inlining_reference()
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not inlining_reference()  # only asked while tracing or exporting
    seen = []

    def record(x):
        seen.append(inlining_reference())
        return x * 2

    torch.jit.trace(record, torch.randn(2), check_trace=False)
    assert seen == [True]
