"""Replay a recorded chain of CPU kernel calls without the Python between them: :class:`KernelChain`; on CUDA, a
forward captured as a CUDA graph: :class:`CudaGraphReplay`.

Between two large kernels the Python of a module call (nn.Module dispatch, the op wrapper, the remembered-call
lookup) finds its objects evicted from the core's caches by the kernel's data, and costs ten times what it costs
warm: one op call took 16 us warm and 229 us after a 32 MB sweep, and in S1's batch-16 forward the gaps between
kernels added up to 11-18 ms of 110 (Intel Xeon family 6 model 167, one thread, 2026-12-03). A chain replays the
same kernels with the same arguments from one short loop.

A chain is recorded from one plain eager call of ``fn(x)`` (inference) in which every kernel's non-constant tensor
argument is ``x`` or an earlier kernel's output: a model's feature extractor whose residuals live inside the ops.
It is kept only if replaying it on ``x`` gives exactly ``fn(x)``'s result, so a function that changes values
between its kernels with torch ops is declined. What the recording cannot see is for the caller to rule out: the
kernels ``fn`` calls must depend on nothing but the input's signature (no branch on values), and the caller
decides when a chain applies (same input signature, same module tree) and checks :meth:`KernelChain.valid` and
:func:`replayable` before each replay.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch

from . import dispatch
from .ops import _common
from .tracing import inlining_reference

__all__ = ["CudaGraphReplay", "KernelChain", "graph_replayable", "replayable"]


def replayable(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` here and now would run its kernels directly, as a recorded chain does: a plain
    CPU tensor, gradients off (the weights may require them), no autocast, torch.compile, tracing, export,
    profiler, mode or dispatch observer."""
    return (
        type(x) is torch.Tensor
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not dispatch.has_observers()
        and not inlining_reference()
        and _common._plain_eager_call((x,))
    )


class KernelChain:
    """Kernel calls recorded from ``fn(x)``, each fed ``x`` or earlier calls' outputs; call it with a new ``x``."""

    def __init__(self, steps: List[tuple], constants: List[Tuple[torch.Tensor, int]]):
        # Per step: kernel, argument template, (argument position, value index) slots, value indices whose last
        # use this step is, the op whose layout rule its output takes (None: the kernel's output as it is). Value 0
        # is x, value i + 1 step i's output.
        self._steps = steps
        self._constants = constants  # (tensor, version at recording)

    @classmethod
    def capture(cls, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                constants: Iterable[torch.Tensor]) -> Tuple[Optional["KernelChain"], torch.Tensor]:
        """Run ``fn(x)`` once, recording its kernels; returns ``(chain, fn(x))``, chain None where ``fn`` is not
        such a chain. ``constants``: the tensors that are the same on every call (a model's parameters and
        buffers); every other tensor argument of a kernel must be ``x`` or an earlier kernel's output."""
        if not replayable(x):
            return None, fn(x)
        constant_ids = {id(t) for t in constants}
        with dispatch.record() as calls:
            expected = fn(x)
        if not calls or not isinstance(expected, torch.Tensor):
            return None, expected
        try:
            chain = cls._learn(calls, x, constant_ids)
        except Exception:  # a kernel that rejects what the chain fed it: not such a chain
            chain = None
        if chain is None:
            return None, expected
        got = chain(x)
        same = (got.shape == expected.shape and got.dtype == expected.dtype and got.stride() == expected.stride()
                and torch.allclose(got, expected, rtol=0.0, atol=0.0, equal_nan=True))
        return (chain if same else None), expected

    @classmethod
    def _learn(cls, calls, x: torch.Tensor, constant_ids: set) -> Optional["KernelChain"]:
        """Replay the recorded calls once, finding each non-constant tensor argument among x and the outputs so
        far: the one value equal to it (same shape, strides, dtype, bits); None where there is not exactly one."""
        values: List[Optional[torch.Tensor]] = [x]
        steps, used, last_use = [], {}, {}
        # A value goes once its recorded counterpart (the object it matched) appears in no later call: the recording
        # then holds at most what the forward itself held, not a second copy of every activation.
        last_seen = {id(a): i for i, call in enumerate(calls) for a in call.args if isinstance(a, torch.Tensor)}
        counterpart = {}  # value index -> id of the recorded object it matched
        for i in range(len(calls)):
            call, calls[i] = calls[i], None  # the recorded arguments go once matched: the forward's activations
            kernel = dispatch.kernel(call.backend, call.op)
            if not call.direct or call.device_type != "cpu" or kernel is None:
                return None
            # A backend's compiled function where it offers one and the call passed every argument.
            compiled = getattr(kernel, "compiled", None)
            if compiled is not None and len(call.args) == len(dispatch.op_arguments(call.op)):
                kernel = compiled()
            template, slots = list(call.args), []
            for pos, a in enumerate(call.args):
                if not isinstance(a, torch.Tensor):
                    continue
                if id(a) in constant_ids:
                    used[id(a)] = a
                    continue
                matches = [v for v, t in enumerate(values) if t is not None and t.shape == a.shape
                           and t.stride() == a.stride() and t.dtype == a.dtype and torch.equal(t, a)]
                if len(matches) != 1:
                    return None
                counterpart[matches[0]] = id(a)
                slots.append((pos, matches[0]))
                template[pos] = None
                last_use[matches[0]] = i
            args = list(template)
            for pos, v in slots:
                args[pos] = values[v]
            out = kernel(*args)
            fixed = _common._normalize_outputs(call.op, out, tuple(args))
            if not isinstance(fixed, torch.Tensor):
                return None
            steps.append([kernel, tuple(template), tuple(slots), (), call.op if fixed is not out else None])
            values.append(fixed)
            for v, obj in list(counterpart.items()):
                if last_seen[obj] <= i:
                    values[v] = None
                    del counterpart[v]
        for v, i in last_use.items():
            steps[i][3] += (v,)
        return cls([tuple(s) for s in steps], [(t, t._version) for t in used.values()])

    def valid(self) -> bool:
        """False once a recorded constant was changed in place (its version moved): record a new chain."""
        return all(t._version == v for t, v in self._constants)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        values = [x] + [None] * len(self._steps)
        for i, (kernel, template, slots, release, layout_op) in enumerate(self._steps):
            args = list(template)
            for pos, v in slots:
                args[pos] = values[v]
            out = kernel(*args)
            values[i + 1] = _common._normalize_outputs(layout_op, out, args) if layout_op else out
            for v in release:  # no later step reads it: its block can go back to the output cache
                values[v] = None
        return values[-1]

    def __len__(self) -> int:
        return len(self._steps)


