"""Environment variables read on every op call, cheaply.

The dispatcher honours ``SHVIT_KERNELS_BACKEND``, ``SHVIT_KERNELS_AUTOTUNE`` and ``SHVIT_KERNELS_VERIFY`` at any
time, so every call reads them. ``os.environ.get`` encodes the name and decodes the value each time (about 1 us), and
each value was parsed again: 6 of a remembered call's 19 us (timeit, one CPU thread). :class:`EnvSetting` looks the
encoded name up in ``os.environ``'s own mapping and parses a value only when it changed.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")

_MISSING = object()


def _raw_reader(name: str) -> Callable[[], object]:
    """A function returning the variable's raw stored value (None when unset)."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):  # CPython's os._Environ: name -> value, both encoded
        key = encode(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)


class EnvSetting(Generic[T]):
    """``parse(os.environ.get(name))``, re-read on every call; the last successful parse is reused while the
    value stays the same. A value ``parse`` rejects raises on every call, as it would uncached."""

    def __init__(self, name: str, parse: Callable[[Optional[str]], T]):
        self.name = name
        self._parse = parse
        self._read = _raw_reader(name)
        self._cached: tuple = (_MISSING, None)  # (raw value, its parse): one object, so threads see a matching pair

    def __call__(self) -> T:
        raw = self._read()
        cached_raw, value = self._cached
        if raw is cached_raw or (raw is not None and raw == cached_raw):
            return value
        value = self._parse(os.environ.get(self.name))
        self._cached = (raw, value)
        return value
