"""Per-call backend choice for the fused ops.

Every op has a pure-PyTorch ``reference`` kernel (its spec) and may have faster kernels from other
backends. A backend kernel is registered with a ``not_supported_reasons`` function that returns why it
cannot take a given call (empty list: it can), and optionally a ``slower_reasons`` function naming calls it
can run but was measured slower on than the next backend. At run time the first backend in the device's
preference order with neither kind of reason wins; a forced backend ignores its ``slower_reasons``. Users can force a backend with :func:`use_backend` (context manager),
:func:`set_backend` (global) or the ``SHVIT_KERNELS_BACKEND`` environment variable; a forced backend that
cannot take a call raises an error listing its reasons instead of silently falling back.
:func:`prefer_backend` is the lenient form: the backend runs what it can and the usual order the rest.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple


BACKENDS = ("cuda", "triton", "cpp", "reference")
ENV_VAR = "SHVIT_KERNELS_BACKEND"

# Preference when nothing is forced. On CUDA the per-op order can be overridden by measured tables
# (see ``set_preference``); the default puts Triton first because it covers every op.
_DEFAULT_PREFERENCE: Dict[str, Sequence[str]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

Reasons = Callable[..., List[str]]


def always_ok(*args, **kwargs) -> List[str]:
    return []


@dataclass
class Backend:
    """A named group of kernels with a global availability check (extension built, package present)."""

    name: str
    availability: Callable[[], List[str]] = lambda: []
    kernels: Dict[str, Callable] = field(default_factory=dict)
    checks: Dict[str, Reasons] = field(default_factory=dict)
    slower: Dict[str, Reasons] = field(default_factory=dict)

    def unavailable_reasons(self) -> List[str]:
        return list(self.availability())

    def not_supported_reasons(self, op: str, *args, **kwargs) -> List[str]:
        reasons = self.unavailable_reasons()
        if reasons:
            return reasons
        if op not in self.kernels:
            return [f"backend '{self.name}' has no kernel for op '{op}'"]
        return list(self.checks[op](*args, **kwargs))

    def passed_over_reasons(self, op: str, *args, **kwargs) -> List[str]:
        """Why automatic dispatch skips this backend for the call: it cannot run it, or is measured slower."""
        reasons = self.not_supported_reasons(op, *args, **kwargs)
        if reasons:
            return reasons
        return list(self.slower.get(op, always_ok)(*args, **kwargs))


_backends: Dict[str, Backend] = {name: Backend(name) for name in BACKENDS}
_op_preference: Dict[tuple, Sequence[str]] = {}
_state = threading.local()
_global_forced: Optional[str] = None


def backend(name: str) -> Backend:
    if name not in _backends:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return _backends[name]


def set_availability(name: str, check: Callable[[], List[str]]) -> None:
    backend(name).availability = check


def register_kernel(
    op: str,
    backend_name: str,
    fn: Callable,
    not_supported_reasons: Reasons = always_ok,
    slower_reasons: Reasons = always_ok,
):
    """Register ``fn`` as ``backend_name``'s kernel for ``op``.

    Both reason functions receive the same arguments as ``fn`` and return a list of strings:
    ``not_supported_reasons`` why the kernel cannot run the call, ``slower_reasons`` why automatic dispatch
    should leave a call it can run to the next backend (measured slower there).
    """
    b = backend(backend_name)
    b.kernels[op] = fn
    b.checks[op] = not_supported_reasons
    b.slower[op] = slower_reasons


def set_preference(op: str, device_type: str, order: Sequence[str]) -> None:
    """Override the backend order for one op on one device type (used by measured dispatch tables)."""
    for name in order:
        backend(name)
    _op_preference[(op, device_type)] = tuple(order)


def _validate_forced(name: Optional[str]) -> Optional[str]:
    if name is None or name == "" or name == "auto":
        return None
    backend(name)
    return name


def _forced() -> Optional[Tuple[str, bool]]:
    """(backend, strict) from the innermost context manager, else set_backend, else the environment."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_forced is not None:
        return _global_forced, True
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            name = _validate_forced(env.strip().lower())
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None
        return (name, True) if name else None
    return None


def forced_backend() -> Optional[str]:
    """The backend forced (or preferred) by context manager, then by set_backend, then by the environment."""
    forced = _forced()
    return forced[0] if forced and forced[0] else None


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op in this process (``None`` or ``"auto"`` restores automatic choice)."""
    global _global_forced
    _global_forced = _validate_forced(name)


@contextlib.contextmanager
def use_backend(name: Optional[str], strict: bool = True) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread-local; ``None``/``"auto"`` means automatic).

    ``strict=False`` only prefers it: calls it cannot take go to the usual order instead of raising.
    """
    name = _validate_forced(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append((name, strict) if name else (None, True))
    try:
        yield
    finally:
        stack.pop()


def prefer_backend(name: Optional[str]):
    """Run each op on ``name`` where it has a kernel for the call, elsewhere on the usual order."""
    return use_backend(name, strict=False)


def preference(op: str, device_type: str) -> Sequence[str]:
    return _op_preference.get((op, device_type), _DEFAULT_PREFERENCE.get(device_type, ("reference",)))


def select(op: str, device_type: str, *args, **kwargs) -> Callable:
    """Return the kernel that will run ``op`` for these arguments."""
    forced = _forced()
    if forced is not None and forced[0] is not None:
        name, strict = forced
        reasons = backend(name).not_supported_reasons(op, *args, **kwargs)
        if not reasons:
            return backend(name).kernels[op]
        if strict:
            raise RuntimeError(
                f"shvit_kernels: backend '{name}' was forced but cannot run op '{op}': " + "; ".join(reasons)
            )
    for name in preference(op, device_type):
        b = _backends[name]
        if not b.passed_over_reasons(op, *args, **kwargs):
            return b.kernels[op]
    raise RuntimeError(f"shvit_kernels: no backend can run op '{op}' on {device_type}")


def chosen_backend(op: str, device_type: str, *args, **kwargs) -> str:
    """Name of the backend :func:`select` would use (for tests, info and benchmarks)."""
    fn = select(op, device_type, *args, **kwargs)
    for name, b in _backends.items():
        if b.kernels.get(op) is fn:
            return name
    raise AssertionError("selected kernel is not registered")


def ops() -> List[str]:
    return sorted(_backends["reference"].kernels)


def backend_table(device_type: Optional[str] = None) -> List[dict]:
    """One row per (backend, op): whether it is registered and available, and why not."""
    rows = []
    for name in BACKENDS:
        b = _backends[name]
        unavailable = b.unavailable_reasons()
        for op in ops():
            if op not in b.kernels:
                rows.append(dict(backend=name, op=op, usable=False, why=f"no '{op}' kernel"))
            else:
                rows.append(dict(backend=name, op=op, usable=not unavailable, why="; ".join(unavailable)))
    return rows
