"""cpp backend: vectorized C++ CPU kernels (``csrc/cpu``), built once per instruction set.

``setup.py`` builds ``shvit_kernels._C_cpu_{avx512,avx2,default}`` from the same sources; this module loads the
best one the processor supports (``torch.backends.cpu.get_cpu_capability()``), falling back to lower ones. If
none loads, the backend stays registered but unavailable, with the reason, and the reference ops run instead.
Kernels take fp32 or bf16 (fp32 accumulation) in NCHW or channels_last; other dtypes and shapes are declined
through each op's ``not_supported_reasons``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Dict, List, Optional

import torch

from .. import autotune, dispatch

BACKEND = "cpp"
# Best first; a processor that has a capability can run every one after it.
CAPABILITIES = ("AVX512", "AVX2", "DEFAULT")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

_module: Optional[ModuleType] = None
_load_errors: Dict[str, str] = {}


def _module_name(capability: str) -> str:
    return f"shvit_kernels._C_cpu_{capability.lower()}"


def runnable_capabilities() -> List[str]:
    """The builds this processor can run, best first."""
    cpu = torch.backends.cpu.get_cpu_capability().upper()
    for i, cap in enumerate(CAPABILITIES):
        if cpu.startswith(cap):
            return list(CAPABILITIES[i:])
    return ["DEFAULT"]


def load_variant(capability: str) -> ModuleType:
    """Import one build (raises ImportError if it is missing or cannot load)."""
    capability = capability.upper()
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown CPU capability {capability!r}; expected one of {CAPABILITIES}")
    if capability not in runnable_capabilities():
        raise ImportError(f"this processor ({torch.backends.cpu.get_cpu_capability()}) cannot run the {capability} build")
    return importlib.import_module(_module_name(capability))


def _load_best() -> Optional[ModuleType]:
    for cap in runnable_capabilities():
        try:
            return load_variant(cap)
        except ImportError as e:  # not built, or built against another torch
            _load_errors[cap] = str(e)
    return None


def variant() -> Optional[str]:
    """The capability of the build in use (None when the backend is unavailable)."""
    return None if _module is None else _module.CPU_CAPABILITY


def set_variant(capability: Optional[str]) -> Optional[str]:
    """Switch the build the kernels call (None: the best one); returns the previous capability. For tests."""
    global _module
    previous, products = variant(), (_module.bf16_products() if _module is not None else None)
    _module = _load_best() if capability is None else load_variant(capability)
    if products is not None and _module is not None:
        try:  # each build keeps its own setting: carry it over where the new build can run it
            _module.set_bf16_products(products)
        except RuntimeError:
            _module.set_bf16_products("auto")
    autotune.settings_changed()
    return previous


def bf16_products() -> Optional[str]:
    """How the kernels multiply bf16 now: ``"dot"`` (bf16 pair products: AVX512_BF16 or AMX) or ``"fp32"``
    (operands widened, exactly, and multiplied by fp32 FMAs); both accumulate in fp32. None when the backend is
    unavailable. The default (``"auto"``) times both once per process and keeps the faster."""
    if _module is None:
        return None
    return "fp32" if _module.bf16_widened() else "dot"


def pointwise_grads(dtype: torch.dtype = torch.float32) -> Optional[str]:
    """The GEMMs a training Conv+BN's 1x1 channels_last conv gradients in ``dtype`` run on: ``"brgemm"`` (oneDNN's
    micro-kernel, fp32), ``"brgemm_bf16"`` (the micro-kernel multiplying bf16 pairs, for bf16 where bf16 GEMMs are
    multiplied as pairs: see :func:`bf16_products`) or ``"aten"`` (ATen's mm in fp32, MKL's sgemm where torch has it,
    a third as fast on AMD Zen 5). For fp32 the faster is timed once per process;
    ``SHVIT_CPU_POINTWISE_GRADS=brgemm|aten`` forces the micro-kernel or ATen's. None when the backend is
    unavailable."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pointwise_grads: 'dtype' must be torch.float32 or torch.bfloat16, got {dtype}")
    if _module is None or not hasattr(_module, "pointwise_grads"):
        return None
    return str(_module.pointwise_grads(str(dtype).removeprefix("torch.")))


