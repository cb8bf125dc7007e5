"""The command line: ``python -m shvit info``, ``bench`` and ``tune``."""

import json
import os
import subprocess
import sys

import pytest


def shvit_cli(*args, check=True, env=None):
    res = subprocess.run([sys.executable, "-m", "shvit", *args], capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
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
    if info["cpu_kernel_paths"]:  # the cpp backend is built: its resolved paths, also in the text
        assert info["cpu_kernel_paths"]["fp32_1x1_gemms"] in ("tiles", "brgemm")
        assert "fp32_1x1_gemms tiles" in out or "fp32_1x1_gemms brgemm" in out  # 'auto' is timed per process
        assert info["cpu_kernel_paths"]["fp32_dense_conv_blocks"] == "auto"  # timed per shape, bit-identical


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


def test_tune_fills_the_cache_and_info_lists_it(tmp_path):
    env = {"SHVIT_KERNELS_CACHE_DIR": str(tmp_path)}
    out = shvit_cli("tune", "--model", "shvit_s1", "--batch-size", "1", "--img-size", "64", "--device", "cpu",
                    "--threads", "1", env=env).stdout
    assert "signatures tuned" in out and str(tmp_path) in out
    (cache,) = tmp_path.glob("autotune-*.json")
    choices = json.loads(cache.read_text())["choices"]
    ops = ("conv_bias_act", "ffn_fused", "shsa_fused", "squeeze_excite", "patch_embed", "pooled_linear",
           "model_input_layout")
    assert choices and all(k.split()[0] in ops for k in choices)
    info = shvit_cli("info", env=env).stdout
    assert f"{len(choices)} tuned signatures" in info
    assert all(k in info for k in choices)


@pytest.mark.parametrize("args,message", [
    (["bench", "--model", "shvit_s9"], "--model must be one of"),
    (["bench", "--dtype", "fp8"], "invalid choice"),
])
def test_bench_bad_arguments(args, message):
    res = shvit_cli(*args, check=False)
    assert res.returncode == 2 and message in res.stderr
