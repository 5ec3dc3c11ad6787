"""Tests for jaxadv.data.augment: random crop and flip, crop, to_float (under strict dtype promotion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import data


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    """Device-side data ops must not mix dtypes implicitly (conftest may set this globally too)."""
    with jax.numpy_dtype_promotion("strict"):
        yield


jit_augment = jax.jit(data.augment, static_argnames=("pad", "pad_mode", "flip"))


def _distinct_images(b, h=8, w=8, dtype=np.uint8, seed=0):
    """Images whose windows are all different, so a window identifies its offset."""
    x = np.random.default_rng(seed).permutation(b * h * w * 3) % 251
    return x.reshape(b, h, w, 3).astype(dtype)


def _window_offsets(out, x, pad, mode, flipped_ok):
    """Per example: the (row, col, flipped) of the padded window equal to the output, or fail."""
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    found = []
    for i in range(len(x)):
        windows = {
            (r, c, f): window[:, ::-1] if f else window
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            for window in [padded[i, r : r + h, c : c + w]]
            for f in ((False, True) if flipped_ok else (False,))
        }
        matches = [where for where, window in windows.items() if np.array_equal(out[i], window)]
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    return found


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_augment_preserves_shape_dtype_and_is_deterministic(getkey, dtype, pad_mode):
    x = jnp.asarray(_distinct_images(6, 32, 32, dtype))
    key = getkey()
    y = jit_augment(key, x, pad=4, pad_mode=pad_mode)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(y, jit_augment(key, x, pad=4, pad_mode=pad_mode))
    assert np.array_equal(y, data.augment(key, x, pad=4, pad_mode=pad_mode))  # jit == eager
    assert not np.array_equal(y, jit_augment(getkey(), x, pad=4, pad_mode=pad_mode))


def test_augment_flip_only_is_identity_or_mirror_per_example(getkey):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=0))
    same = np.all(y == x, axis=(1, 2, 3))
    mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert 10 < mirrored.sum() < 54  # about half
    assert np.array_equal(jit_augment(getkey(), jnp.asarray(x), pad=0, flip=False), x)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_augment_crop_is_a_window_of_the_padded_input(getkey, pad_mode):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=2, pad_mode=pad_mode, flip=False))
    offsets = {(r, c) for r, c, _ in _window_offsets(y, x, 2, pad_mode, flipped_ok=False)}
    assert len(offsets) > 10  # per-example offsets, spread over the 5x5 possibilities
    assert {r for r, _ in offsets} == {c for _, c in offsets} == set(range(5))  # incl. both extremes


def test_augment_crop_and_flip_together(getkey):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=2))
    found = _window_offsets(y, x, 2, "reflect", flipped_ok=True)
    assert 10 < sum(f for _, _, f in found) < 54


def test_crop_matches_numpy_reference():
    x = _distinct_images(5)
    offsets = np.array([[0, 0], [2, 1], [1, 2], [2, 2], [0, 1]], np.int32)
    out = np.asarray(data.crop(jnp.asarray(x), jnp.asarray(offsets), (6, 6)))
    expected = np.stack([x[i, r : r + 6, c : c + 6] for i, (r, c) in enumerate(offsets)])
    assert np.array_equal(out, expected)


def test_augment_rejects_bad_static_args(getkey):
    with pytest.raises(ValueError, match="pad_mode"):
        data.augment(getkey(), jnp.zeros((1, 8, 8, 3)), pad_mode="edge")
    with pytest.raises(ValueError, match="pad"):
        data.augment(getkey(), jnp.zeros((1, 8, 8, 3)), pad=-1)


def test_to_float():
    x = np.array([[0, 51, 255]], np.uint8)
    y = data.to_float(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), [[0.0, 0.2, 1.0]], rtol=1e-6)
    assert np.array_equal(jax.jit(data.to_float)(jnp.asarray(x)), y)
