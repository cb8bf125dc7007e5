"""How the ops look to tracers and exporters.

* :func:`inline_reference`: while it is active, and always during ``torch.onnx.export``, every traced op call
  runs its pure-PyTorch reference kernel as ordinary torch ops instead of the ``shvit::`` custom op, so
  ``torch.jit.trace``, ``torch.export`` and both ONNX exporters record standard aten ops (which ONNX has
  equivalents for). Plain eager calls are unaffected: they already run the chosen kernel directly.
* :func:`untraced_check`: argument checks read shapes to validate them, not to compute with them. Under
  ``torch.jit.trace`` each comparison of a traced size would emit a TracerWarning although a constant
  result is exactly what the trace should hold, so the checks run with TracerWarnings silenced.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, List, Optional

import torch

__all__ = ["inline_reference", "inlining_reference", "untraced_check"]

# A module global rather than a threading.local: torch.compile reads it as a guarded constant.
_enabled: List[Optional[bool]] = [None]


@contextlib.contextmanager
def inline_reference(enabled: bool = True) -> Iterator[None]:
    """Trace the ops as their reference torch code (process-wide; nests; ``enabled=False`` turns it off inside)."""
    previous = _enabled[0]
    _enabled[0] = bool(enabled)
    try:
        yield
    finally:
        _enabled[0] = previous


def _tracing_or_exporting() -> bool:
    return torch.jit.is_tracing() or _is_exporting()


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def inlining_reference() -> bool:
    """True inside :func:`inline_reference` or during ``torch.onnx.export`` (unless turned off explicitly).

    The exporter's flag is only asked while something traces (it costs microseconds, and op calls off the
    eager fast path, e.g. in training, happen a hundred times per step).
    """
    enabled = _enabled[0]
    if enabled is not None:
        return enabled
    return _tracing_or_exporting() and torch.onnx.is_in_onnx_export()


def untraced_check(fn):
    """Decorator for argument checks: under ``torch.jit.trace`` they run with TracerWarnings silenced."""

    @functools.wraps(fn)
    def check(*args, **kwargs):
        if not torch.jit.is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return fn(*args, **kwargs)

    return check