def kxk_grads_choices() -> List[str]:
    """The path each depthwise or dense kxk training Conv+BN gradient shape of this process took, timed at its first
    call: ``"aten"`` (ATen's fp32 convolution backward), ``"aten_bf16"`` (its bf16 one), ``"brgemm"`` (the micro-kernel
    GEMMs) or ``"depthwise"`` (this extension's depthwise kernel), one line per shape, dtype and thread count, e.g.
    ``"batch 16 3x224x224 -> 16x112x112 k3x3 s2 g1 bf16 threads 2: aten_bf16"``. Empty before any such call or when the
    backend is unavailable."""
    if _module is None or not hasattr(_module, "kxk_grads_choices"):
        return []
    return [str(line) for line in _module.kxk_grads_choices()]


def fp32_gemm() -> Optional[str]:
    """What fp32 channels_last 1x1 convolutions and FFN GEMMs run on: ``"tiles"`` (this extension's AVX-512 register
    tiles, bias / residual / ReLU applied in registers) or ``"brgemm"`` (oneDNN's micro-kernel, then an epilogue
    pass). The default (``"auto"``) times both once per process on the first such call and keeps the tiles unless
    brgemm is 3% faster;
    ``SHVIT_CPU_FP32_GEMM=tiles|brgemm`` or :func:`set_fp32_gemm` forces one. None when the backend is
    unavailable."""
    if _module is None or not hasattr(_module, "fp32_tiles_active"):
        return None
    return "tiles" if _module.fp32_tiles_active() else "brgemm"


def set_fp32_gemm(mode: str) -> str:
    """``"auto"``, ``"tiles"`` or ``"brgemm"`` (also ``SHVIT_CPU_FP32_GEMM``); returns the previous setting.
    ``"tiles"`` raises where the build in use has no AVX-512."""
    if _module is None:
        raise RuntimeError("set_fp32_gemm: the cpp backend is unavailable: " + "; ".join(_availability()))
    return str(_module.set_fp32_gemm(mode))


def dense_conv_bf16() -> Optional[str]:
    """What bf16 channels_last dense kxk convolutions (the stem's), and 1x1 ones with an even channel count, run on:
    ``"pairs"`` (this extension's register-blocked AVX512_BF16 pair products), ``"rows"`` (a bf16 GEMM per kernel
    row on ATen's micro-kernel, three input channels widened to fp32; 1x1 on its GEMM tiles) or ``"fp32"`` (widened,
    the fp32 kernels). None when the backend is unavailable."""
    if _module is None or not hasattr(_module, "dense_conv_bf16"):
        return None
    return str(_module.dense_conv_bf16())


def dense_conv_blocks() -> Optional[str]:
    """How the fp32 register-blocked dense kxk convolutions (channels_last; bf16 when widened) split their output
    channels into blocks: ``"auto"`` (the default: each shape's fastest plan, timed on one output row at its first
    call; every plan gives bit-identical results), ``"pairs"`` (two channel vectors per block), ``"threes"`` or
    ``"fours"`` (that many, then one block of the rest; AVX-512 builds). ``SHVIT_CPU_DENSE_CONV_BLOCKS`` or
    :func:`set_dense_conv_blocks` forces one. None when the backend is unavailable."""
    if _module is None or not hasattr(_module, "dense_conv_blocks"):
        return None
    return str(_module.dense_conv_blocks())


def set_dense_conv_blocks(mode: str) -> str:
    """``"auto"``, ``"pairs"``, ``"threes"`` or ``"fours"`` (also ``SHVIT_CPU_DENSE_CONV_BLOCKS``); returns the
    previous setting. ``"threes"`` and ``"fours"`` raise where the build in use has no AVX-512."""
    if _module is None:
        raise RuntimeError("set_dense_conv_blocks: the cpp backend is unavailable: " + "; ".join(_availability()))
    return str(_module.set_dense_conv_blocks(mode))


def dense_conv_channel_blocks(c_in: int, c_out: int, h: int, w: int, kernel: int = 3, stride: int = 1,
                              padding: int = 1) -> Optional[List[int]]:
    """Channel vectors per block the current mode gives a dense ``kernel`` x ``kernel`` convolution of this shape
    (``[]``: ``"auto"`` has not timed it yet). None when the backend is unavailable."""
    if _module is None or not hasattr(_module, "dense_conv_channel_blocks"):
        return None
    return [int(v) for v in _module.dense_conv_channel_blocks(c_in, c_out, h, w, kernel, stride, padding)]


