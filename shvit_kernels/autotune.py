"""Autotuned dispatch: time the backends that can run a call signature on first use, remember the fastest.

A call signature is (op, device type, every tensor's dtype, shape and layout, the other arguments, the thread
count). The first automatic call of a signature times each backend that can run it (the measured-slower rules
are then not used; the candidates interleaved, each call on memory handed back to the OS as inside a model, the
fixed order's first kept unless another beats it by TIE_MARGIN) and keeps the fastest in memory and in a
per-machine cache file, so later calls, and later processes on the same machine, pay nothing but the lookup.
Backends register the settings that change how fast their kernels are (``register_setting``: the C++ kernels'
bf16 arithmetic, and which build of them is loaded); they are part of the machine key, so each setting has its own
choices.

Modes (``set_autotune``, the ``autotune`` context manager, or ``SHVIT_KERNELS_AUTOTUNE``):

* ``"inference"`` (default): the inference ops a fused model runs (conv_bias_act, ffn_fused, shsa_fused,
  squeeze_excite, patch_embed, pooled_linear);
* ``"all"`` (``True``, env ``1``/``all``): every op, training ops and backwards included;
* ``"off"`` (``False``, env ``0``/``off``): the fixed order with its measured-slower rules.

Forced or preferred backends (``use_backend``, ``prefer_backend``, ...) are never tuned over. The cache file is
``$SHVIT_KERNELS_CACHE_DIR`` (default ``~/.cache/shvit_kernels``) ``/autotune-<machine>.json``, the machine
being the CPU model and capability, the GPU name, the torch and package versions and the registered settings.
Writes are atomic; a
file that cannot be read is ignored with a warning and replaced on the next write.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Union

import torch

from ._env import EnvSetting

ENV_VAR = "SHVIT_KERNELS_AUTOTUNE"
CACHE_DIR_ENV_VAR = "SHVIT_KERNELS_CACHE_DIR"
MODES = ("off", "inference", "all")
INFERENCE_OPS = frozenset({"conv_bias_act", "ffn_fused", "shsa_fused", "squeeze_excite", "patch_embed",
                           "pooled_linear"})
# Per candidate: a warm-up call, then interleaved rounds of one timed call each until MIN_SECONDS per candidate
# have passed (at least MIN_REPS rounds, at most MAX_REPS).
MIN_REPS, MAX_REPS, MIN_SECONDS = 3, 25, 0.02
# A candidate must beat the preferred one (the fixed order's first, or a model's default layout) by more than
# this to be chosen. On Zen 3 (2026-11-30) a noisy 3-call timing once cached NCHW for S1's layout, 0.76x the
# channels_last speed, for every later process.
TIE_MARGIN = 0.03
FORMAT_VERSION = 1

__all__ = ["ENV_VAR", "MODES", "autotune", "cache_path", "cached_choices", "choose", "clear", "generation", "mode",
           "register_setting", "set_autotune", "settings_changed"]

_global_mode: Optional[str] = None
_state = threading.local()
_lock = threading.RLock()
_choices: Dict[str, str] = {}  # signature string (as in the cache file) -> backend
_by_call: Dict[tuple, str] = {}  # the same, keyed by a cheap tuple of the call, for the per-call lookup
_loaded_path: Optional[str] = None
_settings: Dict[str, Callable[[], Optional[str]]] = {}  # name -> current value (None: not applicable here)
_generation = 0  # bumped whenever remembered choices may change (see generation())


def generation() -> int:
    """A number that changes whenever the choices in force may have changed (mode, settings, cache cleared or
    reloaded): callers that remember choices per call signature compare it."""
    return _generation


def _choices_changed() -> None:
    global _generation
    _generation += 1


def _normalize(setting: Union[None, bool, str]) -> Optional[str]:
    if setting is None:
        return None
    if setting is True:
        return "all"
    if setting is False:
        return "off"
    value = str(setting).strip().lower()
    value = {"1": "all", "true": "all", "on": "all", "0": "off", "false": "off", "": "inference", "auto": "inference"}.get(value, value)
    if value not in MODES:
        raise ValueError(f"autotune mode must be one of {MODES} (or True/False), got {setting!r}")
    return value


def set_autotune(setting: Union[None, bool, str]) -> None:
    """Set the process-wide mode (``None`` goes back to the environment variable, else the default)."""
    global _global_mode
    _global_mode = _normalize(setting)
    _choices_changed()


@contextlib.contextmanager
def autotune(setting: Union[bool, str] = True) -> Iterator[None]:
    """Tune (``True``/``"all"``), tune inference ops only, or not (``False``) inside the block (thread-local)."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(_normalize(setting))
    try:
        yield
    finally:
        stack.pop()


