"""Autotuned dispatch (shvit_kernels.autotune): the fastest backend per call signature, remembered in memory
and in a per-machine cache file; switches; the fixed order when off."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import shvit_kernels as K
from shvit_kernels import autotune, dispatch
from shvit_kernels.ops import conv_bn as conv_ops


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-thread conv keeps its time on a loaded machine
    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setenv(autotune.ENV_VAR, "inference")
    autotune.set_autotune(None)
    autotune.clear()
    yield
    autotune.set_autotune(None)
    autotune.clear()
    torch.set_num_threads(threads)


def slow_planted_cpp(calls):
    """A 'cpp' backend, first in the CPU order, whose conv_bias_act is right but slow."""

    def slow(*args):
        calls.append(1)
        time.sleep(0.05)  # far slower than the reference conv, even on a loaded machine
        return conv_ops.conv_bias_act_reference(*args)

    return dispatch.patched_backend("cpp", start_empty=True, availability=lambda: [], kernels={"conv_bias_act": slow})


def x_w():
    return torch.randn(2, 8, 6, 6), torch.randn(16, 8, 1, 1)


def test_first_call_times_the_backends_and_later_calls_only_look_up():
    calls = []
    x, w = x_w()
    with slow_planted_cpp(calls), dispatch.record() as ran:
        K.conv_bias_act(x, w)
        timed = len(calls)
        K.conv_bias_act(x, w)
        K.conv_bias_act(x, w)
    assert timed >= autotune.MIN_REPS, "the first call must have timed the planted backend"
    assert len(calls) == timed, "later calls of the signature must not time anything"
    assert [c.backend for c in ran] == ["reference"] * 3, "the faster backend runs, although cpp comes first"
    (key, backend), = autotune.cached_choices().items()
    assert backend == "reference" and key.startswith("conv_bias_act cpu threads=")
    # Another shape is another signature.
    with slow_planted_cpp(calls):
        K.conv_bias_act(torch.randn(1, 8, 6, 6), w)
    assert len(autotune.cached_choices()) == 2


def test_choices_survive_in_the_cache_file_and_a_corrupt_file_is_ignored(tmp_path):
    calls = []
    x, w = x_w()
    with slow_planted_cpp(calls):
        K.conv_bias_act(x, w)
    path = autotune.cache_path()
    assert os.path.dirname(path) == str(tmp_path)
    data = json.loads(open(path).read())
    assert data["machine"] == autotune.machine() and list(data["choices"].values()) == ["reference"]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == [], "writes go through a renamed temp file"
    autotune.clear()  # a new process: only the file remembers
    calls.clear()
    with slow_planted_cpp(calls):
        K.conv_bias_act(x, w)
    assert calls == [], "the cached choice must be used without timing"
    with open(path, "w") as f:
        f.write("{not json")
    autotune.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the autotune cache"):
        assert autotune.cached_choices() == {}
    with slow_planted_cpp(calls):
        K.conv_bias_act(x, w)
    assert json.loads(open(path).read())["choices"], "the corrupt file is replaced on the next tuning"


def test_switches_and_the_fixed_order_when_off():
    calls = []
    x, w = x_w()
    with slow_planted_cpp(calls), dispatch.record() as ran:
        autotune.set_autotune(False)
        K.conv_bias_act(x, w)
        with autotune.autotune(True):
            K.conv_bias_act(x, w)
        with autotune.autotune(False):
            K.conv_bias_act(x, w)
        autotune.set_autotune(None)
        os.environ[autotune.ENV_VAR] = "off"
        K.conv_bias_act(x, w)
    assert [c.backend for c in ran] == ["cpp", "reference", "cpp", "cpp"]
    with pytest.raises(ValueError, match="autotune mode"):
        autotune.set_autotune("sometimes")


def test_forced_backends_and_training_ops_are_not_tuned_by_default():
    calls = []
    x, w = x_w()
    with slow_planted_cpp(calls), dispatch.record() as ran:
        with K.use_backend("cpp"):
            K.conv_bias_act(x, w)
        with K.prefer_backend("cpp"):
            K.conv_bias_act(x, w)
    assert [c.backend for c in ran] == ["cpp", "cpp"] and len(calls) == 2
    assert autotune.cached_choices() == {}
    assert autotune.applies("conv_bias_act") and not autotune.applies("conv_bn_train")
    with autotune.autotune("all"):
        assert autotune.applies("conv_bn_train_backward")


def test_candidates_are_timed_interleaved():
    """One call of each candidate per round, so drift on the machine hits every candidate alike."""
    order = []
    candidates = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = autotune.time_candidates(candidates, (), "cpu")
    assert set(times) == {"a", "b", "c"}
    warmup, timed = order[:3], order[3:]
    assert warmup == ["a", "b", "c"] and len(timed) >= 3 * autotune.MIN_REPS
    assert timed == ["a", "b", "c"] * (len(timed) // 3), "the timed calls must alternate between candidates"


def test_a_failing_candidate_is_left_out():
    def broken():
        raise RuntimeError("no kernel for this")

    times = autotune.time_candidates({"broken": broken, "ok": lambda: None}, (), "cpu")
    assert list(times) == ["ok"]


def test_noise_does_not_move_a_choice_off_the_preferred_candidate():
    margin = autotune.TIE_MARGIN
    assert autotune.fastest({"first": 1.0, "second": 1.0 - margin / 2}, preferred="first") == "first"
    assert autotune.fastest({"first": 1.0, "second": 1.0 - 2 * margin}, preferred="first") == "second"
    assert autotune.fastest({"first": 1.0, "second": 0.5, "third": 0.4}, preferred="first") == "third"
