"""Per-call backend choice for the fused ops: the public face of the dispatcher.

Every op has a pure-PyTorch ``reference`` kernel (its spec) and may have faster kernels from other backends.
A backend registers once, through :func:`register_backend`, with one vocabulary:

* ``availability``: why it cannot run at all here (extension not built, no CUDA device); empty list: it can;
* ``kernels``: op name -> kernel, called with the op's schema arguments in order;
* ``not_supported``: op name -> why its kernel cannot take a call (empty list: it can);
* ``slower``: op name -> why automatic choice should leave a call it can run to the next backend (measured
  slower there); a forced backend ignores these.

Reasons functions receive the call's arguments by keyword, under their schema names, and take only those they
need (``def reasons(x, weight, groups, **_)``), so a schema change touches the schema, the reference and the
kernels, not every reasons function.

At run time the first backend in the device's order (:data:`DEFAULT_ORDER`) with neither kind of reason wins,
unless the call is autotuned (``shvit_kernels.autotune``: on by default for the inference ops), where the
backends that can run it are timed on the signature's first call and the fastest is remembered.
Users force a backend with :func:`use_backend` (context manager, thread-local), :func:`set_backend` (global) or
the ``SHVIT_KERNELS_BACKEND`` environment variable; a forced backend that cannot take a call raises an error
listing its reasons instead of silently falling back. :func:`prefer_backend` is the lenient form: the backend
runs what it can and the usual order the rest. When no backend can take a call the error lists every backend's
reasons. Backends registered with ``verify_first_use`` (triton and cuda, not yet run on a GPU) have each call
signature's first result checked against the reference; a kernel that fails is disabled for that signature
with one warning and the reference's result is used (:func:`set_verify`, ``SHVIT_KERNELS_VERIFY=0``: off).

Looking in:

* :func:`usable_backends` the backends that can run kernels on a device type here;
* :func:`explain` every backend's reasons for one call and the backend and kernel chosen (a :class:`Choice`);
* :func:`observe` / :func:`record` see each kernel call as it runs (tests, profilers);
* :func:`selection_state` what, besides a call's arguments, its choice depends on (the ops remember plain eager
  calls' choices under it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from . import autotune
from ._env import EnvSetting

BACKENDS = ("cuda", "triton", "cpp", "reference")
ENV_VAR = "SHVIT_KERNELS_BACKEND"

# Order when nothing is forced. Triton comes first on CUDA because it covers every op.
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

Reasons = Callable[..., List[str]]

__all__ = [
    "BACKENDS",
    "Choice",
    "DEFAULT_ORDER",
    "DispatchedCall",
    "ENV_VAR",
    "NoBackendError",
    "backend_table",
    "chosen_backend",
    "explain",
    "forced_backend",
    "kernel",
    "observe",
    "op_arguments",
    "ops",
    "order",
    "patched_backend",
    "prefer_backend",
    "record",
    "register_backend",
    "set_backend",
    "set_verify",
    "reset_first_use_checks",
    "selection_state",
    "unavailable_reasons",
    "usable_backends",
    "use_backend",
]


@dataclass
class _Backend:
    """A named group of kernels: what :func:`register_backend` was given for one backend."""

    name: str
    device_types: Optional[Tuple[str, ...]] = None  # None: any device type
    availability: Callable[[], List[str]] = lambda: []
    kernels: Dict[str, Callable] = field(default_factory=dict)
    not_supported: Dict[str, Reasons] = field(default_factory=dict)
    slower: Dict[str, Reasons] = field(default_factory=dict)
    verify_first_use: bool = False  # check each call signature's first result against the reference

    def not_supported_reasons(self, op: str, device_type: str, args: Mapping[str, object]) -> List[str]:
        if self.device_types is not None and device_type not in self.device_types:
            return [f"backend '{self.name}' runs on {', '.join(self.device_types)} only, not {device_type}"]
        reasons = list(self.availability())
        if reasons:
            return reasons
        if op not in self.kernels:
            return [f"backend '{self.name}' has no kernel for op '{op}'"]
        check = self.not_supported.get(op)
        reasons = list(check(**args)) if check is not None else []
        if not reasons and self.verify_first_use and _failed_first_use:
            failure = _failed_first_use.get((self.name, autotune.signature(op, device_type, tuple(args.values()))))
            if failure is not None:
                reasons.append(f"disabled for this call signature: its first result failed the check against the "
                               f"reference ({failure})")
        return reasons

    def slower_reasons(self, op: str, args: Mapping[str, object]) -> List[str]:
        check = self.slower.get(op)
        return list(check(**args)) if check is not None else []


_backends: Dict[str, _Backend] = {name: _Backend(name) for name in BACKENDS}
_op_arguments: Dict[str, Tuple[str, ...]] = {}
_op_defaults: Dict[str, Tuple[Any, ...]] = {}  # values of the trailing arguments that have a schema default
_state = threading.local()
_global_forced: Optional[str] = None
_observers: Tuple[Callable, ...] = ()
_observers_lock = threading.Lock()
VERIFY_ENV_VAR = "SHVIT_KERNELS_VERIFY"
_verify: Optional[bool] = None  # set_verify; None: the environment, else on
_verified_first_use: set = set()  # (backend, signature) whose first result matched the reference
_failed_first_use: Dict[Tuple[str, str], str] = {}  # (backend, signature) -> why its first result was rejected
_verify_lock = threading.Lock()
_generation = 0  # bumped by every change that can alter a choice (see selection_state)


def _choices_changed() -> None:
    global _generation
    _generation += 1


def selection_state() -> tuple:
    """Everything besides the call's own arguments that a choice depends on: registrations, verification
    results, this thread's forced backend and autotune mode, the tuned choices. Equal states and equal call
    signatures select the same kernel, so a caller may remember the choice per (state, signature)."""
    return _generation, autotune.generation(), _forced(), autotune.mode(), verify_enabled()


def _backend(name: str) -> _Backend:
    if name not in _backends:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return _backends[name]


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
def define_op_arguments(op: str, names: Sequence[str], defaults: Sequence[Any] = ()) -> None:
    """Record an op's schema argument names (``define_op`` does this), by which reasons functions are called, and
    the defaults of its trailing arguments."""
    _op_arguments[op] = tuple(names)
    _op_defaults[op] = tuple(defaults)


def with_defaults(op: str, args: Sequence[Any]) -> Tuple[Any, ...]:
    """``args`` completed with the schema defaults of the trailing arguments left out: every kernel gets them all
    (a custom-op call passes only those given)."""
    missing = len(_op_arguments[op]) - len(args)
    if missing <= 0:
        return tuple(args)
    defaults = _op_defaults[op]
    if missing > len(defaults):
        raise TypeError(f"{op}: expected {len(_op_arguments[op])} arguments {_op_arguments[op]}, got {len(args)}")
    return (*args, *defaults[len(defaults) - missing:])


def op_arguments(op: str) -> Tuple[str, ...]:
    """The schema argument names of ``op``, in order."""
    if op not in _op_arguments:
        raise ValueError(f"unknown op {op!r}; expected one of {ops()}")
    return _op_arguments[op]


def register_backend(
    name: str,
    *,
    device_types: Optional[Sequence[str]] = None,
    availability: Optional[Callable[[], List[str]]] = None,
    kernels: Optional[Mapping[str, Callable]] = None,
    not_supported: Optional[Mapping[str, Reasons]] = None,
    slower: Optional[Mapping[str, Reasons]] = None,
    verify_first_use: Optional[bool] = None,
) -> None:
    """Register (or extend) backend ``name``: the one way a backend tells the dispatcher what it has.

    ``device_types``: the device types its kernels run on (None: any). ``availability()``: why it cannot run at
    all. ``kernels``: op -> kernel taking the op's schema arguments positionally. ``not_supported`` and
    ``slower``: op -> reasons function called with the call's arguments by name (see the module docstring).
    ``verify_first_use``: check each call signature's first result against the reference (see
    :func:`set_verify`; for backends not yet verified on real hardware).
    Given parts replace what was registered under the same keys; parts not given stay.
    """
    b = _backend(name)
    for part, ops_ in (("not_supported", not_supported), ("slower", slower)):
        extra = set(ops_ or ()) - set(kernels or ()) - set(b.kernels)
        if extra:
            raise ValueError(f"register_backend({name!r}): {part} reasons for ops without a kernel: {sorted(extra)}")
    if device_types is not None:
        b.device_types = tuple(device_types)
    if availability is not None:
        b.availability = availability
    if verify_first_use is not None:
        b.verify_first_use = verify_first_use
    b.kernels.update(kernels or {})
    b.not_supported.update(not_supported or {})
    b.slower.update(slower or {})
    _choices_changed()


@contextlib.contextmanager
def patched_backend(name: str, *, start_empty: bool = False, **registration) -> Iterator[None]:
    """Inside the block, backend ``name`` is registered as it is plus ``registration`` (the arguments of
    :func:`register_backend`), or as ``registration`` alone with ``start_empty=True``; restored afterwards.

    For tests and experiments: plant a kernel, make a backend (un)available, fake a measured-slower rule.
    """
    saved = _backend(name)
    if start_empty:
        patched = _Backend(name, device_types=saved.device_types, verify_first_use=saved.verify_first_use)
    else:
        patched = dataclasses.replace(
            saved, kernels=dict(saved.kernels), not_supported=dict(saved.not_supported), slower=dict(saved.slower)
        )
    _backends[name] = patched
    try:
        register_backend(name, **registration)
        yield
    finally:
        _backends[name] = saved
        _choices_changed()


# ---------------------------------------------------------------------------------------------------------------
# Forcing a backend
# ---------------------------------------------------------------------------------------------------------------
def _validate_forced(name: Optional[str]) -> Optional[str]:
    if name is None or name == "" or name == "auto":
        return None
    _backend(name)
    return name


def _forced() -> Optional[Tuple[Optional[str], bool]]:
    """(backend, strict) from the innermost context manager, else set_backend, else the environment."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_forced is not None:
        return _global_forced, True
    return _env_forced()


