"""The command line: ``python -m shvit info`` and ``python -m shvit bench``."""

import json
import subprocess
import sys

import pytest


def shvit_cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "shvit", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def test_info_lists_every_backend_with_reasons():
    out = shvit_cli("info").stdout
    assert "torch" in out and "shvit-kernels" in out
    for backend in ("cuda", "triton", "cpp", "reference"):
        assert f"\n{backend}" in out
    info = json.loads(shvit_cli("info", "--json").stdout)  # the whole of stdout is one JSON document
    assert info["torch"] and info["shvit_kernels"] and "shvit_s1" in info["models"]
    assert all(r["usable"] or r["why"] for r in info["backends"])


def test_bench_reports_speed_and_agreement(tmp_path):
    out_file = tmp_path / "bench.json"
    shvit_cli(
        "bench", "--model", "shvit_s1", "--batch-size", "2", "--img-size", "64", "--device", "cpu",
        "--warmup", "0.05", "--window", "0.05", "--rounds", "2", "--threads", "1", "--output", str(out_file),
    )
    report = json.loads(out_file.read_text())
    assert report["batch_size"] == 2 and report["img_size"] == 64 and report["threads"] == 1
    names = [r["name"] for r in report["results"]]
    assert names[0] == "reference (unfused)" and len(names) == 3
    for r in report["results"]:
        assert r["img_per_s"] > 0
        assert r["max_rel_diff_vs_first"] < 1e-4, r
    assert report["environment"]["torch"]


@pytest.mark.parametrize("args,message", [
    (["bench", "--model", "shvit_s9"], "--model must be one of"),
    (["bench", "--dtype", "fp8"], "invalid choice"),
])
def test_bench_bad_arguments(args, message):
    res = shvit_cli(*args, check=False)
    assert res.returncode == 2 and message in res.stderr
