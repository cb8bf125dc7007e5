"""Packaging facts a user relies on: one version, the licence files, the wheel build's variant choice."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import shvit
import shvit_kernels

ROOT = Path(__file__).resolve().parent.parent


def test_version_has_one_source():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "shvit_kernels.__version__"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", shvit_kernels.__version__)
    assert shvit.__version__ == shvit_kernels.__version__


def test_licence_files_match_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and 'license-files = ["LICENSE", "NOTICE"]' in pyproject
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    notice = (ROOT / "NOTICE").read_text()
    assert "MIT License" in notice and "Copyright (c) 2024 ysj9909" in notice and "github.com/ysj9909/SHViT" in notice


def _setup_py_capabilities(*argv, env_value=None):
    code = (
        "import sys, runpy; sys.argv = ['setup.py', *sys.argv[1:]]; "
        "import setuptools; setuptools.setup = lambda **kw: None; "
        "ns = runpy.run_path('setup.py'); print(ns['wanted_cpu_capabilities']())"
    )
    env = {**__import__("os").environ, "SHVIT_NO_EXTENSIONS": "1"}
    env.pop("SHVIT_CPU_CAPABILITIES", None)
    if env_value is not None:
        env["SHVIT_CPU_CAPABILITIES"] = env_value
    res = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_build_compiles_this_processors_variant_and_wheels_all():
    from shvit_kernels.backends import cpp

    native = cpp.runnable_capabilities()[0]
    assert _setup_py_capabilities("build_ext", "--inplace") == str([native])
    assert _setup_py_capabilities("bdist_wheel") == str(["DEFAULT", "AVX2", "AVX512"])
    assert _setup_py_capabilities("build_ext", env_value="all") == str(["DEFAULT", "AVX2", "AVX512"])
    assert _setup_py_capabilities("build_ext", env_value="avx2,default") == str(["AVX2", "DEFAULT"])
