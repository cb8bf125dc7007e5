"""Every ```python snippet of README.md runs as written (in a folder holding the checkpoint files it names)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import shvit

from helpers import authors_to_timm_names as to_timm

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def checkpoint_dir(tmp_path):
    """The files the snippets load: the authors' release format for S1 / S4 and a timm-layout S1."""
    for variant in ("shvit_s1", "shvit_s4"):
        shvit.save_checkpoint(shvit.create_model(variant), tmp_path / f"{variant}.pth", layout="authors")
    torch.save(to_timm(shvit.create_model("shvit_s1").state_dict()), tmp_path / "shvit_s1_timm.pth")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, checkpoint_dir):
    code = SNIPPETS[index]
    namespace = {"__name__": f"readme_snippet_{index}"}
    if "import" not in code.split("\n", 1)[0]:
        # A snippet continuing the previous one (the checkpoint examples follow the model ones): its imports.
        exec("import torch, shvit", namespace)
    exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
