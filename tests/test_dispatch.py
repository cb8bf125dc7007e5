"""The public dispatch API (shvit_kernels.dispatch): explain, observers, the error when no backend can run a
call, reasons called by argument name, usable backends, temporarily patched backends."""

from __future__ import annotations

import contextlib

import pytest
import torch

import shvit_kernels as K
from shvit_kernels import dispatch


def conv_args():
    x, w = torch.randn(2, 8, 5, 5), torch.randn(8, 1, 3, 3)
    return (x, w, None, 1, 1, 8, False, None)


def test_explain_gives_every_backends_reasons_and_the_choice_that_runs():
    args = conv_args()
    choice = dispatch.explain("conv_bias_act", *args)
    assert set(choice.not_supported) == set(dispatch.BACKENDS)
    assert choice.order == dispatch.order("cpu") and choice.device_type == "cpu" and choice.error is None
    assert choice.not_supported["reference"] == [] and choice.not_supported["cuda"]
    assert choice.kernel is dispatch.kernel(choice.backend, "conv_bias_act")
    assert choice.backend == K.chosen_backend("conv_bias_act", "cpu", *args)
    with dispatch.record() as calls:
        K.conv_bias_act(args[0], args[1], padding=1, groups=8)
    assert [(c.op, c.backend) for c in calls] == [("conv_bias_act", choice.backend)]


def test_explain_names_the_forced_backend_and_its_error():
    with K.use_backend("cuda"):
        choice = dispatch.explain("conv_bias_act", *conv_args())
    assert choice.forced == "cuda" and choice.backend is None and choice.kernel is None
    assert "backend 'cuda' was forced but cannot run op 'conv_bias_act'" in choice.error
    assert set(choice.not_supported) == set(dispatch.BACKENDS)


def test_no_backend_error_lists_every_backends_reasons():
    args = conv_args()
    declined = dict(availability=lambda: [], kernels={"conv_bias_act": lambda *a: None},
                    not_supported={"conv_bias_act": lambda **_: ["planted: cannot"]})
    with dispatch.patched_backend("reference", start_empty=True), dispatch.patched_backend("cpp", start_empty=True, **declined):
        choice = dispatch.explain("conv_bias_act", *args)
        assert choice.backend is None
        with pytest.raises(dispatch.NoBackendError) as info:
            K.conv_bias_act(args[0], args[1], padding=1, groups=8)
    message = str(info.value)
    assert message == choice.error
    assert "no backend can run op 'conv_bias_act' on cpu" in message
    assert "cpp: planted: cannot" in message
    assert "reference: backend 'reference' has no kernel for op 'conv_bias_act'" in message
    # Restored on leaving the blocks.
    assert dispatch.explain("conv_bias_act", *args).not_supported["reference"] == []


def test_reasons_get_the_calls_arguments_by_name():
    seen = {}

    def reasons(x, groups, **rest):
        seen.update(rest, x=x, groups=groups)
        return []

    planted = dict(availability=lambda: [], kernels={"conv_bias_act": lambda *a: None},
                   not_supported={"conv_bias_act": reasons}, slower={"conv_bias_act": lambda stride, **_: [f"stride {stride}"]})
    args = conv_args()
    with dispatch.patched_backend("cpp", start_empty=True, **planted):
        choice = dispatch.explain("conv_bias_act", *args)
    assert set(seen) == set(dispatch.op_arguments("conv_bias_act"))
    assert seen["x"] is args[0] and seen["groups"] == 8
    assert choice.slower["cpp"] == ["stride 1"] and choice.backend == "reference"


def test_observers_see_every_kernel_call_and_can_time_it():
    events = []

    def observer(call):
        events.append(("start", call.op, call.backend))
        return lambda: events.append(("done", call.op))

    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.randn(16, 8, 1, 1, requires_grad=True)
    with dispatch.observe(observer):
        K.conv_bias_act(x, w, relu=True).sum().backward()
    ops = [e[1] for e in events if e[0] == "start"]
    assert ops == ["conv_bias_act", "conv_bias_act_backward"]
    assert [e[0] for e in events] == ["start", "done", "start", "done"]
    K.conv_bias_act(x, w)
    assert len(events) == 4, "the observer must be gone after the block"


def test_usable_backends_follow_device_types_and_availability():
    assert dispatch.usable_backends("cpu", include_reference=True)[-1] == "reference"
    assert "cuda" not in dispatch.usable_backends("cpu") and "triton" not in dispatch.usable_backends("cpu")
    with dispatch.patched_backend("cpp", availability=lambda: ["planted: not built"]):
        assert "cpp" not in dispatch.usable_backends("cpu")
        assert dispatch.unavailable_reasons("cpp") == ["planted: not built"]


def test_register_backend_rejects_reasons_without_a_kernel():
    with dispatch.patched_backend("cuda", start_empty=True):
        with pytest.raises(ValueError, match="without a kernel"):
            dispatch.register_backend("cuda", not_supported={"conv_bias_act": lambda **_: []})


def test_explain_checks_the_argument_count():
    with pytest.raises(TypeError, match="takes 8 arguments"):
        dispatch.explain("conv_bias_act", *conv_args(), None)
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.op_arguments("conv_nothing")