def bf16_pair_unit() -> Optional[str]:
    """What the bf16 pair kernels (channels_last 1x1 and dense convs, the FFN) multiply on: ``"amx"`` (AMX tiles,
    Intel Sapphire Rapids and later), ``"avx512_bf16"`` (VDPBF16PS) or ``"none"`` (they do not run: ATen's
    micro-kernel paths or widened fp32). None when the backend is unavailable."""
    if _module is None or not hasattr(_module, "bf16_pair_unit"):
        return None
    return str(_module.bf16_pair_unit())


def set_amx_tiles(on: bool) -> bool:
    """Run the bf16 pair kernels on AMX tiles where the processor has them (True, the default; ``SHVIT_CPU_AMX=0``
    starts with False) or on VDPBF16PS; returns the previous setting."""
    if _module is None:
        raise RuntimeError("set_amx_tiles: the cpp backend is unavailable: " + "; ".join(_availability()))
    previous = bool(_module.set_amx_tiles(bool(on)))
    autotune.settings_changed()
    return previous


def peak_gflops(kind: str) -> float:
    """One core's arithmetic peak, measured by a register-resident loop of the build in use (tens of ms):
    ``"fp32_fma"``, ``"bf16_dot"`` (512-bit VDPBF16PS) or ``"amx_bf16"`` (AMX tile multiplies). 0.0 where the build
    or processor has none."""
    if _module is None:
        return 0.0
    return float(_module.peak_gflops(kind))


def set_bf16_products(mode: str) -> str:
    """``"auto"``, ``"dot"`` or ``"fp32"`` (also ``SHVIT_CPU_BF16_PRODUCTS``); returns the previous setting.
    ``"dot"`` raises where the bf16 micro-kernel cannot run."""
    if _module is None:
        raise RuntimeError("set_bf16_products: the cpp backend is unavailable: " + "; ".join(_availability()))
    previous = _module.set_bf16_products(mode)
    autotune.settings_changed()
    return previous


def build_id() -> Optional[str]:
    """The build in use as its capability, file size and modification time (None when unavailable). Part of the
    autotune machine key: choices timed against one build of the kernels are not reused for another, so a rebuilt
    or upgraded extension is measured afresh (the package version alone stays the same across development builds)."""
    if _module is None:
        return None
    path = getattr(_module, "__file__", None)
    if not path or not os.path.exists(path):
        return _module.CPU_CAPABILITY
    st = os.stat(path)
    return f"{_module.CPU_CAPABILITY}-{st.st_size}-{st.st_mtime_ns}"


def extension() -> Optional[ModuleType]:
    """The loaded build (its functions are the kernels, without the ops' Python checks), or None."""
    return _module


def output_cache_bytes() -> int:
    """Bytes the build in use keeps in released output blocks for reuse."""
    return int(_module.cached_output_bytes()) if _module is not None else 0


