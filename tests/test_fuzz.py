"""Runs the seeded op fuzzer (tests/fuzz_ops.py) in a subprocess with a time budget: a crash (a signal such as
SIGFPE or SIGSEGV), a hang, an unclear error or a wrong result fails the test.

SHVIT_FUZZ_SECONDS (default 45) and SHVIT_FUZZ_SEED (default 0) choose the budget and the cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).resolve().parent / "fuzz_ops.py"


def test_fuzz_every_op_on_every_backend():
    seconds = float(os.environ.get("SHVIT_FUZZ_SECONDS", 45))
    res = subprocess.run([sys.executable, str(FUZZER), "--seconds", str(seconds)], capture_output=True, text=True,
                         timeout=seconds + 240, cwd=FUZZER.parent.parent)
    report = f"exit status {res.returncode}\n{res.stdout[-20000:]}\n{res.stderr[-5000:]}"
    assert res.returncode >= 0, f"the fuzzer process died from signal {-res.returncode}\n{report}"
    assert res.returncode == 0, report
    assert " 0 failures" in res.stdout and "cases" in res.stdout, report