def _parse_forced(env: Optional[str]) -> Optional[Tuple[Optional[str], bool]]:
    if not env:
        return None
    try:
        name = _validate_forced(env.strip().lower())
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None
    return (name, True) if name else None


_env_forced = EnvSetting(ENV_VAR, _parse_forced)


def forced_backend() -> Optional[str]:
    """The backend forced (or preferred) by context manager, then by set_backend, then by the environment."""
    forced = _forced()
    return forced[0] if forced and forced[0] else None


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op in this process (``None`` or ``"auto"`` restores automatic choice)."""
    global _global_forced
    _global_forced = _validate_forced(name)
    _choices_changed()


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


def current_forcing() -> Optional[Tuple[Optional[str], bool]]:
    """This thread's innermost ``use_backend``/``prefer_backend`` as (backend, strict), or None outside them.

    The ops record it on the autograd context so that a backward, which autograd may run on another thread
    (on CUDA it always does), is dispatched as its forward was.
    """
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def forcing(state: Optional[Tuple[Optional[str], bool]]) -> Iterator[None]:
    """Re-enter a :func:`current_forcing` state on this thread (None: leave the thread's own state)."""
    if state is None:
        yield
        return
    with use_backend(state[0], strict=state[1]):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------------------
class NoBackendError(RuntimeError):
    """No backend can take a call (or the forced one cannot); the message lists every backend's reasons."""


class Choice(NamedTuple):
    """What :func:`explain` found for one call.

    ``backend``/``kernel``: the choice (None when no backend can take the call; ``error`` then says why).
    ``not_supported``: every backend's reasons it cannot run the call (empty list: it can). ``slower``: for
    backends that can, the measured-slower reasons automatic choice passed them over for. ``order``: the
    backends in the order they were considered; ``forced``: the forced or preferred backend, if any.
    """

    op: str
    device_type: str
    backend: Optional[str]
    kernel: Optional[Callable]
    order: Tuple[str, ...]
    forced: Optional[str]
    not_supported: Dict[str, List[str]]
    slower: Dict[str, List[str]]
    error: Optional[str]


def order(device_type: str) -> Tuple[str, ...]:
    """The backends automatic choice tries on ``device_type``, first to last."""
    return tuple(DEFAULT_ORDER.get(device_type, ("reference",)))


def _named(op: str, args: tuple, kwargs: dict) -> Dict[str, object]:
    names = op_arguments(op)
    if len(args) > len(names):
        raise TypeError(f"op '{op}' takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    named = dict(zip(names, args))
    named.update(kwargs)
    defaults = _op_defaults[op]  # of the trailing arguments, as a call of the op may leave them out
    for name, value in zip(names[len(names) - len(defaults):], defaults):
        named.setdefault(name, value)
    missing = [n for n in names if n not in named]
    if missing:
        raise TypeError(f"op '{op}': missing arguments {missing}")
    return named


def _choose(op: str, device_type: str, named: Mapping[str, object], every: bool):
    """(backend name or None, order, forced, not_supported, slower, error); ``every`` asks every backend."""
    not_supported: Dict[str, List[str]] = {}
    slower: Dict[str, List[str]] = {}
    forced = _forced()
    name, strict = forced if forced is not None else (None, True)
    chosen = None
    tried: List[str] = []
    if name is not None:
        tried.append(name)
        not_supported[name] = _backends[name].not_supported_reasons(op, device_type, named)
        if not not_supported[name]:
            chosen = name
        elif strict:
            error = f"shvit_kernels: backend '{name}' was forced but cannot run op '{op}': " + "; ".join(not_supported[name])
            if every:
                for other in BACKENDS:
                    if other not in not_supported:
                        not_supported[other] = _backends[other].not_supported_reasons(op, device_type, named)
            return None, tuple(tried), name, not_supported, slower, error
    for candidate in order(device_type):
        if chosen is not None and not every:
            break
        if candidate == name:  # the forced or preferred backend was asked above
            continue
        tried.append(candidate)
        not_supported[candidate] = _backends[candidate].not_supported_reasons(op, device_type, named)
        if not_supported[candidate]:
            continue
        slower[candidate] = _backends[candidate].slower_reasons(op, named)
        if chosen is None and not slower[candidate]:
            chosen = candidate
    if every:
        for other in BACKENDS:
            if other not in not_supported:
                not_supported[other] = _backends[other].not_supported_reasons(op, device_type, named)
    error = None
    if chosen is None:
        lines = [f"  {b}: " + "; ".join(not_supported.get(b) or slower.get(b) or ["not considered"]) for b in tried]
        error = f"shvit_kernels: no backend can run op '{op}' on {device_type}:\n" + "\n".join(lines)
    return chosen, tuple(tried), name, not_supported, slower, error


def explain(op: str, *args, device_type: Optional[str] = None, **kwargs) -> Choice:
    """Every backend's reasons for the call ``op(*args)`` and the backend and kernel chosen for it.

    ``args`` are the op's schema arguments (see :func:`op_arguments`); ``device_type`` defaults to the first
    argument's. Never raises for a call no backend can take: ``backend`` is then None and ``error`` says why.
    """
    named = _named(op, args, kwargs)
    if device_type is None:
        device_type = _device_type_of(named[op_arguments(op)[0]])
    chosen, tried, forced, not_supported, slower, error = _choose(op, device_type, named, every=True)
    kernel = _backends[chosen].kernels[op] if chosen is not None else None
    return Choice(op, device_type, chosen, kernel, tried, forced, not_supported, slower, error)


def _device_type_of(t) -> str:
    device = getattr(t, "device", None)
    if device is None:
        raise TypeError("the op's first argument must be a tensor (its device picks the backend order)")
    return device.type


def select(op: str, device_type: str, args: tuple) -> Tuple[str, Callable]:
    """(backend, kernel) that will run ``op`` for these positional schema arguments; raises when none can."""
    named = dict(zip(_op_arguments[op], args))
    forced = _forced()
    if forced is None or forced[0] is None:  # automatic: the hot path, kept lean (no per-backend bookkeeping)
        if autotune.applies(op, device_type):
            tuned = _tuned(op, device_type, args, named)
            if tuned is not None:
                return tuned, _backends[tuned].kernels[op]
        for name in DEFAULT_ORDER.get(device_type, ("reference",)):
            b = _backends[name]
            if not b.not_supported_reasons(op, device_type, named) and not b.slower_reasons(op, named):
                return name, b.kernels[op]
    chosen, *_, error = _choose(op, device_type, named, every=False)
    if chosen is None:
        raise NoBackendError(error)
    return chosen, _backends[chosen].kernels[op]


def _tuned(op: str, device_type: str, args: tuple, named: Mapping[str, object]) -> Optional[str]:
    """The measured-fastest backend that can run the call (timing them on a signature's first call), or None
    when fewer than two can run it (then the fixed order decides)."""
    remembered = autotune.lookup(op, device_type, args)
    if remembered == autotune.UNTUNED:
        return None
    if remembered is not None and not _backends[remembered].not_supported_reasons(op, device_type, named):
        return remembered
    candidates = {
        name: _backends[name].kernels[op]
        for name in order(device_type)
        if not _backends[name].not_supported_reasons(op, device_type, named)
    }
    if len(candidates) < 2:
        autotune.remember_untuned(op, device_type, args)
        return None
    return autotune.tune(op, device_type, args, candidates)


def chosen_backend(op: str, device_type: str, *args) -> str:
    """Name of the backend that would run ``op(*args)`` on ``device_type``; raises like the call would."""
    return select(op, device_type, args)[0]


# ---------------------------------------------------------------------------------------------------------------
# First-use check of kernels not yet verified on hardware (triton, cuda)
# ---------------------------------------------------------------------------------------------------------------
def set_verify(enabled: Optional[bool]) -> None:
    """Turn the first-use check on or off (``None``: ``SHVIT_KERNELS_VERIFY``, default on)."""
    global _verify
    _verify = enabled
    _choices_changed()


def reset_first_use_checks() -> None:
    """Forget which signatures passed or failed their first-use check (they are checked again)."""
    with _verify_lock:
        _verified_first_use.clear()
        _failed_first_use.clear()
        _choices_changed()


def verify_enabled() -> bool:
    if _verify is not None:
        return _verify
    return _env_verify()


_env_verify = EnvSetting(VERIFY_ENV_VAR, lambda env: (env or "1").strip().lower() not in ("0", "off", "false", "no"))


def needs_first_use_check(backend: str, op: str, device_type: str, args: tuple) -> bool:
    """Whether this call is the first of its signature on a backend registered with ``verify_first_use``."""
    if not _backends[backend].verify_first_use or not verify_enabled():
        return False
    import torch

    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False  # the check syncs with the host, which would invalidate a CUDA-graph capture
    return (backend, autotune.signature(op, device_type, args)) not in _verified_first_use


def first_use_check(op: str, device_type: str, backend: str, kernel: Callable, *args):
    """Run ``kernel`` and the reference on ``args``; return the kernel's result if it errs no more than the
    tolerance rule allows (and is finite where the reference is), else the reference's, disabling the backend
    for this call signature with one warning."""
    import warnings

    import torch

    from .testing import assert_close_to_fp64, to_float64

    key = (backend, autotune.signature(op, device_type, args))
    reference = _backends["reference"].kernels[op]
    eager = reference(*args)
    failure = None
    try:
        got = kernel(*args)
    except Exception as e:  # noqa: BLE001 - any kernel failure disables it for the signature
        failure = f"{type(e).__name__}: {e}"
    else:
        ref64 = reference(*to_float64(args))
        as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
        try:
            outputs = list(zip(as_tuple(got), as_tuple(eager), as_tuple(ref64)))
            assert len(outputs) == len(as_tuple(eager)), "wrong number of outputs"
            for i, (g, e, r) in enumerate(outputs):
                finite = torch.isfinite(e)
                if not bool(finite.all()):  # judge only where the reference is finite; elsewhere match it
                    assert g.shape == e.shape, f"output {i}: shape {tuple(g.shape)} != {tuple(e.shape)}"
                    assert torch.equal(torch.isfinite(g), finite), f"output {i}: non-finite values where the reference has none"
                    g, e, r = g[finite], e[finite], r[finite]
                assert_close_to_fp64(g, e, r, name=f"output {i}")
        except AssertionError as e:
            failure = str(e)
    with _verify_lock:
        if failure is None:
            _verified_first_use.add(key)
            return got
        first = key not in _failed_first_use
        _failed_first_use[key] = failure
        _choices_changed()
    if first:
        warnings.warn(f"shvit_kernels: the {backend} kernel for op '{op}' failed its first-use check against the "
                      f"reference and is disabled for this call signature (the reference's result is used): {failure}",
                      RuntimeWarning, stacklevel=4)
    return eager


# ---------------------------------------------------------------------------------------------------------------
# Observers
# ---------------------------------------------------------------------------------------------------------------
class DispatchedCall(NamedTuple):
    """One kernel call as observers see it: the op, its device type, the backend that runs it, its arguments,
    and whether it bypassed the custom-op machinery (a plain eager call, e.g. inference: ``direct``)."""

    op: str
    device_type: str
    backend: str
    args: tuple
    direct: bool = False


def notify(call: DispatchedCall) -> List[Callable[[], None]]:
    """Tell every observer a kernel is about to run; returns the 'done' callbacks they handed back."""
    done = []
    for observer in _observers:
        after = observer(call)
        if after is not None:
            done.append(after)
    return done


def has_observers() -> bool:
    return bool(_observers)


@contextlib.contextmanager
def observe(observer: Callable[[DispatchedCall], Optional[Callable[[], None]]]) -> Iterator[None]:
    """Call ``observer(call)`` before every kernel call in the block (every thread, autograd's included).

    ``call`` is a :class:`DispatchedCall`. If the observer returns a callable, it is called once the kernel has
    returned (a profiler stops its clock there). Observers must not raise.
    """
    global _observers
    with _observers_lock:
        _observers = _observers + (observer,)
    try:
        yield
    finally:
        with _observers_lock:
            remaining = list(_observers)
            remaining.remove(observer)
            _observers = tuple(remaining)


@contextlib.contextmanager
def record() -> Iterator[List[DispatchedCall]]:
    """Collect a :class:`DispatchedCall` for every kernel call inside the block."""
    calls: List[DispatchedCall] = []
    with observe(calls.append):
        yield calls


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def ops() -> List[str]:
    """Every op's name (the reference backend has a kernel for each)."""
    return sorted(_backends["reference"].kernels)


def kernel(backend: str, op: str) -> Optional[Callable]:
    """``backend``'s kernel for ``op`` (None if it has none), e.g. to call it directly in a test."""
    return _backend(backend).kernels.get(op)


def unavailable_reasons(backend: str) -> List[str]:
    """Why ``backend`` cannot run at all here (empty list: it can)."""
    return list(_backend(backend).availability())


def usable_backends(device_type: str, include_reference: bool = False) -> List[str]:
    """The backends with kernels that can run on ``device_type`` here (per-call limits apply per call)."""
    names = []
    for name in BACKENDS:
        b = _backends[name]
        if name == "reference" and not include_reference:
            continue
        if b.device_types is not None and device_type not in b.device_types:
            continue
        if b.kernels and not b.availability():
            names.append(name)
    return names


def backend_table() -> List[dict]:
    """One row per (backend, op): whether it has a kernel and is available, and why not."""
    rows = []
    for name in BACKENDS:
        b = _backends[name]
        unavailable = list(b.availability())
        for op in ops():
            if op not in b.kernels:
                rows.append(dict(backend=name, op=op, usable=False, why=f"no '{op}' kernel"))
            else:
                rows.append(dict(backend=name, op=op, usable=not unavailable, why="; ".join(unavailable)))
    return rows
