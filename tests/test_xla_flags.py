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
@pytest.mark.filterwarnings("ignore:jaxadv. JAX's CPU backend started")
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


@pytest.mark.parametrize("first, warned", [("import jaxadv; import jax; jax.numpy.zeros(1)", False),
                                           ("import jax; jax.numpy.zeros(1); import jaxadv", True),
                                           ("import jax; import jaxadv; jax.numpy.zeros(1)", False)])
def test_a_backend_started_before_jaxadv_is_reported_once(first, warned):
    # `import jax` alone starts no backend; a computation before `import jaxadv` does, and
    # then the flag can no longer take effect: the user gets one warning naming the fix.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXADV_XLA_DEFAULTS")}
    code = f"import warnings; warnings.simplefilter('default'); {first}; import jaxadv"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expect = warned and _xla_flags._jaxlib_version() is not None and \
        _xla_flags._VERIFIED[0] <= _xla_flags._jaxlib_version() < _xla_flags._VERIFIED[1]  # fmt: skip
    assert out.stderr.count("started before `import jaxadv`") == (1 if expect else 0), out.stderr
    if expect:
        assert _xla_flags.FLAG in out.stderr