def test_forward_choice_holds_for_a_backward_on_another_thread():
    """use_backend is thread-local; autograd may run the backward elsewhere (on CUDA always): it must follow."""
    import threading

    from shvit_kernels.ops import conv_bn as conv_ops

    # A planted first-choice backend, so automatic dispatch and the forced reference differ on any machine.
    planted = dict(availability=lambda: [], kernels={
        "conv_bias_act": conv_ops.conv_bias_act_reference,
        "conv_bias_act_backward": conv_ops.conv_bias_act_backward_reference,
    })
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w = torch.randn(16, 8, 1, 1, requires_grad=True)
    with dispatch.patched_backend("cpp", start_empty=True, **planted), dispatch.record() as calls:
        for forced in ("reference", "cpp"):
            with K.use_backend(forced):
                loss = K.conv_bias_act(x, w, relu=True).sum()
            errors = []

            def backward():
                try:
                    torch.autograd.grad(loss, [x, w])
                except Exception as e:  # noqa: BLE001 - reported below, not lost with the thread
                    errors.append(e)

            worker = threading.Thread(target=backward)
            worker.start()
            worker.join()
            assert not errors, errors
    assert [(c.op, c.backend) for c in calls] == [
        ("conv_bias_act", "reference"), ("conv_bias_act_backward", "reference"),
        ("conv_bias_act", "cpp"), ("conv_bias_act_backward", "cpp"),
    ]


def _counting_select(monkeypatch):
    """Count the dispatcher's choices (a remembered call makes none)."""
    calls = []
    real = dispatch.select

    def select(op, device_type, args):
        calls.append(op)
        return real(op, device_type, args)

    monkeypatch.setattr(dispatch, "select", select)
    return calls


def test_a_plain_eager_call_is_remembered_with_its_checks_and_choice(monkeypatch):
    """The second call of a signature runs the remembered kernel without checks or choice; its result is the
    same, a call of another signature is checked afresh, and a converted argument is not remembered."""
    from shvit_kernels.ops import conv_bn as conv_ops

    selects = _counting_select(monkeypatch)
    x, w, b = torch.randn(2, 8, 5, 5), torch.randn(16, 8, 1, 1), torch.randn(16)
    expected = conv_ops.conv_bias_act_reference(x, w, b, 1, 0, 1, True, None)
    with torch.inference_mode():
        first = K.conv_bias_act(x, w, b, relu=True)
        second = K.conv_bias_act(torch.randn(2, 8, 5, 5).copy_(x), w, b, relu=True)
        assert selects == ["conv_bias_act"]  # the second call was remembered
        torch.testing.assert_close(first, expected)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        with pytest.raises(ValueError, match="'weight'"):  # another signature: checked again
            K.conv_bias_act(x, torch.randn(16, 7, 1, 1), b)
        wide = b.double()  # converted to x's dtype by the wrapper: such a call is never remembered
        for _ in range(2):
            torch.testing.assert_close(K.conv_bias_act(x, w, wide, relu=True), expected)
        assert selects == ["conv_bias_act"] * 3
        with dispatch.record() as seen:  # observed calls take the full path
            K.conv_bias_act(x, w, b, relu=True)
        assert len(seen) == 1 and len(selects) == 4


@pytest.mark.parametrize("change", ["patched_backend", "use_backend", "set_backend", "autotune_clear", "threads"])
def test_a_remembered_call_follows_every_change_of_the_dispatchers_state(monkeypatch, change):
    from shvit_kernels.ops import conv_bn as conv_ops

    selects = _counting_select(monkeypatch)
    x, w = torch.randn(2, 8, 5, 5), torch.randn(16, 8, 1, 1)
    planted_calls = []

    def planted(*args):
        planted_calls.append(1)
        return conv_ops.conv_bias_act_reference(*args)

    with torch.inference_mode():
        for _ in range(2):
            K.conv_bias_act(x, w)
        assert len(selects) == 1
        if change == "patched_backend":  # every backend before the reference declines; the reference is planted
            with contextlib.ExitStack() as stack:
                for backend in dispatch.order("cpu")[:-1]:
                    stack.enter_context(dispatch.patched_backend(
                        backend, not_supported={"conv_bias_act": lambda **_: ["planted"]}))
                stack.enter_context(dispatch.patched_backend("reference", kernels={"conv_bias_act": planted}))
                K.conv_bias_act(x, w)
            K.conv_bias_act(x, w)  # restored: not the planted kernel
            assert planted_calls == [1]
        elif change == "use_backend":
            with dispatch.patched_backend("reference", kernels={"conv_bias_act": planted}):
                K.conv_bias_act(x, w)  # not forced: the usual choice, remembered for the new registration
                with K.use_backend("reference"):
                    K.conv_bias_act(x, w)
            assert planted_calls == [1]
        elif change == "set_backend":
            with dispatch.patched_backend("reference", kernels={"conv_bias_act": planted}):
                K.conv_bias_act(x, w)
                K.set_backend("reference")
                try:
                    K.conv_bias_act(x, w)
                finally:
                    K.set_backend(None)
            assert planted_calls == [1]
        elif change == "autotune_clear":
            K.autotune.clear()
            K.conv_bias_act(x, w)
        elif change == "threads":
            threads = torch.get_num_threads()
            torch.set_num_threads(threads + 1)
            try:
                K.conv_bias_act(x, w)
            finally:
                torch.set_num_threads(threads)
        assert len(selects) >= 2, "the change did not reach the call"