def mode() -> str:
    """The mode in force here: context manager, then :func:`set_autotune`, then the environment, then default."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_mode is not None:
        return _global_mode
    return _env_mode()


def _parse_mode(env: Optional[str]) -> str:
    if env is None:
        return "inference"
    try:
        return _normalize(env)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None


_env_mode = EnvSetting(ENV_VAR, _parse_mode)


def applies(op: str, device_type: str = "cpu") -> bool:
    """Whether an automatic call of ``op`` here is tuned (never while tracing or capturing a CUDA graph)."""
    m = mode()
    if m == "off" or (m == "inference" and op not in INFERENCE_OPS):
        return False
    if torch.jit.is_tracing() or (device_type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    return True


def call_key(op: str, device_type: str, args: Sequence) -> tuple:
    """A hashable stand-in for :func:`signature`, cheap enough for every call."""
    return (op, device_type, torch.get_num_threads(),
            *[(a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args])


# ---------------------------------------------------------------------------------------------------------------
# Signatures and the cache file
# ---------------------------------------------------------------------------------------------------------------
def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw" if t.dim() == 4 else "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strides" + ",".join(map(str, t.stride()))


def signature(op: str, device_type: str, args: Sequence) -> str:
    """The key a tuned choice is remembered under."""
    parts = [op, device_type, f"threads={torch.get_num_threads()}"]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}{_layout(a)}")
        else:
            parts.append(repr(a))
    return " ".join(parts)


def _cpu_model() -> str:
    """'<model name> (family F model M)' from /proc/cpuinfo: the name alone can hide the core generation."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def machine() -> Dict[str, str]:
    """What a cache file is valid for: CPU model and capability, GPU, torch and package versions, and each
    registered setting that applies here."""
    key = dict(_machine())
    for name, current in sorted(_settings.items()):
        value = current()
        if value is not None:
            key[name] = value
    return key


def register_setting(name: str, current: Callable[[], Optional[str]]) -> None:
    """Make ``current()`` (a string, or None where it does not apply) part of the machine key: a backend setting
    that changes which backend is fastest. Call :func:`settings_changed` whenever its value changes."""
    with _lock:
        _settings[name] = current
    settings_changed()


def settings_changed() -> None:
    """Re-read the machine key: the choices in force become those kept for the new settings."""
    global _loaded_path
    with _lock:
        _by_call.clear()
        _loaded_path = None
        _choices_changed()


@functools.lru_cache(maxsize=None)
def _machine() -> tuple:
    from . import __version__

    return tuple(dict(
        cpu=_cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        torch=torch.__version__,
        shvit_kernels=__version__,
    ).items())


