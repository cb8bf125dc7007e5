"""What the Triton kernels implement, written once: read by the backend's per-call reasons (without importing
Triton) and by the kernels' own argument checks."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FFN_MAX_C = 1024  # ffn_fused keeps a (tokens x C) tile on chip
SHSA_MAX_P = 128  # the SHSA kernels hold the P x tokens slice on chip
SHSA_MAX_QK_DIM = 64


def conv_kind(weight, groups, c_in):
    """'dense', 'depthwise', or None for a grouping the kernels do not implement."""
    if groups == 1:
        return "dense"
    if groups == c_in and weight.shape[0] == c_in and weight.shape[1] == 1:
        return "depthwise"
    return None
