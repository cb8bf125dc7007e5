"""Seeded fuzzer for every public op on every usable backend (run by tests/test_fuzz.py in a subprocess, so a
crash of the process is a failure too).

Each case draws an op, shapes, a dtype, a layout and, one time in three, one bad argument. On every backend the
call must either raise TypeError / ValueError / RuntimeError with a message naming the bad argument, or (for
valid arguments) return what the reference returns under the project's tolerance rule (tests/helpers.py), for the
output, the running statistics it updates and, for fp32, the gradient of x.

    python tests/fuzz_ops.py [--seconds 45] [--seed 0]     # exit status 1 with the failing cases listed
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's packages, whatever is installed; tests/helpers

import shvit_kernels as K  # noqa: E402

from helpers import DEVICE  # noqa: E402
from shvit_kernels.dispatch import usable_backends  # noqa: E402
from shvit_kernels.testing import assert_close_to_fp64  # noqa: E402

# Judge each kernel's own result (a first-use check would hand back the reference's for a wrong kernel).
K.dispatch.set_verify(False)

ERRORS = (TypeError, ValueError, RuntimeError)
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16)


def randn(rng, *shape, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def layout(rng, x):
    """x as NCHW, channels_last, or a strided view that is neither."""
    kind = rng.choice(("nchw", "cl", "strided"))
    if kind == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.cat([x, x], dim=3)
        return wide[..., : x.shape[3]]
    return x


def bn_params(rng, c, dtype):
    p = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(bn_weight=randn(rng, c, dtype=p, scale=0.3) + 1, bn_bias=randn(rng, c, dtype=p, scale=0.3),
                running_mean=randn(rng, c, dtype=p, scale=0.3), running_var=randn(rng, c, dtype=p).abs() * 0.2 + 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Case builders: (fn, tensors, scalars); fn(**tensors, **scalars) calls the public op.
# ---------------------------------------------------------------------------------------------------------------
def conv_case(rng, dtype, training):
    n, c_in = rng.randint(1, 3), rng.choice((1, 3, 4, 8, 16, 24))
    kind = rng.choice(("1x1", "dw3", "dense3", "grouped"))
    k, groups = (1, 1) if kind == "1x1" else (3, c_in if kind == "dw3" else 1)
    if kind == "grouped":
        groups = rng.choice([g for g in (1, 2, 4) if c_in % g == 0])
        k = rng.choice((1, 3))
    c_out = c_in if kind == "dw3" else rng.choice((1, 4, 8, 16)) * groups
    stride, padding = rng.choice((1, 2)), k // 2
    h, w = rng.randint(1, 9), rng.randint(1, 9)
    scale = rng.choice((1.0, 1.0, 1e3))
    x = layout(rng, randn(rng, n, c_in, h, w, dtype=dtype, scale=scale))
    t = dict(x=x, weight=randn(rng, c_out, c_in // groups, k, k, dtype=dtype, scale=((c_in // groups) * k * k) ** -0.5))
    s = dict(stride=stride, padding=padding, groups=groups, relu=rng.random() < 0.5)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    if rng.random() < 0.3:
        t["residual"] = layout(rng, randn(rng, n, c_out, ho, wo, dtype=dtype))
    if training is None:
        t["bias"] = randn(rng, c_out, dtype=dtype, scale=0.1)
        return K.conv_bias_act, t, s
    t.update(bn_params(rng, c_out, dtype))
    s.update(training=training, eps=rng.choice((1e-5, 1e-3, 0.0 if not training else 1e-5)))
    if training and n * ho * wo < 2:
        t["x"] = layout(rng, randn(rng, 2, c_in, h + 2, w + 2, dtype=dtype))  # BN needs 2+ values per channel
        if "residual" in t:
            ho, wo = (h + 2 + 2 * padding - k) // stride + 1, (w + 2 + 2 * padding - k) // stride + 1
            t["residual"] = randn(rng, 2, c_out, ho, wo, dtype=dtype)
    fn = K.conv_bn
    return (lambda x, weight, bn_weight, bn_bias, running_mean, running_var, **kw:
            fn(x, weight, bn_weight, bn_bias, running_mean, running_var, **kw)), t, s


def ffn_case(rng, dtype, training):
    n, c = rng.randint(1, 3), rng.choice((1, 4, 8, 16, 24))
    hidden = rng.choice((1, 2, 4)) * c
    h, w = rng.randint(1, 7), rng.randint(1, 7)
    if training and n * h * w < 2:
        n = 2
    x = layout(rng, randn(rng, n, c, h, w, dtype=dtype))
    w1, w2 = randn(rng, hidden, c, 1, 1, dtype=dtype, scale=c ** -0.5), randn(rng, c, hidden, 1, 1, dtype=dtype, scale=hidden ** -0.5)
    if training is None:
        t = dict(x=x, w1=w1, b1=randn(rng, hidden, dtype=dtype, scale=0.1), w2=w2, b2=randn(rng, c, dtype=dtype, scale=0.1))
        return K.ffn_fused, t, {}
    p1, p2 = bn_params(rng, hidden, dtype), bn_params(rng, c, dtype)
    t = dict(x=x, w1=w1, w2=w2, **{f"pw1_{k}": v for k, v in p1.items()}, **{f"pw2_{k}": v for k, v in p2.items()})
    order = ("bn_weight", "bn_bias", "running_mean", "running_var")

    def fn(x, w1, w2, training, **bn):
        return K.ffn(x, (w1, *(bn[f"pw1_{k}"] for k in order)), (w2, *(bn[f"pw2_{k}"] for k in order)), training=training)

    return fn, t, dict(training=training)


def shsa_case(rng, dtype, training):
    n, c = rng.randint(1, 3), rng.choice((4, 8, 16, 24, 40))
    p, qk = rng.choice([v for v in (1, 2, 4, 8, 16) if v <= c]), rng.choice((1, 4, 8, 16))
    h, w = rng.randint(1, 7), rng.randint(1, 7)
    if training and n * h * w < 2:
        n = 2
    x = layout(rng, randn(rng, n, c, h, w, dtype=dtype))
    rows = 2 * qk + p
    weight = randn(rng, rows, p, 1, 1, dtype=dtype, scale=p ** -0.5)
    if training is None:
        return K.shsa_fused, dict(x=x, qkv_weight=weight, qkv_bias=randn(rng, rows, dtype=dtype, scale=0.1)), dict(qk_dim=qk)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    t = dict(x=x, gn_weight=randn(rng, p, dtype=pd, scale=0.3) + 1, gn_bias=randn(rng, p, dtype=pd, scale=0.3),
             qkv_weight=weight, **bn_params(rng, rows, dtype))
    return K.shsa, t, dict(qk_dim=qk, training=training)


CASES = {
    "conv_bias_act": lambda rng, dt: conv_case(rng, dt, None),
    "conv_bn(eval)": lambda rng, dt: conv_case(rng, dt, False),
    "conv_bn(train)": lambda rng, dt: conv_case(rng, dt, True),
    "ffn_fused": lambda rng, dt: ffn_case(rng, dt, None),
    "ffn(eval)": lambda rng, dt: ffn_case(rng, dt, False),
    "ffn(train)": lambda rng, dt: ffn_case(rng, dt, True),
    "shsa_fused": lambda rng, dt: shsa_case(rng, dt, None),
    "shsa(eval)": lambda rng, dt: shsa_case(rng, dt, False),
    "shsa(train)": lambda rng, dt: shsa_case(rng, dt, True),
}


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments: each returns (name the error must mention, mutated tensors, mutated scalars) or None.
# ---------------------------------------------------------------------------------------------------------------
def mutate(rng, t, s):
    choices = []
    tensor_names = [k for k in t if t[k] is not None]
    name = rng.choice(tensor_names)
    v = t[name]
    choices.append(("not a tensor", name, lambda: {**t, name: v.tolist()}, s))
    choices.append(("int tensor", name, lambda: {**t, name: v.to(torch.int32)}, s))
    choices.append(("meta device", name, lambda: {**t, name: torch.empty_like(v, device="meta")}, s))
    zero = list(v.shape)
    zero[rng.randrange(len(zero))] = 0
    choices.append(("zero-size dimension", name, lambda: {**t, name: torch.zeros(zero, dtype=v.dtype)}, s))
    wrong = list(v.shape)
    wrong[rng.randrange(min(v.dim(), 2))] += 1  # a channel count: another kernel size would be a valid conv
    if name != "x":  # a bigger x can be valid; a parameter with another channel count never is
        choices.append(("wrong shape", name, lambda: {**t, name: torch.zeros(wrong, dtype=v.dtype)}, s))
    choices.append(("extra dimension", name, lambda: {**t, name: v.unsqueeze(0)}, s))
    for key, bad in (("stride", 0), ("stride", -1), ("padding", -1), ("groups", 0), ("eps", -1e-3), ("qk_dim", 0),
                     ("stride", 1.5)):
        if key in s:
            choices.append((f"{key}={bad}", key, lambda key=key, bad=bad: t, {**s, key: bad}))
    what, must_name, tensors, scalars = rng.choice(choices)
    # The names an error may use: FFN tensors are flattened here (pw1_bn_weight) and, in training, checked by
    # conv_bn under its own names (weight, bn_weight).
    names = {must_name, must_name.split("_", 1)[1] if must_name.startswith(("pw1_", "pw2_")) else must_name}
    if must_name in ("w1", "w2"):
        names |= {"weight", "pw" + must_name[1]}
    if what == "wrong shape":  # a mismatch between two arguments: naming either one is clear
        names |= {k.split("_", 1)[1] if k.startswith(("pw1_", "pw2_")) else k for k in t} | {"weight", "pw1", "pw2"}
    return what, tuple(sorted(names)), tensors(), scalars


# ---------------------------------------------------------------------------------------------------------------
def _clone(t):
    return {k: (v.clone() if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in t.items()}


def _run(fn, t, s, backend, grad):
    t = _clone(t)
    if grad:
        t["x"] = t["x"].detach().requires_grad_()
    with K.use_backend(backend):
        out = fn(**t, **s)
        # A random incoming gradient: with ones, a BatchNorm's input gradient is zero up to rounding noise.
        seed = torch.Generator().manual_seed(out.numel())
        g_out = torch.randn(out.shape, generator=seed, dtype=torch.float64).to(out.device, out.dtype) if grad else None
        g = torch.autograd.grad(out, t["x"], g_out)[0] if grad else None
    stats = [t[k] for k in sorted(t) if k.endswith("running_mean") or k.endswith("running_var")]
    return out, stats, g


def _as64(t):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}


def check_case(rng, backends, failures, counts):
    op = rng.choice(list(CASES))
    dtype = rng.choice(DTYPES)
    fn, t, s = CASES[op](rng, dtype)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    bad = rng.random() < 1 / 3
    if bad:
        what, must_name, t, s = mutate(rng, t, s)
    label = f"{op} {dtype} {('BAD ' + what) if bad else 'valid'} shapes {[tuple(v.shape) for v in t.values() if hasattr(v, 'shape')]} {s}"
    grad = not bad and dtype == torch.float32 and rng.random() < 0.5
    expected = None
    for backend in backends:
        counts[backend] = counts.get(backend, 0) + 1
        try:
            got, got_stats, got_grad = _run(fn, t, s, backend, grad)
        except ERRORS as e:
            message = str(e)
            if "was forced but cannot run" in message:
                continue  # a forced backend refusing what it has no kernel for (fp64, fp16, ...): documented
            if not bad:
                failures.append(f"{backend}: {label}: valid arguments raised {type(e).__name__}: {message[:300]}")
            elif not any(name in message for name in must_name):
                failures.append(f"{backend}: {label}: error names none of {must_name}: {type(e).__name__}: {message[:300]}")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception type is a failure
            failures.append(f"{backend}: {label}: unexpected {type(e).__name__}: {str(e)[:300]}")
            continue
        if bad:
            failures.append(f"{backend}: {label}: bad argument accepted")
            continue
        if expected is None:
            eager = _run(fn, t, s, "reference", grad)
            ref64 = _run(fn, _as64(t), s, "reference", grad)
            expected = (eager, ref64)
        (e_out, e_stats, e_grad), (r_out, r_stats, r_grad) = expected
        try:
            assert_close_to_fp64(got, e_out, r_out, name="output")
            for i, (a, b, c) in enumerate(zip(got_stats, e_stats, r_stats)):
                assert_close_to_fp64(a, b, c, name=f"running statistic {i}")
            if grad:
                assert_close_to_fp64(got_grad, e_grad, r_grad, name="grad x")
        except AssertionError as e:
            failures.append(f"{backend}: {label}: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SHVIT_FUZZ_SECONDS", 45)))
    p.add_argument("--seed", type=int, default=int(os.environ.get("SHVIT_FUZZ_SEED", 0)))
    p.add_argument("--max-cases", type=int, default=100000)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backends = ["reference", *usable_backends(DEVICE)]
    if DEVICE == "cpu":
        backends = [b for b in backends if b != "triton"]  # the Triton interpreter is too slow for this loop
    rng = random.Random(args.seed)
    failures, counts, cases = [], {}, 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and cases < args.max_cases:
        try:
            check_case(rng, backends, failures, counts)
        except Exception:  # noqa: BLE001 - a bug in the fuzzer itself is reported, not hidden
            failures.append("fuzzer error:\n" + traceback.format_exc())
        cases += 1
        if len(failures) >= 20:
            break
    print(f"fuzz: seed {args.seed}, {cases} cases, calls per backend {counts}, {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
