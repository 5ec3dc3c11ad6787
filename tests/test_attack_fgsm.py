"""FGSM against closed forms, finite differences and its invariants."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attack_utils import *  # noqa: F403  (linear models, references, tiny CNN data)
from jaxadv.attacks import fgsm, summed_cross_entropy


def test_fgsm_linear_equals_closed_form():
    params = make_linear(0, 5)
    x = uniform_images(1, 6, 0.2, 0.8)
    y = jnp.asarray([0, 1, 2, 3, 4, 0], jnp.int32)
    eps = 0.05
    g = np_ce_grad(params, x, y)
    assert np.abs(g).min() > 1e-5  # premise: no sign ambiguity between f32 and f64
    expected = np.clip(np.asarray(x) + eps * np.sign(g), 0.0, 1.0)
    x_adv = fgsm(linear_apply, params, x, y, eps=eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)


def test_fgsm_gradient_is_summed_ce_and_matches_finite_differences():
    params = make_linear(2, 4)
    x = uniform_images(3, 4, 0.0, 1.0)
    y = jnp.asarray([3, 0, 1, 2], jnp.int32)
    grad = np.asarray(jax.grad(lambda z: summed_cross_entropy(linear_apply(params, z), y))(x))
    np.testing.assert_allclose(grad, np_ce_grad(params, x, y), rtol=1e-4, atol=1e-6)
    # Central differences of the float64 summed loss on a few coordinates of different
    # examples: a mean-reduced loss would be off by the factor B = 4.
    x64 = np.asarray(x, np.float64)
    h = 1e-5
    for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 3, 1, 2), (3, 1, 2, 0)]:
        xp, xm = x64.copy(), x64.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (np_summed_ce(params, xp, y) - np_summed_ce(params, xm, y)) / (2 * h)
        np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-5)


def test_fgsm_eps_ball_and_box():
    params = make_linear(4, 3, scale=3.0)
    x = uniform_images(5, 8, 0.0, 1.0)  # many pixels near the bounds: clipping is active
    y = jnp.asarray(np.arange(8) % 3, jnp.int32)
    eps = 0.1
    x_adv = np.asarray(fgsm(linear_apply, params, x, y, eps=eps))
    assert np.all(np.isfinite(x_adv))
    assert np.abs(x_adv - np.asarray(x)).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.any(x_adv == 0.0) and np.any(x_adv == 1.0)  # premise: the clip was exercised


def test_fgsm_eps_zero_is_identity():
    params = make_linear(6, 3)
    x = uniform_images(7, 4, 0.0, 1.0)
    y = jnp.zeros(4, jnp.int32)
    np.testing.assert_array_equal(np.asarray(fgsm(linear_apply, params, x, y, eps=0.0)), x)


def test_fgsm_targeted_moves_toward_target():
    params = make_linear(8, 5)
    x = uniform_images(9, 6, 0.3, 0.7)
    target = jnp.asarray([1, 2, 3, 4, 0, 1], jnp.int32)
    x_adv = fgsm(linear_apply, params, x, target, eps=0.02, targeted=True)
    rows = np.arange(6)
    before = np.asarray(linear_apply(params, x))[rows, target]
    after = np.asarray(linear_apply(params, x_adv))[rows, target]
    assert np.all(after > before)
    ce = lambda z: np.asarray(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        linear_apply(params, z), target))
    assert np.all(ce(x_adv) < ce(x))
    # And the untargeted attack on the same labels moves the other way.
    x_away = fgsm(linear_apply, params, x, target, eps=0.02)
    assert np.all(np.asarray(linear_apply(params, x_away))[rows, target] < before)


def test_fgsm_under_a_users_jit_equals_the_direct_call():
    params = make_linear(10, 4)
    x = uniform_images(11, 4, 0.0, 1.0)
    y = jnp.asarray([0, 1, 2, 3], jnp.int32)
    direct = np.asarray(fgsm(linear_apply, params, x, y, eps=0.03))
    user_jit = jax.jit(fgsm, static_argnames=("apply_fn", "targeted"))
    np.testing.assert_allclose(np.asarray(user_jit(linear_apply, params, x, y, eps=0.03)), direct, atol=1e-6)
    assert np.abs(direct - np.asarray(x)).max() > 0.02  # premise: the attack moved the input


_FGSM_TRACES = []


def counting_linear_apply(params, x):
    _FGSM_TRACES.append(x.shape)  # runs once per trace, never per call under jit
    return linear_apply(params, x)


def test_fgsm_does_not_retrace_for_new_eps_or_params():
    x = uniform_images(12, 4, 0.0, 1.0)
    y = jnp.asarray([0, 1, 0, 1], jnp.int32)
    fgsm(counting_linear_apply, make_linear(13, 2), x, y, eps=0.01)
    traces = len(_FGSM_TRACES)  # the kernel's trace, and the label check's shape inference
    out = fgsm(counting_linear_apply, make_linear(14, 2), x, y, eps=0.2)
    assert len(_FGSM_TRACES) == traces
    assert np.abs(np.asarray(out) - np.asarray(x)).max() > 0.01  # the new eps was used


GOOD_X = np.full((2, *HWC), 0.5, np.float32)
GOOD_Y = np.zeros(2, np.int32)


@pytest.mark.parametrize(
    "x, y, eps, match",
    [
        (GOOD_X, GOOD_Y, -0.1, "eps must be finite and >= 0"),
        (GOOD_X + 1.0, GOOD_Y, 0.1, r"values must lie in \[0.0, 1.0\]"),
        (GOOD_X.reshape(2, D), GOOD_Y, 0.1, "rank-4 NHWC"),
        (GOOD_X.astype(np.uint8), GOOD_Y, 0.1, "float image batch"),
        (GOOD_X, np.zeros(3, np.int32), 0.1, "3 labels but x has batch size 2"),
        (GOOD_X, GOOD_Y[:, None], 0.1, "rank-1 array of int labels"),
        (GOOD_X, GOOD_Y.astype(np.float32), 0.1, "integer class labels"),
        (GOOD_X, np.array([0, 2], np.int32), 0.1, r"label 2, but the model has 2 classes"),
        (GOOD_X, np.array([0, -1], np.int32), 0.1, "non-negative class labels"),
    ],
)
def test_fgsm_rejects_bad_inputs(x, y, eps, match):
    params = make_linear(15, 2)
    with pytest.raises(ValueError, match=match):
        fgsm(linear_apply, params, x, y, eps=eps)