def set_output_cache_limit(nbytes: int) -> int:
    """Bound the output-block cache of the build in use (0: keep none); returns the previous bound in bytes."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"'nbytes' must be a non-negative int, got {nbytes!r}")
    if _module is None:
        raise RuntimeError("the cpp backend is unavailable: " + "; ".join(_availability()))
    return int(_module.set_output_cache_limit(nbytes))


def _loaded_builds_with(function: str) -> List[ModuleType]:
    """The builds imported in this process (tests may load several) that have ``function``."""
    import sys

    loaded = [sys.modules.get(_module_name(c)) for c in CAPABILITIES]
    return [m for m in loaded if m is not None and hasattr(m, function)]


def empty_output_cache() -> int:
    """Free the output blocks every loaded build keeps for reuse; returns the bytes freed."""
    return sum(int(m.release_cached_outputs()) for m in _loaded_builds_with("release_cached_outputs"))


def packed_weight_count() -> int:
    """Packed / widened weight copies the build in use remembers (one per weight and form, rebuilt when the weight
    changes in place, dropped when it is freed)."""
    return int(_module.derived_weight_count()) if _module is not None else 0


def clear_packed_weights() -> int:
    """Forget the packed weight copies of every loaded build (the next call repacks); returns how many there were."""
    return sum(int(m.clear_derived_weights()) for m in _loaded_builds_with("clear_derived_weights"))


def _availability() -> List[str]:
    if _module is not None:
        return []
    tried = "; ".join(f"{_module_name(c)}: {msg}" for c, msg in _load_errors.items()) or "nothing to load"
    return [f"the C++ CPU extension is not built or failed to load ({tried})"]


# ---------------------------------------------------------------------------------------------------------------
# Per-call reasons, called with the call's arguments by name.
# ---------------------------------------------------------------------------------------------------------------
# Arguments the kernels read in x's dtype; biases and normalisation parameters / statistics may be fp32.
SAME_DTYPE_AS_X = ("weight", "w1", "w2", "w3", "w4", "qkv_weight", "residual", "grad_out", "out")


def dtype_reasons(x, **args) -> List[str]:
    """Any op: fp32 or bf16, with the activations and weights in x's dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        return [f"the cpp backend implements float32 and bfloat16 only, got {x.dtype}"]
    for name in SAME_DTYPE_AS_X:
        t = args.get(name)
        if t is not None and t.dtype != x.dtype:
            return [f"the cpp backend needs '{name}' in x's dtype {x.dtype}, got {t.dtype}"]
    return []


def conv_bn_train_output_reasons(conv_output, mean, var, **_) -> List[str]:
    """conv_bn_train_output: a conv output in fp32 or bf16 with the forward's fp32 statistics."""
    reasons = dtype_reasons(conv_output)
    if mean.dtype != torch.float32 or var.dtype != torch.float32:
        reasons.append(f"the cpp backend takes the statistics in float32, got {mean.dtype} and {var.dtype}")
    return reasons


def conv_support_reasons(x, weight, stride, padding, groups, **args) -> List[str]:
    """Why the C++ convolutions cannot run this call (dense: any kernel; grouped: depthwise 3x3 only)."""
    reasons = dtype_reasons(x, weight=weight, **args)
    kernel = tuple(weight.shape[2:])
    if groups == 1:
        return reasons
    depthwise = groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
    if depthwise and kernel == (3, 3) and padding == 1 and stride in (1, 2):
        return reasons
    return reasons + [
        "the cpp backend implements grouped convolutions only as depthwise 3x3 with padding 1 and stride 1 or 2; "
        f"got groups={groups}, weight {tuple(weight.shape)}, stride {stride}, padding {padding}"
    ]


def _is_channels_last(x) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def conv_slower_reasons(x, weight, stride, padding, groups, **_) -> List[str]:
    """Convolutions the C++ kernels run but were measured slower on than ATen's oneDNN ones (1 thread, batch 16)."""
    if groups == 1:
        if tuple(weight.shape[2:]) == (1, 1) and stride == 1 and padding == 0:
            return []
        # Stem convs 3x3 stride 2, batch 16, channels_last, ms, oneDNN incl. ReLU / cpp (2026-11-25, 1 thread):
        # fp32 S1 3->16 2.06/1.44, 16->32 4.21/2.84, 32->64 2.22/2.24, 64->128 1.90/1.96; S4 28->56 12.7/11.1,
        # 56->112 9.09/9.64, 112->224 8.47/7.94 (2 threads: 0.96-1.54x). bf16 widened to fp32 (the same register-
        # blocked kernel), Intel Xeon family 6 model 207, 2026-12-01, S1: 3->16 4.76/3.55, 16->32 6.17/4.54, 32->64
        # 5.53/3.70, 64->128 5.17/3.50. bf16 on this extension's pair kernel ("pairs"), AMD Zen 5, 2026-12-02, oneDNN
        # / cpp per round: S1 1.14x, 1.07x, 0.93x, 1.00x, S4 (3->28 ...) 1.26x, 1.21x, 0.95x, 1.08x (the stem
        # 5.8 vs 6.1 ms, 19.4 vs 21.7 ms); bf16 on kernel-row GEMMs ("rows"): slower on all (0.6-0.9x).
        if _is_channels_last(x) and (x.dtype == torch.float32 or dense_conv_bf16() in ("pairs", "fp32")):
            return []
        return [
            "dense (groups=1) kxk convolutions go to ATen except in channels_last in fp32 or bf16 on pair products or "
            "widened to fp32: the cpp kernels measured slower than oneDNN's on the rest; got weight "
            f"{tuple(weight.shape)}, stride {stride}, {x.dtype}, {'channels_last' if _is_channels_last(x) else 'NCHW'}, "
            f"bf16 dense convs on {dense_conv_bf16()}"
        ]
    if not _is_channels_last(x):
        # The NCHW stencil measured at about half the speed of ATen's.
        return ["NCHW depthwise convolutions go to ATen: the cpp NCHW stencil measured slower than oneDNN's"]
    return []


