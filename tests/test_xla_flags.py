"""jaxadv's XLA:CPU default flag: added only when safe, never over the user's choice."""

import os
import subprocess
import sys

import pytest

from jaxadv import _xla_flags


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_xla_flags, "_backends_started", lambda: False)
    monkeypatch.setattr(_xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.delenv("JAXADV_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    return monkeypatch


def test_flag_is_appended_to_existing_flags(fresh):
    assert _xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + _xla_flags.FLAG


@pytest.mark.parametrize("setup", [
    lambda m: m.setenv("JAXADV_XLA_DEFAULTS", "0"),
    lambda m: m.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"),
    lambda m: m.setattr(_xla_flags, "_jaxlib_version", lambda: (0, 11, 0)),
    lambda m: m.setattr(_xla_flags, "_jaxlib_version", lambda: (0, 10, 1)),
    lambda m: m.setattr(_xla_flags, "_jaxlib_version", lambda: None),
    lambda m: m.setattr(_xla_flags, "_backends_started", lambda: True),
], ids=["opt-out", "user-choice", "newer-jaxlib", "older-jaxlib", "unknown-jaxlib", "backend-started"])
def test_flag_is_left_out(fresh, setup):
    setup(fresh)
    before = os.environ["XLA_FLAGS"]
    assert not _xla_flags.apply_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == before


def test_import_sets_a_flag_the_installed_xla_accepts():
    # A fresh interpreter: importing jaxadv sets the flag (on a verified jaxlib) and XLA,
    # which aborts on unknown flags, starts and computes with it.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXADV_XLA_DEFAULTS")}
    code = ("import os, jaxadv, jax.numpy as jnp; from jaxadv import _xla_flags as f; "
            "v = f._jaxlib_version(); expect = v is not None and f._VERIFIED[0] <= v < f._VERIFIED[1]; "
            "assert (f.FLAG in os.environ.get('XLA_FLAGS', '')) == expect; "
            "x = jnp.ones((4, 8)); assert float((x @ x.T).sum()) == 128.0; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
