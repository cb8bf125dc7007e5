"""The dispatcher's environment variables take effect at any time, also for calls whose choice was remembered,
and a bad value raises on every read (shvit_kernels._env caches only successful parses)."""

from __future__ import annotations

import os

import pytest
import torch

import shvit_kernels as K
from shvit_kernels import autotune, dispatch
from shvit_kernels._env import EnvSetting


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch):
    for name in (dispatch.ENV_VAR, autotune.ENV_VAR, dispatch.VERIFY_ENV_VAR):
        monkeypatch.delenv(name, raising=False)


def test_forced_backend_follows_the_environment(monkeypatch):
    assert dispatch.forced_backend() is None
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.forced_backend() == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, " Auto ")
    assert dispatch.forced_backend() is None
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    for _ in range(2):  # not cached
        with pytest.raises(ValueError, match=f"{dispatch.ENV_VAR}='nonsense'"):
            dispatch.forced_backend()
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.forced_backend() is None


def test_autotune_mode_and_verification_follow_the_environment(monkeypatch):
    dispatch.set_verify(None)  # the suite turns verification off in code (conftest); here the environment rules
    assert autotune.mode() == "inference" and dispatch.verify_enabled()
    monkeypatch.setenv(autotune.ENV_VAR, "off")
    monkeypatch.setenv(dispatch.VERIFY_ENV_VAR, "0")
    assert autotune.mode() == "off" and not dispatch.verify_enabled()
    monkeypatch.setenv(autotune.ENV_VAR, "1")
    monkeypatch.setenv(dispatch.VERIFY_ENV_VAR, "yes")
    assert autotune.mode() == "all" and dispatch.verify_enabled()
    monkeypatch.setenv(autotune.ENV_VAR, "sometimes")
    for _ in range(2):
        with pytest.raises(ValueError, match=f"{autotune.ENV_VAR}='sometimes'"):
            autotune.mode()


def test_a_remembered_call_sees_the_environment_change(monkeypatch):
    """Plain eager calls reuse their signature's kernel; setting SHVIT_KERNELS_BACKEND must still move them."""
    usable = [b for b in dispatch.usable_backends("cpu") if b != "reference"]
    if not usable:
        pytest.skip("only the reference backend runs here: nothing to move a call away from")
    x, w, b = torch.randn(2, 8, 6, 6), torch.randn(8, 8, 1, 1), torch.randn(8)
    calls = []
    reference = dispatch.kernel("reference", "conv_bias_act")

    def counting(*args):
        calls.append(args)
        return reference(*args)

    patched = dispatch.patched_backend("reference", kernels={"conv_bias_act": counting})
    with torch.inference_mode(), autotune.autotune(False), patched:  # untuned: no timing calls of the reference
        for _ in range(2):
            expected = K.conv_bias_act(x, w, b)  # automatic: another backend, remembered on the second call
        assert calls == []
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        for _ in range(2):
            torch.testing.assert_close(K.conv_bias_act(x, w, b), expected)
        assert len(calls) == 2
        monkeypatch.delenv(dispatch.ENV_VAR)
        K.conv_bias_act(x, w, b)
        assert len(calls) == 2


def test_env_setting_without_cpythons_environ_mapping(monkeypatch):
    """Where os.environ is not CPython's _Environ (no raw mapping), the setting reads os.environ.get."""
    fake = {"SHVIT_TEST_SETTING": "3"}
    monkeypatch.setattr(os, "environ", fake)
    setting = EnvSetting("SHVIT_TEST_SETTING", lambda v: None if v is None else int(v))
    assert setting() == 3
    fake["SHVIT_TEST_SETTING"] = "4"
    assert setting() == 4
    del fake["SHVIT_TEST_SETTING"]
    assert setting() is None


def test_env_setting_parses_only_changed_values(monkeypatch):
    parsed = []

    def parse(value):
        parsed.append(value)
        return value

    setting = EnvSetting("SHVIT_TEST_SETTING", parse)
    monkeypatch.delenv("SHVIT_TEST_SETTING", raising=False)
    assert [setting(), setting()] == [None, None]
    monkeypatch.setenv("SHVIT_TEST_SETTING", "a")
    assert [setting(), setting()] == ["a", "a"]
    monkeypatch.setenv("SHVIT_TEST_SETTING", "b")
    assert setting() == "b"
    assert parsed == [None, "a", "b"]
