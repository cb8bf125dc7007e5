"""Builds shvit_kernels' compiled backends.

* CPU: one CppExtension per instruction set (``shvit_kernels._C_cpu_{default,avx2,avx512}``) from the same
  ``csrc/cpu`` sources compiled with ATen's ``CPU_CAPABILITY`` macros, so ``at::vec`` uses AVX-512 or AVX2
  where the processor has them; the loader picks the best one at run time. ``SHVIT_CPU_CAPABILITIES`` chooses
  which are built: ``native`` (the default for in-place and editable builds: only the best variant this
  processor runs, which is the only one the loader would pick here), ``all`` (the default for wheels, which
  other processors may install), a comma-separated list such as ``AVX2,DEFAULT``, or ``none`` (or empty).
  ``SHVIT_NO_EXTENSIONS=1`` builds none.
* CUDA: ``shvit_kernels._C_cuda`` from ``csrc/cuda`` when torch has CUDA and nvcc is found, or when
  ``FORCE_CUDA=1``; architectures from ``TORCH_CUDA_ARCH_LIST`` (default 8.0;9.0).

Build with torch already installed: ``pip install --no-build-isolation -e .``; ``bash tools/setup.sh`` builds in
place with ninja in ``build/`` (progress shown, only changed sources recompiled on a rerun).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


ALL_CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def native_cpu_capability():
    """The best variant this processor runs (what shvit_kernels.backends.cpp would load here)."""
    import torch

    cpu = torch.backends.cpu.get_cpu_capability().upper()
    for cap in ("AVX512", "AVX2"):
        if cpu.startswith(cap):
            return cap
    return "DEFAULT"


def wanted_cpu_capabilities():
    # A wheel may be installed on any x86 processor: all variants. Built here for here: this processor's only.
    default = "all" if "bdist_wheel" in sys.argv else "native"
    wanted = os.environ.get("SHVIT_CPU_CAPABILITIES", default).strip()
    if wanted.lower() == "all":
        return list(ALL_CPU_CAPABILITIES)
    if wanted.lower() == "native":
        return [native_cpu_capability()]
    if wanted.lower() in ("", "none"):  # e.g. a CUDA-only build (tools/gpu_check.sh, .ci/build_cuda_ext.sh)
        return []
    caps = [c.strip().upper() for c in wanted.split(",") if c.strip()]
    unknown = [c for c in caps if c not in CPU_CAPABILITY_FLAGS]
    if unknown or not caps:
        raise SystemExit(
            f"SHVIT_CPU_CAPABILITIES={wanted!r}: expected 'native', 'all' or a comma-separated list of "
            f"{list(CPU_CAPABILITY_FLAGS)}"
        )
    return caps


def cpu_extensions(CppExtension):
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    headers = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.h")))
    if not sources:
        return []
    caps = wanted_cpu_capabilities()
    if not caps:
        return []
    print(f"shvit-kernels: building the C++ CPU extension for {', '.join(caps)} ({len(sources)} sources each)", flush=True)
    exts = []
    for cap in caps:
        exts.append(
            CppExtension(
                name=f"shvit_kernels._C_cpu_{cap.lower()}",
                sources=sources,
                # Headers too, so an in-place rebuild notices a changed header (ninja then recompiles what includes it).
                depends=headers,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=[("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)],
                extra_compile_args=["-O3", "-g0", "-fopenmp", "-std=c++17", *CPU_CAPABILITY_FLAGS[cap]],
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


# Warnings as errors for the kernels (csrc/cuda/*.cu include only CUDA headers, so this holds on any torch);
# CI sets SHVIT_CUDA_WERROR=1. The binding includes torch's headers and is left to the compiler's defaults.
NVCC_WERROR = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def cuda_extensions(CUDAExtension):
    kernels = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    bindings = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not kernels or not _want_cuda():
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3", "--use_fast_math"]
    if os.environ.get("SHVIT_CUDA_WERROR", "0") == "1":
        nvcc += NVCC_WERROR
    # No -std flag: torch's BuildExtension then adds the C++ standard its own headers need (C++20 in torch 2.13
    # and 2.14, C++17 in older releases), so one setup.py builds against each torch version.
    return [
        CUDAExtension(
            name="shvit_kernels._C_cuda",
            sources=bindings + kernels,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": nvcc},
        )
    ]


def extensions():
    if os.environ.get("SHVIT_NO_EXTENSIONS", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("shvit-kernels: torch is not importable at build time; building without compiled backends")
        return [], {}
    exts = cpu_extensions(CppExtension) + cuda_extensions(CUDAExtension)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
