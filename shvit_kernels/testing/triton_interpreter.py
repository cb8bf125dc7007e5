"""Running the Triton kernels' bfloat16 paths in Triton's CPU interpreter.

The interpreter stores bfloat16 as raw ``uint16`` bits. Two of its operations are then wrong: ``tl.dot``
multiplies those integers (every bf16 GEMM it runs is meaningless), and a float32 -> bfloat16 cast truncates
where GPUs round to nearest even (a bias of half an ulp per value, which grows through every sum over rounded
values). :func:`emulate_gpu_bf16` makes both do what a GPU does: the dot takes exact products (a bf16 x bf16
product is exact in fp32) summed in fp32 over the same tiles the kernel walks, as tensor cores do, and the cast
rounds to nearest even. With it the bf16 paths can be checked numerically on a CPU. It also computes
``input_precision="tf32x3"`` dots as NVIDIA GPUs do (the interpreter computes them exactly): each fp32 operand
split into a TF32 high part and a TF32 low part, and the three larger partial products summed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np


def _bf16_bits_as_fp32(data: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits -> the same values in float32 (bf16 is fp32's top half)."""
    return (data.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 rounded to nearest even (torch's conversion, as a GPU's), as uint16 bits."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


def _tf32(data: np.ndarray) -> np.ndarray:
    """float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero: ``cvt.rna.tf32.f32``)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32x3_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    mm = functools.partial(np.matmul, dtype=np.float32)
    return mm(a_lo, b_hi) + mm(a_hi, b_lo) + mm(a_hi, b_hi)


@contextlib.contextmanager
def emulate_gpu_bf16() -> Iterator[None]:
    """Within the block, the interpreter's ``tl.dot`` computes bf16 operands exactly with fp32 accumulation and
    tf32x3 dots as a GPU does, and its float32 -> bfloat16 casts round to nearest even."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder_type = type(interpreter.interpreter_builder)
    tf32x3 = getattr(getattr(getattr(interpreter, "_ir", None), "INPUT_PRECISION", None), "TF32x3", None)
    original_dot, original_cast = builder_type.create_dot, builder_type.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tf32x3 is not None and input_precision == tf32x3:
            out = _tf32x3_matmul(a.data, b.data).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        if a.dtype.scalar != tl.bfloat16 and b.dtype.scalar != tl.bfloat16:
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        a_data = _bf16_bits_as_fp32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
        b_data = _bf16_bits_as_fp32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
        out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder_type.create_dot, builder_type.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder_type.create_dot, builder_type.cast_impl = original_dot, original_cast