def cache_path() -> str:
    """This machine's cache file."""
    folder = os.environ.get(CACHE_DIR_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "shvit_kernels")
    digest = hashlib.sha1(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(folder, f"autotune-{digest}.json")


def _load() -> None:
    """Read this machine's cache file once per path (a changed cache folder is read afresh)."""
    global _loaded_path
    path = cache_path()
    if path == _loaded_path:
        return
    _loaded_path = path
    _choices.clear()
    _by_call.clear()
    _choices_changed()
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT_VERSION or not isinstance(data.get("choices"), dict):
            raise ValueError("not a shvit_kernels autotune cache")
        _choices.update({str(k): str(v) for k, v in data["choices"].items()})
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(f"shvit_kernels: ignoring the autotune cache {path} ({e}); it is rewritten on the next tuning",
                      RuntimeWarning, stacklevel=3)


def _save() -> None:
    path = cache_path()
    data = dict(format=FORMAT_VERSION, machine=machine(), choices=dict(sorted(_choices.items())))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    except OSError as e:
        warnings.warn(f"shvit_kernels: cannot write the autotune cache {path} ({e}); choices stay in memory",
                      RuntimeWarning, stacklevel=3)


def cached_choices() -> Dict[str, str]:
    """Signature -> backend, as remembered for this machine (the cache file and this process)."""
    with _lock:
        _load()
        return dict(_choices)


def clear(delete_file: bool = False) -> None:
    """Forget the tuned choices (and delete this machine's cache file)."""
    global _loaded_path
    with _lock:
        _choices.clear()
        _by_call.clear()
        _loaded_path = None
        _choices_changed()
        if delete_file and os.path.exists(cache_path()):
            os.remove(cache_path())


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _as_in_a_model(device_type: str) -> None:
    """Give the next call the allocator state it meets inside a model: on the CPU, freed memory handed back to
    the OS, so that large outputs land on fresh pages. Timed back to back, a kernel reuses its previous output's
    warm pages; in S1's forward (Zen 3, 2026-11-30) ATen's stem convs then took 2.2x their isolated time (5.0 ->
    11.8 ms; 13.3 ms measured in the model) while the cpp kernels, which keep large output blocks, did not change,
    so the isolated timing picked the slower backend."""
    if device_type == "cpu":
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


def time_candidates(candidates: Dict[str, Callable], args: Sequence, device_type: str) -> Dict[str, float]:
    """Median seconds per call of each candidate on ``args``, the candidates interleaved (one call each per
    round) so that a load spike or a clock change hits them alike. Each gets one untimed warm-up call first;
    a candidate that raises is left out. Rounds: at least MIN_REPS, at most MAX_REPS, until MIN_SECONDS per
    candidate have passed."""
    alive = {}
    for name, kernel in candidates.items():
        try:
            _sync(device_type)
            kernel(*args)
            _sync(device_type)
            alive[name] = kernel
        except Exception:  # noqa: BLE001 - a kernel that fails here is simply not chosen
            continue
    samples: Dict[str, list] = {name: [] for name in alive}
    start = time.perf_counter()
    rounds = 0
    while alive and (rounds < MIN_REPS or (rounds < MAX_REPS and time.perf_counter() - start < MIN_SECONDS * len(alive))):
        for name, kernel in alive.items():
            _as_in_a_model(device_type)
            t0 = time.perf_counter()
            kernel(*args)
            _sync(device_type)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in samples.items()}


def fastest(times: Dict[str, float], preferred: str) -> str:
    """The fastest candidate, unless it beats ``preferred`` by less than TIE_MARGIN: then ``preferred`` (noise
    should not move a choice away from the fixed order's first)."""
    best = min(times, key=times.get)
    if preferred in times and times[best] > times[preferred] * (1 - TIE_MARGIN):
        return preferred
    return best


UNTUNED = ""  # remembered for a signature fewer than two backends can run: the fixed order decides


def remember_untuned(op: str, device_type: str, args: Sequence) -> None:
    _by_call[call_key(op, device_type, args)] = UNTUNED


def lookup(op: str, device_type: str, args: Sequence) -> Optional[str]:
    """The remembered backend for this call's signature (:data:`UNTUNED`: none to tune over), or None."""
    fast = call_key(op, device_type, args)
    choice = _by_call.get(fast)
    if choice is None:
        with _lock:
            _load()
            choice = _choices.get(signature(op, device_type, args))
            if choice is not None:
                _by_call[fast] = choice
    return choice


def tune(op: str, device_type: str, args: Sequence, candidates: Dict[str, Callable]) -> str:
    """Time the candidates (name -> kernel, preferred first) on ``args``; remember and return the fastest."""
    key = signature(op, device_type, args)
    with _lock:
        _load()
        if key in _choices and _choices[key] in candidates:
            _by_call[call_key(op, device_type, args)] = _choices[key]
            return _choices[key]
        with torch.no_grad():
            times = time_candidates(candidates, args, device_type)
        if not times:
            return next(iter(candidates))  # the fixed order's first; its own call reports the error
        best = fastest(times, preferred=next(iter(candidates)))
        _choices[key] = best
        _by_call[call_key(op, device_type, args)] = best
        _save()
        return best


def choose(name: str, device_type: str, args: Sequence, candidates: Dict[str, Callable]) -> str:
    """The fastest of ``candidates`` (name -> callable taking ``args``, the default first) for this signature of
    ``name``: timed on the signature's first call, then remembered like a backend choice (in memory and in this
    machine's cache).

    For choices above single ops, e.g. the layout a model runs in. Callers check :func:`mode` themselves.
    """
    choice = lookup(name, device_type, args)
    if choice in candidates:
        return choice
    return tune(name, device_type, args, candidates)
