"""First-use check of kernels not yet verified on hardware: each call signature's first result is compared
with the reference; a failing kernel is disabled for that signature with one warning. Tested on CPU with
planted backends registered with verify_first_use=True."""

from __future__ import annotations

import warnings

import pytest
import torch

import shvit_kernels as K
from shvit_kernels import dispatch
from shvit_kernels.ops import conv_bn as conv_ops

REFERENCE = conv_ops.conv_bias_act_reference


@pytest.fixture(autouse=True)
def fresh_checks():
    dispatch.set_verify(None)
    dispatch.reset_first_use_checks()
    yield
    dispatch.set_verify(None)
    dispatch.reset_first_use_checks()


def planted(kernel):
    return dispatch.patched_backend("cpp", start_empty=True, availability=lambda: [], verify_first_use=True,
                                    kernels={"conv_bias_act": kernel})


def x_w(batch=2):
    return torch.randn(batch, 8, 5, 5), torch.randn(16, 8, 1, 1)


def test_a_wrong_kernel_is_disabled_for_its_signature_with_one_warning():
    x, w = x_w()
    wrong = lambda *a: REFERENCE(*a) * (1 + 1e-3)  # noqa: E731
    with planted(wrong), dispatch.record() as calls:
        with pytest.warns(RuntimeWarning, match=r"cpp kernel for op 'conv_bias_act' failed its first-use check.*max error"):
            first = K.conv_bias_act(x, w)
        torch.testing.assert_close(first, REFERENCE(x, w, None, 1, 0, 1, False, None), rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = K.conv_bias_act(x, w)  # no second warning
        choice = dispatch.explain("conv_bias_act", x, w, None, 1, 0, 1, False, None)
        with pytest.warns(RuntimeWarning, match="first-use check"):  # another signature is checked afresh
            K.conv_bias_act(*x_w(batch=1))
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert [c.backend for c in calls] == ["cpp", "reference", "cpp"]
    assert choice.backend == "reference" and "disabled for this call signature" in choice.not_supported["cpp"][0]


@pytest.mark.parametrize("how", ["raises", "non-finite"])
def test_a_failing_kernel_returns_the_references_result(how):
    def bad(*args):
        if how == "raises":
            raise RuntimeError("planted launch failure")
        out = REFERENCE(*args)
        out.view(-1)[0] = float("nan")
        return out

    x, w = x_w()
    with planted(bad), pytest.warns(RuntimeWarning, match="planted launch failure" if how == "raises" else "non-finite"):
        got = K.conv_bias_act(x, w)
    torch.testing.assert_close(got, REFERENCE(x, w, None, 1, 0, 1, False, None), rtol=0, atol=0)


def test_a_right_kernel_is_checked_once_then_trusted():
    runs = []

    def right(*args):
        runs.append(1)
        return REFERENCE(*args)

    x, w = x_w()
    with planted(right), dispatch.record() as calls, warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            K.conv_bias_act(x, w)
    assert [c.backend for c in calls] == ["cpp"] * 3 and len(runs) == 3


def test_the_check_can_be_switched_off():
    x, w = x_w()
    wrong = lambda *a: REFERENCE(*a) + 1  # noqa: E731
    dispatch.set_verify(False)
    with planted(wrong), warnings.catch_warnings():
        warnings.simplefilter("error")
        got = K.conv_bias_act(x, w)
    torch.testing.assert_close(got, REFERENCE(x, w, None, 1, 0, 1, False, None) + 1)


def test_gpu_backends_are_checked_until_verified():
    rows = {name: dispatch.explain("conv_bias_act", *x_w(), None, 1, 0, 1, False, None) for name in ("cuda", "triton")}
    assert rows  # explain works for them on CPU; their registration asks for the check:
    for name in ("cuda", "triton"):
        with dispatch.patched_backend(name, availability=lambda: []):
            assert dispatch.needs_first_use_check(name, "conv_bias_act", "cuda", (*x_w(), None, 1, 0, 1, False, None))
