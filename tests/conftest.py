import importlib.util
import os
import sys

import torch

# Triton kernels are tested in interpreter mode when no GPU is present; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Automatic dispatch in the tests follows the fixed order (deterministic); tests/test_autotune.py turns tuning on.
os.environ.setdefault("SHVIT_KERNELS_AUTOTUNE", "off")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _interpreter_computes_bf16_as_a_gpu():
    """Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot and truncates fp32 -> bf16 casts; the
    kernels' bf16 paths are checked with both done as on a GPU (shvit_kernels.testing.triton_interpreter)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        yield  # on a GPU, or without triton (whose tests skip)
        return
    from shvit_kernels.testing.triton_interpreter import emulate_gpu_bf16

    with emulate_gpu_bf16():
        yield


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    """Fresh random inputs per test (seeded for reproducibility) and no forced backend leaking between tests."""
    import shvit_kernels

    torch.manual_seed(0)
    shvit_kernels.set_backend(None)
    # Judge kernels by their own results: a first-use check would hand back the reference's result for a wrong
    # kernel (with a warning) and a test would pass. tests/test_first_use_check.py turns it back on.
    shvit_kernels.dispatch.set_verify(False)
    yield
    shvit_kernels.dispatch.set_verify(None)
    shvit_kernels.set_backend(None)
    _stop_if_cuda_context_is_lost()


def _stop_if_cuda_context_is_lost():
    """After an illegal address or a device-side assert, every later CUDA call in this process fails: on the H200
    (2026-12-04) one such test turned 214 later ones into errors. Under pytest-xdist the worker exits, which fails
    this test and starts a fresh worker; a plain run stops, naming the test."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:  # torch.AcceleratorError on torch >= 2.8
        message = f"the CUDA context is lost after this test: {str(e).splitlines()[0]}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(message, file=sys.stderr, flush=True)
            os._exit(3)
        pytest.exit(message, returncode=1)


def pytest_report_header(config):
    import shvit_kernels

    usable = sorted({r["backend"] for r in shvit_kernels.backend_table() if r["usable"]})
    return f"shvit_kernels backends usable here: {', '.join(usable)}; torch {torch.__version__}"
