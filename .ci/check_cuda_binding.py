"""Checks a built shvit_kernels._C_cuda without a GPU: it loads, the cuda backend picks it up, it defines exactly
the ops the backend registers, and each op's binding accepts the schema arguments the backend passes it
(cuda_backend.binding_arguments), in order (pybind11 checks arity and types), and reaches its own argument checks,
which reject CPU tensors with an error naming the argument.

Usage (CI, from .ci/build_cuda_ext.sh): python .ci/check_cuda_binding.py PATH/TO/_C_cuda*.so
Runs in a venv whose torch is the CUDA build the extension was compiled against; the repository root must be
importable (PYTHONPATH). Loading needs no driver: libcuda is opened only when a CUDA call is made.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

MODULE = "shvit_kernels._C_cuda"


def load(path: str):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The backend imports shvit_kernels._C_cuda by name; hand it this build.
    sys.modules[MODULE] = module
    return module


def cpu_args(op: str, params):
    """The op schema's arguments, in order, as small CPU tensors and plain values."""
    conv = op.startswith("conv")
    c, p, qk = (8, 16, 16)
    o = 2 * qk + p
    x = torch.randn(2, c, 6, 6) if conv else torch.randn(2, 24, 4, 5)
    values = {
        "x": x, "grad_out": torch.randn_like(x), "out": torch.randn_like(x),
        "weight": torch.randn(c, 1, 3, 3), "bias": torch.randn(c), "residual": None, "has_residual": False,
        "stride": 1, "padding": 1, "groups": c, "relu": True, "eps": 1e-5, "input_grad": True,
        "bn_weight": torch.ones(c if conv else o), "bn_bias": torch.zeros(c if conv else o),
        "mean": torch.zeros(c if conv else o), "var": torch.ones(c if conv else o),
        "qkv_weight": torch.randn(o, p, 1, 1), "qkv_bias": torch.randn(o), "gn_weight": torch.ones(p),
        "gn_bias": torch.zeros(p), "qk_dim": qk, "gn_eps": 1e-5, "bn_eps": 1e-5,
    }
    missing = [n for n in params if n not in values]
    if missing:
        raise SystemExit(f"check_cuda_binding: no test value for {op} argument(s) {missing}; extend cpu_args")
    return [values[n] for n in params]


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    module = load(argv[1])
    from shvit_kernels.backends import cuda as cuda_backend

    failures = []
    if cuda_backend.extension() is not module:
        failures.append(f"the cuda backend did not load this build ({'; '.join(cuda_backend.availability_reasons())})")
    functions = sorted(n for n in dir(module) if not n.startswith("_"))

    ops = sorted(cuda_backend.NOT_SUPPORTED)
    if functions != ops:
        failures.append(f"extension defines {functions}, backend registers {ops}")
    for op in ops:
        fn = getattr(module, op, None)
        if fn is None:
            continue
        params = list(cuda_backend.binding_arguments(op))
        try:
            fn(*cpu_args(op, params))
        except TypeError as e:  # pybind11: the schema's arguments do not match the binding's signature
            detail = " ".join(str(e).splitlines()[:2])  # pybind11 would print every tensor argument after these
            failures.append(f"{op}: binding rejects the schema's arguments {params}: {detail}")
            continue
        except RuntimeError as e:
            if "must be a CUDA tensor" not in str(e):
                failures.append(f"{op}: unexpected error for CPU tensors: {e}")
            else:
                print(f"ok   {op}({', '.join(params)}) -> {str(e).splitlines()[0]}")
            continue
        failures.append(f"{op}: accepted CPU tensors")
    reasons = cuda_backend.availability_reasons()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda backend availability: {reasons or 'usable'}")
    if torch.cuda.is_available() and reasons:
        failures.append(f"a CUDA device is present but the backend is unavailable: {reasons}")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    if not failures:
        print(f"ok   {MODULE}: {len(ops)} ops registered and bound: {', '.join(ops)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
