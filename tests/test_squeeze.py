"""Tests for jaxadv.squeeze: SciPy-exact median filter, bit depth, BPDA, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxadv.attacks import fgsm
from jaxadv.squeeze import (
    bit_depth,
    bit_depth_squeezer,
    bpda,
    median_filter,
    median_squeezer,
    squeezed,
)


def random_batch(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape).astype(np.uint8)
    return rng.random(shape).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 6, 1), (1, 1, 2, 2), (1, 2, 1, 1)])
@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_median_filter_equals_scipy_reflect(size, shape, dtype):
    x = random_batch(shape, dtype, seed=size)
    expected = scipy.ndimage.median_filter(x, size=(1, size, size, 1), mode="reflect")
    out = median_filter(jnp.asarray(x), size=size)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_median_filter_even_size_convention():
    # One row [0, 1, 2, 10]: a 2-wide window covers offsets -1..0 and takes the upper of
    # the two middle values, with the half-sample reflection x[-1] = x[0] at the border.
    x = jnp.asarray([0.0, 1.0, 2.0, 10.0]).reshape(1, 1, 4, 1)
    np.testing.assert_array_equal(np.asarray(median_filter(x, size=2)).ravel(), [0, 1, 2, 10])
    # 4-wide window, offsets -2..1: at i=0 the values are x[1], x[0], x[0], x[1] = 1, 0, 0, 1.
    np.testing.assert_array_equal(np.asarray(median_filter(x, size=4)).ravel(), [1, 1, 2, 10])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("method", ["separable", "network", "sort", "opt_med9"])
def test_median_filter_3x3_methods_equal_scipy(method, dtype):
    # uint8 values drawn from 0..3, so ties are frequent and every compare-exchange
    # meets equal inputs.
    x = random_batch((2, 6, 5, 3), dtype, seed=7)
    if dtype == np.uint8:
        x = x % 4
    expected = scipy.ndimage.median_filter(x, size=(1, 3, 3, 1), mode="reflect")
    np.testing.assert_array_equal(np.asarray(median_filter(jnp.asarray(x), size=3, method=method)),
                                  expected)


def test_median_filter_size_one_and_bad_args():
    x = jnp.asarray(random_batch((1, 4, 4, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(median_filter(x, size=1)), np.asarray(x))
    with pytest.raises(ValueError, match="NHWC"):
        median_filter(x[0], size=3)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        median_filter(x, size=0)
    with pytest.raises(ValueError, match="3x3 kernel"):
        median_filter(x, size=5, method="opt_med9")
    with pytest.raises(ValueError, match="3x3 kernel"):
        median_filter(x, size=5, method="separable")


def test_bit_depth_formula_and_idempotence():
    x = jnp.asarray(random_batch((2, 5, 5, 3), np.float32, seed=3))
    for bits in (1, 3, 5, 8):
        levels = 2**bits - 1
        out = bit_depth(x, bits)
        assert out.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(out), np.rint(np.asarray(x) * levels) / levels,
                                   rtol=0, atol=1e-7)
        assert len(np.unique(np.asarray(out))) <= levels + 1
        np.testing.assert_array_equal(np.asarray(bit_depth(out, bits)), np.asarray(out))
    # 8 bits is lossless on images that came from uint8.
    x8 = jnp.asarray(random_batch((1, 4, 4, 3), np.uint8)).astype(jnp.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(bit_depth(x8, 8)), np.asarray(x8))
    with pytest.raises(ValueError, match="bits must be an int"):
        bit_depth(x, 0)
    with pytest.raises(ValueError, match="float images"):
        bit_depth(jnp.zeros((1, 2, 2, 1), jnp.uint8), 4)


@pytest.mark.parametrize(
    "squeezer", [median_squeezer(3), median_squeezer(2), bit_depth_squeezer(3)]
)
def test_bpda_forward_and_identity_gradient(squeezer):
    x = jnp.asarray(random_batch((2, 6, 6, 3), np.float32, seed=11))
    v = jnp.asarray(random_batch((2, 6, 6, 3), np.float32, seed=12)) - 0.5
    straight = bpda(squeezer)
    np.testing.assert_array_equal(np.asarray(straight(x)), np.asarray(squeezer(x)))
    grad = jax.grad(lambda z: jnp.sum(straight(z) * v))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(v), rtol=0, atol=0)
    # Premise: the squeezer's own gradient is not the identity (else the test proves nothing).
    raw = jax.grad(lambda z: jnp.sum(squeezer(z) * v))(x)
    assert not np.allclose(np.asarray(raw), np.asarray(v))


def test_factories_are_cached():
    assert median_squeezer(3) is median_squeezer(3) and median_squeezer(3) is not median_squeezer(5)
    assert median_squeezer(np.int64(3)) is median_squeezer(3)
    assert bit_depth_squeezer(4) is bit_depth_squeezer(4)
    assert bpda(median_squeezer(3)) is bpda(median_squeezer(3))


def affine_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["W"] + params["b"][None, :]


_TRACES = []


def counting_affine_apply(params, x):
    _TRACES.append(x.shape)
    return affine_apply(params, x)


def test_squeezed_composes_and_is_stable():
    rng = np.random.default_rng(5)
    params = {"W": jnp.asarray(rng.standard_normal((48, 3)), jnp.float32),
              "b": jnp.zeros(3, jnp.float32)}
    x = jnp.asarray(random_batch((2, 4, 4, 3), np.float32, seed=6))
    defended = squeezed(affine_apply, median_squeezer(3))
    assert defended is squeezed(affine_apply, median_squeezer(3))
    expected = affine_apply(params, median_filter(x, size=3))
    np.testing.assert_allclose(np.asarray(defended(params, x)), np.asarray(expected), rtol=1e-6)
    # A defended classifier is an ordinary stable apply_fn: attacking it through BPDA
    # compiles once, even for new eps and params.
    attacked = squeezed(counting_affine_apply, bpda(median_squeezer(3)))
    y = jnp.asarray([0, 1], jnp.int32)
    first = fgsm(attacked, params, x, y, eps=0.05)
    n_traces = len(_TRACES)  # the kernel's trace and the label check's shape inference
    params2 = jax.tree.map(lambda a: a + 0.1, params)
    again = squeezed(counting_affine_apply, bpda(median_squeezer(3)))  # the same object
    second = fgsm(again, params2, x, y, eps=0.1)
    assert len(_TRACES) == n_traces
    assert np.abs(np.asarray(first) - np.asarray(x)).max() > 0  # BPDA let the gradient through
    assert not np.allclose(np.asarray(first), np.asarray(second))
