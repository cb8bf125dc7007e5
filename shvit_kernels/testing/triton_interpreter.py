"""Running the Triton kernels' bfloat16 paths in Triton's CPU interpreter.

The interpreter stores bfloat16 as raw ``uint16`` bits. Two of its operations are then wrong: ``tl.dot``
multiplies those integers (every bf16 GEMM it runs is meaningless), and a float32 -> bfloat16 cast truncates
where GPUs round to nearest even (a bias of half an ulp per value, which grows through every sum over rounded
values). :func:`emulate_gpu_bf16` makes both do what a GPU does: the dot takes exact products (a bf16 x bf16
product is exact in fp32) summed in fp32 over the same tiles the kernel walks, as tensor cores do, and the cast
rounds to nearest even. With it the bf16 paths can be checked numerically on a CPU.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def emulate_gpu_bf16() -> Iterator[None]:
    """Within the block, the interpreter's ``tl.dot`` computes bf16 operands exactly with fp32 accumulation, and
    its float32 -> bfloat16 casts round to nearest even."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder_type = type(interpreter.interpreter_builder)
    original_dot, original_cast = builder_type.create_dot, builder_type.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
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