def graph_replayable(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` here and now could be captured as, or replayed from, a CUDA graph: a plain CUDA
    tensor, gradients off, no autocast, no capture under way (a caller capturing the model itself), and nothing
    that would see the ops (torch.compile, tracing, export, profiler, mode, dispatch observer)."""
    return (
        type(x) is torch.Tensor
        and x.is_cuda
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cuda")
        and not torch.cuda.is_current_stream_capturing()
        and not dispatch.has_observers()
        and not inlining_reference()
        and _common._plain_eager_call((x,))
    )


# Relative max difference (to the largest magnitude) a replay may show against the same forward run op by op;
# the same kernels give the same bits, but a library may pick another algorithm inside a capture. A capture that
# went wrong (a value read on the host at capture time, a buffer freed) is off by order one.
_REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class CudaGraphReplay:
    """``fn`` captured as a CUDA graph for one input signature; call it with another ``x`` of that signature.

    Called op by op, a fused model on an H200 is bound by the host: S1 at batch 256 in bf16 took 5.5 ms per batch,
    2.9 ms replayed as a graph (2026-12-04). A replay copies ``x`` into the captured input, replays, and returns a
    copy of the captured output (the next replay overwrites it). What a graph cannot see is for the caller to rule
    out, as for :class:`KernelChain`: the kernels must depend on the input's signature only, and the caller checks
    :meth:`valid` (constants changed in place or given new storage) and :func:`graph_replayable` before each call.
    """

    def __init__(self, graph, static_in: torch.Tensor, static_out: torch.Tensor,
                 constants: List[Tuple[torch.Tensor, int, int]]):
        self._graph, self._in, self._out, self._constants = graph, static_in, static_out, constants

    @classmethod
    def capture(cls, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                constants: Iterable[torch.Tensor]) -> Tuple[Optional["CudaGraphReplay"], torch.Tensor]:
        """Run ``fn(x)`` op by op on a side stream (first-use checks, autotuning and compiles happen there), capture
        it, replay it once and compare; returns ``(replay, fn(x))``, replay None where ``fn`` did not capture or
        its replay differs. ``constants``: the tensors every call reads as they are (parameters, buffers)."""
        if not graph_replayable(x):
            return None, fn(x)
        with torch.inference_mode(False):  # a normal tensor: later calls may copy into it under no_grad alone
            static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        stream = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):  # the second call runs as every later one will: nothing left to set up
                expected = fn(static_in)
        stream.wait_stream(side)
        if not isinstance(expected, torch.Tensor):
            return None, expected
        if expected.is_cuda:  # made on the side stream, used on this one: not reused before this one is done with it
            expected.record_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = fn(static_in)
        except RuntimeError:  # an op that syncs with the host or moves data off the device: not capturable
            return None, expected
        graph.replay()
        tolerance = _REPLAY_TOLERANCE.get(expected.dtype)
        same = (tolerance is not None and static_out.shape == expected.shape and static_out.dtype == expected.dtype
                and bool(((static_out.double() - expected.double()).abs().max()
                          <= tolerance * expected.double().abs().max()).item()))
        if not same:
            return None, expected
        kept = [(t, t._version, t.data_ptr()) for t in {id(t): t for t in constants}.values()]
        return cls(graph, static_in, static_out, kept), expected

    def valid(self) -> bool:
        """False once a constant was changed in place (the graph would read the new values, but a recording is
        rebuilt on any change, as a chain is) or given new storage (the graph would read the old)."""
        return all(t._version == v and t.data_ptr() == p for t, v, p in self._constants)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._in.copy_(x)
        self._graph.replay()
        return self._out.clone()
