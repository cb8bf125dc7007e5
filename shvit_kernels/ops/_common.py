"""Machinery shared by the op families: op definition with per-call dispatch, argument checks, autocast."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import dispatch
from ..tracing import inlining_reference, untraced_check

NAMESPACE = "shvit"


# ---------------------------------------------------------------------------------------------------------
# Memory format: every 4-D output of every op (and its fake) follows the same rule, so fake and real agree.
# ---------------------------------------------------------------------------------------------------------
def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _output_format(shape, tensor_args: Sequence[torch.Tensor]) -> torch.memory_format:
    """A 4-D output takes the format of the first 4-D input of the same shape, else of the first 4-D input."""
    four_d = [t for t in tensor_args if t.dim() == 4]
    for t in four_d:
        if tuple(t.shape) == tuple(shape):
            return memory_format_of(t)
    return memory_format_of(four_d[0]) if four_d else torch.contiguous_format


def _tensor_args(args) -> list:
    return [a for a in args if isinstance(a, torch.Tensor)]


_layout_requests: dict = {}  # op name -> fn(args): the memory format the call asks for its 4-D outputs (None: the rule)


def _normalize_outputs(name: str, result, args):
    """``result`` with each 4-D output in the format the call asks for (an op's layout argument), else the rule's."""
    tensors = _tensor_args(args)
    request = _layout_requests.get(name)
    asked = request(args) if request is not None else None

    def fix(t):
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            return t.contiguous(memory_format=asked or _output_format(t.shape, tensors))
        return t

    if isinstance(result, tuple):
        return tuple(fix(t) for t in result)
    return fix(result)


def new_output(shape, dtype, like_args, device, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """Allocate an output (used by fake kernels) in ``memory_format`` if given, else by the format rule above."""
    if memory_format is None:
        four_d = len(shape) == 4
        memory_format = _output_format(shape, _tensor_args(like_args)) if four_d else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def like_x_fake(x, *_):
    """Fake of an op whose one output has x's shape, dtype and layout."""
    return new_output(x.shape, x.dtype, (x,), x.device)


def grads_like_inputs_fake(grad_out, x, *params):
    """Fake of a backward op ``(grad_out, x, *params) -> (grad_x, *grad_params)``."""
    return (new_output(x.shape, x.dtype, (grad_out, x), x.device),
            *(torch.empty_like(p, memory_format=torch.contiguous_format) for p in params))


# ---------------------------------------------------------------------------------------------------------
# Op definition
# ---------------------------------------------------------------------------------------------------------
_op_names: dict = {}  # custom op -> its name, for call_op


def _call_without_autocast(kernel, args, device_type: str):
    """``kernel(*args)``; kernels run with autocast off (the functional wrappers already cast)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return kernel(*args)
    return kernel(*args)


def _run_kernel(name: str, args, direct: bool = False, remember: bool = False):
    """Run the kernel the dispatcher picks for ``args``; ``remember``: a plain eager call whose arguments are the
    caller's own, unchanged by its checks, so that its signature's next call can take :func:`remembered_call`."""
    device_type = args[0].device.type  # every op's first argument is a tensor
    backend, kernel = dispatch.select(name, device_type, args)
    if dispatch.has_observers():
        done = dispatch.notify(dispatch.DispatchedCall(name, device_type, backend, args, direct))
    else:
        done = ()
    checked = dispatch.needs_first_use_check(backend, name, device_type, args)
    if checked:
        kernel = functools.partial(dispatch.first_use_check, name, device_type, backend, kernel)
    result = _call_without_autocast(kernel, args, device_type)
    for after in done:
        after()
    normalized = _normalize_outputs(name, result, args)
    if remember and not checked and not _capturing(device_type):
        if len(_remembered) >= _REMEMBERED_LIMIT:  # many shapes (dynamic sizes): start afresh
            _remembered.clear()
        try:  # the key after the choice: a first call may have loaded the autotune cache
            _remembered[_eager_key(name, args)] = (kernel, not _same_outputs(normalized, result))
        except TypeError:  # an argument that cannot be hashed: not remembered
            pass
    return normalized


# ---------------------------------------------------------------------------------------------------------
# Remembered plain eager calls. A model calls each op with the same few signatures on every forward; the checks,
# the backend choice and the output-layout rule give the same answer each time, and cost more than a small
# kernel (about 25 us per call, 1.7 ms of S1's batch-1 forward of 9 ms on one CPU thread; Intel Xeon family 6
# model 207, 2026-12-01). A signature that passed them is remembered with its kernel, under the dispatcher's
# selection state, so any change of backends, forcing, autotune mode or choices, or verification starts afresh.
# ---------------------------------------------------------------------------------------------------------
MISS = object()
_REMEMBERED_LIMIT = 4096
_remembered: dict = {}  # _eager_key -> (kernel, whether its outputs need the layout rule)


def _eager_key(name: str, args) -> tuple:
    """The call's signature and the dispatcher's state (hashing it raises TypeError for an unhashable argument)."""
    return (name, dispatch.selection_state(), torch.get_num_threads(),
            *[(a.dtype, a.shape, a.stride(), a.device) if isinstance(a, torch.Tensor) else (type(a), a) for a in args])


def _capturing(device_type: str) -> bool:
    return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _same_outputs(normalized, result) -> bool:
    if isinstance(result, tuple):
        return all(a is b for a, b in zip(normalized, result))
    return normalized is result


def remembered_call(op, args):
    """``op(*args)`` for a plain eager call whose signature an earlier call remembered (its checks passed and its
    kernel was chosen then): the remembered kernel runs directly. Else :data:`MISS`: the caller checks and calls
    as usual, with ``call_op(..., given=args)``. Calls that something observes never take this path."""
    first = args[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in SUPPORTED_DEVICE_TYPES:
        return MISS  # the checks name the problem
    if dispatch.has_observers() or not _plain_eager_call(args):
        return MISS
    try:
        entry = _remembered.get(_eager_key(_op_names[op], args))
    except TypeError:  # an argument that cannot be hashed: never remembered
        return MISS
    if entry is None:
        return MISS
    kernel, normalize = entry
    result = kernel(*args)
    return _normalize_outputs(_op_names[op], result, args) if normalize else result


def _run_checked(name: str, args):
    """``_run_kernel`` for a call whose wrapper checks already ran (an eager forward under autograd, a backward op
    autograd calls): its signature's choice is remembered and reused as a plain call's is."""
    device_type = args[0].device.type
    if not dispatch.has_observers() and not _capturing(device_type):
        try:
            entry = _remembered.get(_eager_key(name, args))
        except TypeError:  # an argument that cannot be hashed: never remembered
            entry = None
        if entry is not None:
            kernel, normalize = entry
            result = _call_without_autocast(kernel, args, device_type)
            return _normalize_outputs(name, result, args) if normalize else result
    return _run_kernel(name, args, direct=True, remember=True)


def schema_argument_names(schema: str) -> Tuple[str, ...]:
    """``("x", "weight", ...)`` from ``"(Tensor x, Tensor weight, ..., bool flag=True) -> ..."``."""
    inside = re.match(r"\s*\((.*?)\)\s*->", schema, re.S)
    if inside is None:
        raise ValueError(f"cannot read the argument list of schema {schema!r}")
    return tuple(part.split("=")[0].split()[-1] for part in inside.group(1).split(","))


def define_op(name: str, schema: str, reference: Callable, fake: Callable,
              output_layout: Optional[Callable] = None):
    """Define ``shvit::name`` from a schema; each call runs the kernel the dispatcher picks for its arguments.

    Kernels run with autocast disabled (the functional wrappers already cast), and their 4-D outputs are
    laid out by the shared memory-format rule, or where ``output_layout(args)`` names a memory format (an op's
    layout argument), in that one.
    """
    names = schema_argument_names(schema)
    if tuple(inspect.signature(reference).parameters) != names:
        raise TypeError(f"{name}: the reference's parameters {tuple(inspect.signature(reference).parameters)} "
                        f"differ from the schema's {names}")
    dispatch.register_backend("reference", kernels={name: reference})
    if output_layout is not None:
        _layout_requests[name] = output_layout

    def impl(*args):
        return _run_kernel(name, dispatch.with_defaults(name, args))

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    dispatch.define_op_arguments(
        name, names, [a.default_value for a in op._opoverload._schema.arguments if a.has_default_value()])
    op.register_fake(fake)
    _op_names[op] = name
    return op


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd`` such that the backward is dispatched under the forward's forced or preferred
    backend, even when autograd runs it on another thread (``use_backend`` is thread-local)."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.dispatch_forcing = dispatch.current_forcing()

    def run_backward(ctx, *grads):
        if ctx.dispatch_forcing is None:  # nothing to re-enter (the context manager costs more than the check)
            return backward(ctx, *grads)
        with dispatch.forcing(ctx.dispatch_forcing):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)
    name = _op_names[op]

    def forward(ctx, *args):
        result = _run_checked(name, args)
        setup(ctx, args, result)
        return result

    # The same formula for eager calls under autograd (see call_op), around the chosen kernel; named at creation,
    # as autograd names its graph nodes (``<name>Backward``) then.
    _eager_autograd[op] = type(f"{name}_eager_autograd", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(run_backward)})


def register_inputs_autograd(op, backward_op) -> None:
    """:func:`register_autograd` for an op whose arguments are all tensors and whose backward op takes
    ``(grad_out, *arguments)`` and returns a gradient for each."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_out):
        return call_backward_op(backward_op, grad_out, *ctx.saved_tensors)

    register_autograd(op, backward, setup)


_eager_autograd: dict = {}  # custom op -> the autograd.Function call_op uses for its eager calls under autograd


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


_OP, _PLAIN, _AUTOGRAD = "op", "plain", "autograd"


def _eager_kind(args) -> str:
    """How :func:`call_op` runs a call: ``_PLAIN`` (the chosen kernel directly) when nothing would see the custom
    op: no compile, tracing, profiler, mode, functorch, subclass, autograd or autocast; ``_AUTOGRAD`` (inside the
    op's own autograd formula) when only autograd would, and maybe autocast; else ``_OP``. One pass: it runs on
    every op call, a hundred times per training step."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() or torch.autograd.profiler._is_profiler_enabled:
        return _OP
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return _OP
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return _OP
    grad = torch.is_grad_enabled()
    recorded = False
    for a in args:
        kind = type(a)
        if kind in _PLAIN_TENSOR_TYPES:
            if grad and not recorded and a.requires_grad:
                recorded = True
        elif isinstance(a, torch.Tensor):  # a subclass
            return _OP
    if recorded:
        return _AUTOGRAD
    # Any device's autocast, not only the op's: one C call, and autocast on another device is rare.
    return _OP if torch._C._is_any_autocast_enabled() else _PLAIN


def _plain_eager_call(args) -> bool:
    """True when nothing would see the custom op: no autograd, compile, tracing, profiler, mode or subclass."""
    return _eager_kind(args) == _PLAIN


def call_op(op, *args, given: Optional[tuple] = None):
    """``op(*args)``, except that a plain eager call (inference, say) runs the chosen kernel directly, and an
    eager call under autograd runs it inside the op's own autograd formula as a ``torch.autograd.Function``.

    Going through the custom-op machinery costs about 10 us per call, about 0.6 ms of a 43 ms S1 forward on
    one CPU thread; under autograd about 190 us per call (a Conv+BN forward and backward took 614 us against
    eager PyTorch's 99 us; Intel Xeon family 6 model 207, 2026-12-01). Wherever torch.compile, tracing, a
    dispatch or function mode, functorch, a tensor subclass or the profiler is involved, or autocast without
    autograd, the op itself runs. ``given``: the caller's arguments before its checks;
    when ``args`` are exactly those, the call is remembered for :func:`remembered_call`.
    """
    kind = _eager_kind(args)
    if kind == _PLAIN:
        remember = given is not None and len(given) == len(args) and all(a is b for a, b in zip(args, given))
        return _run_kernel(_op_names[op], args, direct=True, remember=remember)
    if inlining_reference():  # tracers and exporters record the reference's aten ops (see shvit_kernels.tracing)
        return dispatch.kernel("reference", _op_names[op])(*args)
    eager_autograd = _eager_autograd.get(op)
    if kind == _AUTOGRAD and eager_autograd is not None:
        return eager_autograd.apply(*args)
    return op(*args)


def call_backward_op(op, *args):
    """``op(*args)`` for a backward op inside an autograd formula: a plain call (autograd runs backwards without
    grad) reuses its signature's remembered choice; otherwise as :func:`call_op`."""
    if _plain_eager_call(args):
        return _run_checked(_op_names[op], args)
    return call_op(op, *args)


def needs_autograd(args) -> bool:
    """Whether autograd records a call with these arguments: grad mode on and a tensor that requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# ---------------------------------------------------------------------------------------------------------
# Argument checks: clear errors naming the argument and what was expected.
# ---------------------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


@untraced_check
def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    like: Optional[torch.Tensor] = None,
    same_dtype: bool = False,
    what: str = "",
) -> None:
    # Cheap forms first (about a hundred checks per training step): is_cpu/is_cuda, not device.type (220 ns),
    # and a whole-shape comparison unless the shape has wildcards.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cpu or t.is_cuda) and t.device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"{op}: '{name}' is on the {t.device.type} device; the ops run on CPU and CUDA tensors only")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: '{name}' must be a floating-point tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: '{name}' must be a {ndim}-D tensor{' ' + what if what else ''}, got shape {tuple(t.shape)}")
    if shape is not None:
        if None in shape:
            ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
        else:
            ok = t.shape == tuple(shape)
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: '{name}' must have shape {want}{' ' + what if what else ''}, got {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but 'x' is on {like.device}; all tensors must be on one device")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{op}: '{name}' has dtype {t.dtype} but 'x' has {like.dtype}; they must match")
    if t.numel() == 0:
        raise ValueError(f"{op}: '{name}' must not be empty (it has a zero-size dimension), got shape {tuple(t.shape)}")


@untraced_check
def check_bottleneck_args(op, x, w1, b1, w2, b2, hidden: str = "hidden") -> None:
    """x and two chained 1x1 conv weights, C -> ``hidden`` -> C: w1 (hidden, C, 1, 1), w2 (C, hidden, 1, 1) in x's
    dtype, b1 (hidden,) and b2 (C,) when given (ffn_fused, squeeze_excite)."""
    check_activation(op, x)
    c = x.shape[1]
    check_tensor(op, "w1", w1, ndim=4, like=x, same_dtype=True, what=f"({hidden}, C, 1, 1)")
    inner = w1.shape[0]
    check_tensor(op, "w1", w1, shape=(inner, c, 1, 1), what=f"({hidden}, C={c}, 1, 1)")
    check_tensor(op, "w2", w2, shape=(c, inner, 1, 1), like=x, same_dtype=True, what=f"(C={c}, {hidden}={inner}, 1, 1)")
    if b1 is not None:
        check_tensor(op, "b1", b1, shape=(inner,), like=x)
    if b2 is not None:
        check_tensor(op, "b2", b2, shape=(c,), like=x)


def check_eps(op: str, name: str, eps) -> None:
    """A normalisation epsilon: a finite number >= 0 (every backend's rule; the cpp kernels check it too)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise ValueError(f"{op}: '{name}' must be a finite number >= 0, got {eps!r}")


@untraced_check
def check_activation(op: str, x) -> None:
    check_tensor(op, "x", x, ndim=4, what="(N, C, H, W)")
    if x.numel() == 0:
        raise ValueError(f"{op}: 'x' must not be empty, got shape {tuple(x.shape)}")


def check_param_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """Normalisation parameters may be fp32 (mixed precision) or x's dtype."""
    if t.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: '{name}' must be float32 or the dtype of 'x' ({x.dtype}), got {t.dtype}")


# ---------------------------------------------------------------------------------------------------------
# Autocast: custom ops are opaque to autocast, so the functional wrappers cast like conv2d would.
# ---------------------------------------------------------------------------------------------------------
def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(x: torch.Tensor, *tensors):
    """Cast the activation and the conv weights to the autocast dtype (normalisation parameters stay as they are)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in SUPPORTED_DEVICE_TYPES:
        return (x, *tensors)  # not castable: the argument checks that follow name the problem
    dtype = autocast_dtype(x)
    if dtype is None or not x.is_floating_point() or x.dtype == torch.float64:
        return (x, *tensors)
    return tuple(t if t is None else t.to(dtype) for t in (x, *tensors))


# ---------------------------------------------------------------------------------------------------------
# Reference backward helpers. Autograd does not record inside a custom op's implementation, so the
# reference backwards are written out; tests check them against autograd of the reference forwards.
# ---------------------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reference backwards: fp32 for half types, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


def conv2d(x, weight, bias=None, stride=1, padding=0, groups=1):
    """``F.conv2d``, except that a CPU bf16 convolution with stride > 1 and a one-pixel-wide output runs in fp32 and
    is rounded once (the same products, summed in fp32 as bf16 kernels do): oneDNN's bf16 kernel returned wrong values
    there, up to uninitialised memory (torch 2.13.0, Intel Xeon with AMX, 2026-12-02: 3x3 stride 2 on inputs 1 or 2
    pixels wide and 9 or more tall; fp32 and fp16 were right)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and stride > 1:
        out_w = (x.shape[-1] + 2 * padding - weight.shape[-1]) // stride + 1
        if out_w == 1:
            bias = bias.float() if bias is not None else None
            return torch.nn.functional.conv2d(x.float(), weight.float(), bias, stride, padding, 1, groups).to(x.dtype)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, 1, groups)


def conv_input_grad(x_shape, weight, grad, stride, padding, groups):
    return torch.nn.grad.conv2d_input(x_shape, weight, grad, stride, padding, 1, groups)


def conv_weight_grad(x, weight_shape, grad, stride, padding, groups):
    return torch.nn.grad.conv2d_weight(x, weight_shape, grad, stride, padding, 1, groups)


def batch_norm_backward(g, x_hat, weight, invstd, dims):
    """BatchNorm backward through batch statistics: returns (grad_input, grad_weight, grad_bias).

    ``g`` and ``x_hat`` in the accumulation dtype; the statistics are over ``dims``; weight, invstd broadcastable.
    """
    count = 1
    for d in dims:
        count *= g.shape[d]
    grad_bias = g.sum(dim=dims)
    grad_weight = (g * x_hat).sum(dim=dims)
    shape = [1] * g.dim()
    shape[1] = -1
    grad_input = (weight * invstd).reshape(shape) * (
        g - grad_bias.reshape(shape) / count - x_hat * (grad_weight.reshape(shape) / count)
    )
    return grad_input, grad_weight, grad_bias


def bn_update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In-place running-statistics update as nn.BatchNorm does it (unbiased variance): each running value moves
    ``momentum`` of the way to the batch's, ``(1 - momentum) * running + momentum * batch`` up to rounding, in one
    foreach lerp (five tensor ops took 11 us, a tenth of a training Conv+BN call's Python, one CPU thread)."""
    if running_mean is None or running_var is None:
        return
    unbiased = var * (count / max(count - 1, 1))
    batch = (mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype),
             unbiased if unbiased.dtype == running_var.dtype else unbiased.to(running_var.dtype))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (running_mean, running_var, *batch)):
        with torch.no_grad():
            torch._foreach_lerp_((running_mean, running_var), batch, momentum)
    else:
        torch._foreach_lerp_((running_mean, running_var), batch, momentum)
