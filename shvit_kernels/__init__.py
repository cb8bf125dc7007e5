"""shvit_kernels: fused SHViT ops as PyTorch custom ops, with per-call backend dispatch.

Functional API (all differentiable, torch.compile-able, autocast-aware):
    conv_bn, conv_bias_act, ffn, ffn_fused, shsa, shsa_fused, squeeze_excite, patch_embed, pooled_linear, fold_bn,
    fold_shsa, sync_batch_norm
Backend control:
    use_backend(name) / prefer_backend(name) (context managers), set_backend(name), env SHVIT_KERNELS_BACKEND
Looking in: the ``shvit_kernels.dispatch`` module (usable_backends, explain, observe, record, backend_table).
Autotuning (on by default for the inference ops): ``shvit_kernels.autotune`` (set_autotune, autotune(),
env SHVIT_KERNELS_AUTOTUNE, cached_choices).
Tracing and export:
    inline_reference() (context manager; automatic in torch.onnx.export): tracers record the reference's torch ops
    use_backend(name) / prefer_backend(name) (context managers), set_backend(name), env SHVIT_KERNELS_BACKEND, backend_table()
Replay:
    replay.KernelChain: a recorded chain of CPU kernel calls replayed without the Python between them (a fused
    SHViT's inference forward uses one per input signature)
Layout:
    to_channels_last(x): x.contiguous(memory_format=torch.channels_last), at copy speed for CPU image batches
Memory:
    empty_cache(packed_weights=True) frees the output blocks the cpp backend keeps for reuse (bounded by
    SHVIT_CPU_OUTPUT_CACHE_MB), and its packed weight copies unless packed_weights=False
    keep_conv_outputs(min_macs) (context manager) / set_keep_conv_outputs(min_macs), env
    SHVIT_KERNELS_KEEP_CONV_OUTPUTS: which training Conv+BN ops keep their conv output for backward (faster)
    instead of recomputing it (less memory)
    recompute_cheap_tensors() (context manager; SHViT's training forward enters it): tensors cheap to recompute
    (a Conv+BN output from its kept conv output) are recomputed in the backward instead of held
"""

from . import autotune, dispatch
from .dispatch import BACKENDS, backend_table, chosen_backend, forced_backend, prefer_backend, set_backend, use_backend
from .ops.conv_bn import conv_bias_act, conv_bn, fold_bn, keep_conv_outputs, set_keep_conv_outputs
from .ops._recompute import recompute_cheap_tensors
from .ops.ffn import ffn, ffn_fused
from .ops.shsa import fold_shsa, shsa, shsa_fused
from .ops.squeeze_excite import squeeze_excite
from .ops.patch_embed import patch_embed
from .ops.pooled_linear import pooled_linear
from .ops.sync_batch_norm import sync_batch_norm
from .tracing import inline_reference
from . import backends as _backends  # registers the compiled / Triton kernels that are present
from .layout import to_channels_last
from . import replay

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
__version__ = "0.1.0"


def empty_cache(packed_weights: bool = True) -> int:
    """Free the output blocks the cpp backend keeps for reuse; returns the bytes freed (0 when it has none).

    Outputs of 256 KiB and more reuse released blocks of the same size (at most 4 per size and
    ``SHVIT_CPU_OUTPUT_CACHE_MB`` MiB in all, default 512; ``SHVIT_CPU_OUTPUT_CACHE=0`` turns the cache off); a call
    that needs a size the cache lacks frees the blocks no call has taken for 64 allocations.
    Like ``torch.cuda.empty_cache``, call it after a run at sizes that will not come again. Unless
    ``packed_weights=False`` it also forgets the packed weight copies the cpp backend keeps (a weight still in use
    is repacked on its next call).
    """
    if not isinstance(packed_weights, bool):
        raise TypeError(f"empty_cache: 'packed_weights' must be a bool, got {type(packed_weights).__name__}")
    if packed_weights:
        _backends.cpp.clear_packed_weights()
    return _backends.cpp.empty_output_cache()

__all__ = [
    "BACKENDS",
    "autotune",
    "backend_table",
    "chosen_backend",
    "conv_bias_act",
    "conv_bn",
    "dispatch",
    "empty_cache",
    "ffn",
    "ffn_fused",
    "fold_bn",
    "fold_shsa",
    "forced_backend",
    "inline_reference",
    "keep_conv_outputs",
    "patch_embed",
    "pooled_linear",
    "prefer_backend",
    "recompute_cheap_tensors",
    "replay",
    "set_backend",
    "set_keep_conv_outputs",
    "shsa",
    "shsa_fused",
    "squeeze_excite",
    "sync_batch_norm",
    "to_channels_last",
    "use_backend",
]