# Widest FFN whose backward was measured faster than the reference (1 thread, batch 16, S1 shapes): its five GEMMs
# go through MKL's sgemm, which from C = 224 on is slower than the oneDNN convolutions the reference calls.
FFN_BACKWARD_MAX_CHANNELS = 128


def ffn_backward_slower_reasons(x, **_) -> List[str]:
    if x.dim() == 4 and x.shape[1] > FFN_BACKWARD_MAX_CHANNELS:
        return [
            f"the cpp ffn_fused_backward is automatic up to {FFN_BACKWARD_MAX_CHANNELS} channels (measured slower "
            f"than the reference's oneDNN convolutions above that), got {x.shape[1]}"
        ]
    return []


# The backward convs (ATen's convolution_backward inside the C++ function) and conv_bn_train (ATen's conv and mean,
# this extension's variance and normalisation; measured faster than the reference on every S1 layer) take any conv
# shape. SHSA: whole-image N x N scores per thread (no key tiling), any shape, 1x1 maps included.
NOT_SUPPORTED = {
    "conv_bias_act": conv_support_reasons,
    "conv_bias_act_backward": dtype_reasons,
    "conv_bn_train": dtype_reasons,
    "conv_bn_train_backward": dtype_reasons,
    "conv_bn_train_output": conv_bn_train_output_reasons,
    "ffn_fused": dtype_reasons,
    "ffn_fused_backward": dtype_reasons,
    "shsa_fused": dtype_reasons,
    "shsa_fused_backward": dtype_reasons,
    "squeeze_excite": dtype_reasons,
    "patch_embed": dtype_reasons,
    "pooled_linear": dtype_reasons,
    "shsa_train": dtype_reasons,
    "shsa_train_backward": dtype_reasons,
}

# Calls a kernel can run but automatic dispatch leaves to the reference (measured slower); forcing cpp runs them.
SLOWER = {
    "conv_bias_act": conv_slower_reasons,
    "ffn_fused_backward": ffn_backward_slower_reasons,
}


def _kernel(name: str):
    def run(*args):
        return getattr(_module, name)(*dispatch.with_defaults(name, args))

    run.__name__ = f"cpp_{name}"
    # The compiled function itself, for a caller that passes every argument (a replayed kernel chain): without the
    # two Python calls above, which cost S1's replayed batch-1 forward 0.11-0.14 ms of 7 (Intel Xeon 6/167).
    run.compiled = lambda: getattr(_module, name)
    return run


_module = _load_best()
# Whether bf16 is multiplied in pairs or widened decides which backend is fastest for a bf16 call.
autotune.register_setting("cpu_bf16_products", bf16_products)
autotune.register_setting("cpu_bf16_pair_unit", bf16_pair_unit)
autotune.register_setting("cpu_build", build_id)
# Not pointwise_grads(): a timing that may come out either way where both paths are close would change the key, and
# so drop every tuned choice, from one process to the next; and inference never runs it.
dispatch.register_backend(
    BACKEND,
    device_types=("cpu",),
    availability=_availability,
    kernels={op: _kernel(op) for op in NOT_SUPPORTED},
    not_supported=NOT_SUPPORTED,
    slower=SLOWER,
)

if _module is None:
    warnings.warn(
        "shvit_kernels: the C++ CPU backend is unavailable, so CPU ops run the PyTorch reference kernels: "
        + "; ".join(_availability()),
        RuntimeWarning,
        stacklevel=2,
    )
