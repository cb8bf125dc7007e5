"""Command-line values and checkpoints a fault probe found accepted or crashing (issue 15): each is now a clear
error (exit status 2 naming the option) or a documented refusal, and --help / info --json / progress are usable."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shvit
from shvit import train as shvit_train
from shvit.__main__ import build_parser, main as shvit_main
from shvit.checkpoint import CheckpointError, load_checkpoint, read_checkpoint

from helpers import run_train as run, run_train_cli as run_cli, tiny_model

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Bad values: exit status 2 and a message naming the option, before any work starts.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--threads", "-3"], "--threads must be at least 1"),
    (["--ema-decay", "2"], "--ema-decay must be in [0, 1]"),
    (["--ema-decay", "-0.1"], "--ema-decay must be in [0, 1]"),
    (["--log-interval", "0"], "--log-interval must be at least 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0"),
    (["--clip-grad", "-0.5"], "--clip-grad must be a finite number >= 0"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number >= 0"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["--workers", "-1"], "--workers must be at least 0"),
])
def test_train_rejects_bad_values(tmp_path, capsys, args, message):
    # A tiny run, so that a value accepted by mistake finishes quickly (exit 0) and fails the test.
    assert run_cli(tmp_path, "--batch-size", "4", "--synthetic-size", "8", "4", "--steps", "2", *args) == 2
    assert message in capsys.readouterr().err


def test_bench_rejects_negative_threads(capsys):
    assert shvit_main(["bench", "--threads", "-3", "--device", "cpu"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_truncated_resume_is_a_clear_error(tmp_path, capsys):
    first = run(tmp_path / "run", "--batch-size", "4", "--synthetic-size", "8", "4", "--steps", "1", "--no-ema")
    data = Path(first["checkpoint"]).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert run_cli(tmp_path, "--resume", str(truncated)) == 2
    assert "truncated, corrupt" in capsys.readouterr().err
    # A changed --batch-size would not resume exactly (steps per epoch, schedule, data order): refused.
    assert run_cli(tmp_path, "--resume", first["checkpoint"], "--batch-size", "2", "--synthetic-size", "8", "4") == 2
    assert "the run used --batch-size 4, got 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: unreadable files and impossible values are refused with a CheckpointError (a ValueError).
# ---------------------------------------------------------------------------------------------------------------
def test_empty_and_truncated_checkpoint_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        read_checkpoint(empty)
    good = tmp_path / "good.pth"
    shvit.save_checkpoint(tiny_model(), good)
    data = good.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 30):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupt"):
            load_checkpoint(tiny_model(), bad)


def test_checkpoint_with_format_but_no_state_dict():
    with pytest.raises(CheckpointError, match="no 'state_dict' dict"):
        load_checkpoint(tiny_model(), {"format": "shvit-kernels", "variant": "shvit_s1"})
    with pytest.raises(CheckpointError, match="no 'state_dict' dict"):
        load_checkpoint(tiny_model(), {"format": "shvit-kernels", "state_dict": [1, 2]})


@pytest.mark.parametrize("key,value,message", [
    ("patch_embed.0.c.weight", float("nan"), "NaN or infinite"),
    ("head.l.bias", float("inf"), "NaN or infinite"),
    ("patch_embed.0.bn.running_var", -1.0, "negative variance"),
])
def test_checkpoint_with_impossible_values(key, value, message):
    state = tiny_model().state_dict()
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    with pytest.warns(UserWarning, match=message):
        load_checkpoint(model, state, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Usability: --help shows defaults, info --json is one JSON document, progress has an ETA.
# ---------------------------------------------------------------------------------------------------------------
def test_help_shows_defaults(capsys):
    for command, expected in (("train", ["(default: 300)", "(default: 0.99996)", "(default: agc)"]),
                              ("bench", ["(default: shvit_s1)", "(default: 7)"])):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        for text in expected:
            assert text in out, (command, text)


SCRIPTS = ["benchmarks/attention_ablation.py", "benchmarks/highres.py", "benchmarks/paper_protocol.py",
           "benchmarks/profile_model.py", "benchmarks/profile_train.py", "benchmarks/render.py",
           "benchmarks/train_throughput.py", "benchmarks/train_vs_peers.py", "benchmarks/vs_onnxruntime.py",
           "tools/gpu_check.py", "tools/triton_aot_check.py", "tools/triton_prewarm.py"]


def test_every_script_is_listed_here():
    found = sorted(str(p.relative_to(ROOT)) for folder in ("benchmarks", "tools") for p in (ROOT / folder).glob("*.py")
                   if "argparse" in p.read_text())
    assert found == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script, capsys, monkeypatch):
    """``--help`` prints the usage and exits 0 (a stray '%' in a help text made argparse raise instead)."""
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:  # an optional dependency of that script (triton, onnxruntime) is missing here
        pytest.skip(f"{script}: {e}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_info_json_is_valid_json():
    res = subprocess.run([sys.executable, "-m", "shvit", "info", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["shvit_kernels"] == shvit.__version__ and isinstance(info["backends"], list)


def test_progress_lines_have_an_eta(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = shvit_train.Progress(True, 2, total_steps=10, done_steps=0)
    for step in range(1, 5):
        progress.update(f"step {step}", step, False, global_step=step)
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and all("ETA" in line and "/10 steps" in line for line in lines)


def test_progress_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    progress = shvit_train.Progress(True, 100, total_steps=4, done_steps=1)
    for step in range(2, 5):
        progress.update(f"loss {step}", step, step == 4, global_step=step)
    progress.close()
    out = err.getvalue()
    assert "4/4" in out and "loss 4" in out and "step" in out  # tqdm's bar: count, description, unit
