"""Saved tensors that are cheap to recompute, saved as recipes and recomputed in the backward pass.

Inside :func:`recompute_cheap_tensors` the ops offer such tensors as they make them: a training Conv+BN's output
that its kept conv output gives back (ops/conv_bn.py). Saved-tensor hooks then save an offered tensor, wherever an op
saves it, as its recipe; the backward recomputes it on first use, and later uses share that. (Autocast's casts of the
parameters and of the input, offered the same way, saved 1.2-2.5 MiB of S1's 73 MiB bf16 step and cost it 3-5% of
its speed, AMD Zen 5, 2026-12-04: not offered.)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, Optional

import torch


class Recipe:
    """A saved tensor to recompute: ``make()`` gives it; ``get()`` makes it once."""

    __slots__ = ("_made",)

    def __init__(self):
        self._made: Optional[torch.Tensor] = None

    def make(self) -> torch.Tensor:
        raise NotImplementedError

    def get(self) -> torch.Tensor:
        if self._made is None:
            with torch.no_grad():
                self._made = self.make()
        return self._made


class _Offers(threading.local):
    """This thread's offered tensors and its saved-tensor hooks."""

    def __init__(self):
        self.active = False
        self.disabled = 0  # recompute_cheap_tensors(False) blocks entered
        self.offered = {}  # id(tensor) -> (weak reference to it, its version when offered, Recipe)

    def offer(self, t: torch.Tensor, recipe: Recipe) -> bool:
        """From here on ``t``, as long as it is unchanged, is saved as ``recipe``; whether it was taken."""
        if not self.active:
            return False
        self.offered[id(t)] = (weakref.ref(t), t._version, recipe)
        return True

    def pack(self, t):
        entry = self.offered.get(id(t))
        # The very tensor, unchanged since it was offered (an in-place change after that makes it another value).
        if entry is not None and entry[0]() is t and t._version == entry[1]:
            return entry[2]
        return t

    @staticmethod
    def unpack(saved):
        return saved.get() if isinstance(saved, Recipe) else saved


offers = _Offers()


@contextlib.contextmanager
def recompute_cheap_tensors(enabled: bool = True) -> Iterator[None]:
    """Inside the block, tensors that are cheap to recompute are not held for the backward pass but recomputed
    there: a training Conv+BN's output where its conv output is kept (see :func:`keep_conv_outputs`; one
    elementwise pass, bit for bit the forward's on the cpp backend), wherever it is saved (by its op for the ReLU
    mask, by the ops it feeds). Gradients are the same bit for bit; SHViT's training forward enters this block
    itself. ``enabled=False`` turns it off inside (the blocks entered there, a model's included).

    Nothing changes where autograd is off, under torch.compile, or inside other saved-tensor hooks (activation
    checkpointing or offloading keep theirs).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"recompute_cheap_tensors: 'enabled' must be a bool, got {type(enabled).__name__}")
    if not enabled:
        previous, offers.active = offers.active, False
        offers.disabled += 1
        try:
            yield
        finally:
            offers.disabled -= 1
            offers.active = previous
        return
    if (offers.active or offers.disabled or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
        yield
        return
    offers.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(offers.pack, offers.unpack):
            yield
    finally:
        offers.active = False
        offers.offered.clear()
