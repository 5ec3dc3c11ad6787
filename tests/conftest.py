"""Shared pytest setup: strict numerics, fresh PRNG keys, tiny shapes, shared test models."""

import itertools
import os
import shutil
import tempfile

import jaxadv  # noqa: F401 - first, as users do: its XLA:CPU flag only takes effect before JAX starts a backend
import jax
import pytest

# Catch silent broadcasting and promotion bugs: library code must not rely on implicit rank
# promotion or on mixing dtypes (f32 with f64, ints with floats) without saying so.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# In-process CLI calls would turn on the persistent compilation cache of ~/.cache (a global
# jax.config switch), so later tests would depend on which ran before and on earlier
# sessions. Instead every test of a pytest process, from the first, shares one fresh
# cache: a program compiled again (the same attack in another test, a CLI call's model) is
# read back. A cache hit is the same executable, so results cannot depend on it.
os.environ["JAXADV_XLA_CACHE"] = "0"
# One cache per pytest process (each pytest-xdist worker its own: JAX writes entries
# without locking, so two processes must not share one), removed at the end.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxadv-test-xla-")
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture
def getkey():
    """Hands out fresh PRNG keys, never the same one twice within a test."""
    counter = itertools.count()
    root = jax.random.key(0)
    return lambda: jax.random.fold_in(root, next(counter))


@pytest.fixture
def real_archive():
    """Path of the real CIFAR-10 archive from JAXADV_DATA, or skip with a visible reason."""
    path = os.environ.get("JAXADV_DATA")
    if not path or not os.path.exists(path):
        pytest.skip("real CIFAR-10 archive not available: set JAXADV_DATA to ../shared/data/cifar10-jpeg.tar.gz")
    return path


@pytest.fixture(scope="session")
def trained_cnn():
    """A tiny CNN trained on three synthetic colour-blob classes: (apply_fn, params, x, correct)."""
    from attack_utils import train_tiny_cnn

    return train_tiny_cnn()
