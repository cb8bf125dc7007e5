"""GPU-readiness of the Triton launchers without a GPU.

* The ahead-of-time compile check (``tools/triton_aot_check.py --ci``): every kernel at the tiles the launchers
  pick for S1..S4, compiled for sm_90 by the real compiler; fails on a compile error or a shared-memory overflow.
* Tile choice follows the device's shared memory (declines with a reason where nothing fits), and a launch that
  Triton refuses for resources falls back to the reference kernel instead of failing.
* No host synchronisation on the inference path: the fused model's launchers run on ``meta`` tensors (no data:
  ``.item()``, ``.cpu()``, ``.tolist()`` and ``bool(tensor)`` all raise there) with kernel launches recorded.
"""

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from shvit_kernels import dispatch  # noqa: E402
from shvit_kernels.backends import triton as triton_backend  # noqa: E402
from shvit_kernels.backends.triton import common as triton_common, ffn as T_ffn  # noqa: E402
from shvit_kernels.testing import allow_meta_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_aot_compile_check_ci_subset(tmp_path):
    """About 3 minutes on 2 cores (the covering subset; --full compiles every specialization)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot_check.py"), "--ci", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    doc = json.loads((tmp_path / "triton_aot_sm90.json").read_text())
    bad = [f"{row['kernel']} {row['config']}: {row['problems']} {row.get('error', '')[:300]}"
           for row in doc["rows"] if not row["ok"]]
    assert r.returncode == 0 and not bad, "\n".join(bad) or r.stdout[-3000:] + r.stderr[-3000:]
    kernels = {row["kernel"] for row in doc["rows"]}
    for name in ("_conv_gemm_kernel", "_conv_dw_kernel", "_ffn_fwd_kernel", "_ffn_bwd_kernel", "_shsa_fwd_kernel",
                 "_shsa_bwd_in_kernel", "_wgrad_gemm_kernel", "_bn_apply_kernel"):
        assert name in kernels, f"{name} was not captured from the launchers"
    assert all(row["registers"] for row in doc["rows"]), "ptxas register counts missing"


def test_ffn_tiles_follow_the_shared_memory_limit():
    x = torch.randn(1, 512, 2, 2)
    with triton_common.target_shared_memory(232448):
        assert T_ffn.size_reasons(x) == [] and T_ffn.size_reasons(x, backward=True) == []
        bm, cp, bh, stages = T_ffn._config("ffn_fused", x, False)
        assert (stages - 1) * 2 * cp * bh * 4 + bm * cp * 4 <= 232448
    with triton_common.target_shared_memory(48 * 1024):  # a device with less shared memory: declined, with the reason
        reasons = T_ffn.size_reasons(x, backward=True)
        assert reasons and "shared memory" in reasons[0] and "C=512" in reasons[0]
        with pytest.raises(ValueError, match="shared memory"):
            T_ffn.ffn_fused_backward(x, x, torch.randn(1024, 512, 1, 1), torch.randn(1024),
                                     torch.randn(512, 1024, 1, 1), torch.randn(512))


def test_out_of_resources_falls_back_to_the_reference():
    from triton.runtime.errors import OutOfResources

    def refuses(*args):
        raise OutOfResources(300000, 232448, "shared memory")

    ref = dispatch.kernel("reference", "ffn_fused")
    args = (torch.randn(1, 4, 2, 2), torch.randn(8, 4, 1, 1), torch.randn(8), torch.randn(4, 8, 1, 1), torch.randn(4))
    with pytest.warns(RuntimeWarning, match="exceeds the device's resources"):
        out = triton_common.call_or_fall_back("ffn_fused", refuses, ref, *args)
    torch.testing.assert_close(out, ref(*args))
    with warnings.catch_warnings():  # other errors are not swallowed
        with pytest.raises(ZeroDivisionError):
            triton_common.call_or_fall_back("ffn_fused", lambda *a: 1 / 0, ref, *args)


# ---------------------------------------------------------------------------------------------------------
# No host synchronisation on the inference path
# ---------------------------------------------------------------------------------------------------------
def _run_fused_model_on_meta(monkeypatch, launches, dtype=torch.float32, around_forward=contextlib.nullcontext):
    """The fused S1 model's forward on meta tensors with the triton backend forced and launches recorded."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from shvit.factory import create_model

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else repr(self))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    monkeypatch.setattr(JITFunction, "run", record)
    is_autocast_enabled = torch.is_autocast_enabled  # (which has no answer for "meta" in torch 2.13)
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *a: False if a and a[0] == "meta" else is_autocast_enabled(*a))
    model = create_model("shvit_s1").eval().fuse().to("meta", dtype)
    patched = dispatch.patched_backend("triton", device_types=("meta",), availability=lambda: [], verify_first_use=False,
                                       not_supported={op: (lambda **_: []) for op in triton_backend.NOT_SUPPORTED})
    # The ops refuse meta tensors for users; here they carry shapes only, so the launchers run without data.
    # channels_last, the layout the fused model moves an input to once (which is not a per-op copy)
    x = torch.empty(2, 3, 224, 224, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with patched, allow_meta_tensors(), torch.no_grad(), dispatch.use_backend("triton"), around_forward():
        return model(x)


def test_inference_launchers_do_not_synchronise(monkeypatch):
    launches = []
    out = _run_fused_model_on_meta(monkeypatch, launches)
    assert out.shape == (2, 1000)
    assert len(launches) > 20 and "_shsa_fwd_kernel" in launches and "_ffn_fwd_kernel" in launches


TRITON_BACKEND_DIR = str(Path(triton_backend.__file__).parent)


def _called_from(directory):
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(directory):
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_inference_launchers_copy_no_weights(monkeypatch, dtype):
    """A fused model's forward on the triton backend makes no tensor copy, cast or fill per call (the fused
    model holds its weights in the kernels' dtype and layout; only outputs and kernel launches remain)."""
    copies = []

    def recording(name, method):
        def wrapper(*args, **kwargs):
            out = method(*args, **kwargs)
            # a no-op .to() / .contiguous() returns its input; only the launchers' calls count (torch's own
            # meta implementations of the model's aten ops cast in Python too)
            if not (args and out is args[0]) and _called_from(TRITON_BACKEND_DIR):
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                copies.append(f"{name}{shapes}")
            return out
        return wrapper

    @contextlib.contextmanager
    def recording_copies():
        with monkeypatch.context() as m:
            for name in ("to", "contiguous", "float", "half", "bfloat16", "clone", "copy_", "fill_"):
                m.setattr(torch.Tensor, name, recording(f"Tensor.{name}", getattr(torch.Tensor, name)))
            for name in ("ones", "zeros", "full", "ones_like", "zeros_like", "full_like", "tensor"):
                m.setattr(torch, name, recording(f"torch.{name}", getattr(torch, name)))
            yield

    launches = []
    _run_fused_model_on_meta(monkeypatch, launches, dtype, recording_copies)
    assert len(launches) > 50
    assert not copies, copies


@pytest.mark.parametrize("sync", ["item", "cpu", "bool", "tolist"])
def test_sync_check_catches_a_host_sync(monkeypatch, sync):
    """The check above fails when a launcher reads a device value on the host."""
    from shvit_kernels.backends.triton import shsa as T_shsa

    real = T_shsa._attention_forward

    def syncing(x, *args):
        {"item": lambda: x.sum().item(), "cpu": lambda: x.cpu(), "bool": lambda: bool(x.sum() > 0),
         "tolist": lambda: x.sum().tolist()}[sync]()
        return real(x, *args)

    monkeypatch.setattr(T_shsa, "_attention_forward", syncing)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _run_fused_model_on_meta(monkeypatch, [])


def test_int32_offsets_are_guarded():
    big = torch.empty(512, 64, 256, 256, device="meta")  # 2**31 elements, no memory
    reasons = triton_common.offset_reasons(big)
    assert reasons and "int32" in reasons[0]
    assert triton_common.offset_reasons(torch.empty(2, 64, 56, 56)) == []
    assert any("int32" in r for r in triton_backend.tensor_reasons(big))


@pytest.mark.slow
def test_prewarmed_cache_is_found_by_tritons_own_jit_path(tmp_path):
    """tools/triton_prewarm.py compiles kernels here for sm_90; Triton's JIT path (as on the GPU, launches skipped)
    must then find every kernel of a model's forward in that cache and compile none (``--quick``; this Python
    stands in for the GPU machine's, same Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_prewarm.py"), "--device-python", sys.executable,
                        "--quick", "--jobs", "2", "--cache", str(cache)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compiled 0 anew" in r.stdout and (tmp_path / "cache.tar.xz").exists()
    files = {f.suffix for d in cache.iterdir() if d.is_dir() for f in d.iterdir()}
    assert files == {".json", ".cubin"}, files
