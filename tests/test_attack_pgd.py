"""PGD: the ball and box, equalities with FGSM and between loop forms, restarts, objectives."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attack_utils import *  # noqa: F403  (linear models, references, tiny CNN data)
from jaxadv import detect, squeeze
from jaxadv.attacks import fgsm, pgd


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_stays_in_the_eps_ball_and_the_box(norm, eps):
    params = make_linear(0, 5, scale=3.0)
    x = uniform_images(1, 6, 0.0, 1.0)  # some pixels at the box edges
    y = jnp.arange(6) % 5
    x_adv = pgd(linear_apply, params, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm, restarts=2,
                key=jax.random.key(0))  # fmt: skip
    d = np.asarray(x_adv - x).reshape(6, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_one_step_from_x_is_fgsm():
    params = make_linear(2, 4)
    x = uniform_images(3, 5, 0.2, 0.8)
    y = jnp.arange(5) % 4
    a = pgd(linear_apply, params, x, y, eps=0.03, step_size=0.03, steps=1, random_start=False)
    np.testing.assert_allclose(a, fgsm(linear_apply, params, x, y, eps=0.03), atol=1e-6)


def test_pgd_unrolled_equals_the_fori_loop():
    params = make_linear(6, 4, scale=2.0)
    x = uniform_images(7, 5, 0.1, 0.9)
    y = jnp.arange(5) % 4
    kw = dict(eps=0.05, step_size=0.02, steps=4, restarts=3, key=jax.random.key(2))
    np.testing.assert_allclose(pgd(linear_apply, params, x, y, unroll=True, **kw),
                               pgd(linear_apply, params, x, y, unroll=False, **kw), atol=1e-6)  # fmt: skip


def test_pgd_needs_a_key_for_random_starts():
    params = make_linear(0, 3)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        pgd(linear_apply, params, uniform_images(0, 2, 0.2, 0.8), jnp.zeros(2, jnp.int32), eps=0.1, step_size=0.1,
            steps=1)  # fmt: skip


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_cnn(trained_cnn):
    apply_fn, params, x, correct = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    eps = 0.03
    acc = lambda z: float(jnp.mean(jnp.argmax(apply_fn(params, z), -1) == y))  # noqa: E731
    acc_fgsm = acc(fgsm(apply_fn, params, x, y, eps=eps))
    acc_pgd = acc(pgd(apply_fn, params, x, y, eps=eps, step_size=eps / 4, steps=10, key=jax.random.key(0)))
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < 1.0  # the budget is large enough to fool some examples


def test_pgd_restarts_keep_the_strongest_per_example(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    kw = dict(eps=0.02, step_size=0.005, steps=3, key=jax.random.key(1))
    fooled = lambda z: np.asarray(jnp.argmax(apply_fn(params, z), -1) != y)  # noqa: E731
    one = fooled(pgd(apply_fn, params, x, y, restarts=1, **kw))
    four = fooled(pgd(apply_fn, params, x, y, restarts=4, **kw))
    assert np.all(four >= one)  # restart 0 is the same run; later ones can only add successes


def _ce_objective(params, x, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(linear_apply(params, x)), y[:, None], axis=1)[:, 0]


def test_pgd_with_the_cross_entropy_objective_equals_the_default():
    params = make_linear(4, 4, scale=2.0)
    x = uniform_images(5, 6, 0.2, 0.8)
    y = jnp.arange(6) % 4
    kw = dict(eps=0.05, step_size=0.01, steps=5, restarts=2, key=jax.random.key(3))
    np.testing.assert_allclose(pgd(linear_apply, params, x, y, objective=_ce_objective, **kw),
                               pgd(linear_apply, params, x, y, **kw), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="objective"):
        pgd(linear_apply, params, x, y, objective=_ce_objective, targeted=True, **kw)


def test_adaptive_detector_attack_fools_with_lower_detector_scores(trained_cnn):
    """The score term (through BPDA) steers PGD to adversarial examples the detector misses."""
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    sq = (squeeze.bit_depth_squeezer(2), squeeze.median_squeezer(2))
    kw = dict(eps=0.3, step_size=0.03, steps=30, key=jax.random.key(0), unroll=False)  # compiles in seconds
    fooled = lambda z: np.asarray(jnp.argmax(apply_fn(params, z), -1) != y)  # noqa: E731
    score = lambda z: np.asarray(detect.score(apply_fn, params, z, sq))  # noqa: E731
    blind = pgd(apply_fn, params, x, y, objective=detect.adaptive_objective(apply_fn, sq, lam=0.0), **kw)
    aware = pgd(apply_fn, params, x, y, objective=detect.adaptive_objective(apply_fn, sq, lam=1.0), **kw)
    assert fooled(blind).mean() > 0.8 and fooled(aware).mean() > 0.8
    threshold = 0.1
    assert (score(blind)[fooled(blind)] > threshold).mean() > 0.5  # the squeezers see the detector-blind attack
    assert (score(aware)[fooled(aware)] > threshold).mean() < 0.25  # and mostly miss the adaptive one
    assert detect.adaptive_objective(apply_fn, sq, lam=1.0) is detect.adaptive_objective(apply_fn, sq, lam=1.0)
