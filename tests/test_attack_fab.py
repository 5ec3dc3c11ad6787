"""FAB against the AutoAttack reference: its projections and its runs on the toy model."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_toy import PARAMS, X, Y, size, toy
from jaxadv.attacks import _core, fab, fab_t

fab_module = importlib.import_module("jaxadv.attacks.fab")
T = jnp.asarray([[.5, .5, .5, .5], [.2, .9, .4, .6], [.5, .5, .5, .5], [.1, .1, .1, .1]])
W = jnp.asarray([[1., 1, 1, 1], [1, -2, .5, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
B = jnp.asarray([1.0, -0.5, 3.9, 10.0])


def test_projections_equal_the_references():
    np.testing.assert_allclose(fab_module.projection_linf(T, W, B),
                               [[-.25] * 4, [.257143, -.257143, .257143, 0], [.475] * 4, [.9] * 4], atol=1e-6)
    np.testing.assert_allclose(fab_module.projection_l2(T, W, B),
                               [[-.25] * 4, [.171429, -.342857, .085714, 0], [.475] * 4, [.9] * 4], atol=1e-6)


@pytest.mark.parametrize("proj", ["linf", "l2"])
def test_projections_reach_the_hyperplane_inside_the_box_when_they_can(proj, getkey):
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 1, (20, 30)).astype(np.float32)
    w = rng.standard_normal((20, 30)).astype(np.float32)
    b = (np.sum(w * rng.uniform(0, 1, (20, 30)), 1)).astype(np.float32)  # a point of the box lies on it
    f = fab_module.projection_linf if proj == "linf" else fab_module.projection_l2
    d = np.asarray(f(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
    assert np.all(t + d >= -1e-5) and np.all(t + d <= 1 + 1e-5)
    np.testing.assert_allclose(np.sum(w * (t + d), 1), b, atol=2e-4)


def _exact_projection(t, w, b, norm):
    """Float64, row by row: the KKT solution by a 200-step bisection on its multiplier."""
    out, unreachable = np.zeros_like(t), np.zeros(len(t), bool)
    for i in range(len(t)):
        c = w[i] @ t[i] - b[i]
        wi, c = w[i] * np.sign(c or 1.0), abs(c)
        aw = np.abs(wi) * (np.abs(wi) >= (1e-8 if norm == "l2" else 0))
        room, direction = np.where(wi < 0, 1 - t[i], t[i]), np.where(wi < 0, 1.0, -1.0)
        step = (lambda z: np.minimum(z, room)) if norm == "linf" else (lambda z: np.minimum(z * aw, room))
        unreachable[i] = c >= np.sum(aw * room)  # then every coordinate goes to the edge of the box
        lo, hi = 0.0, 1e9
        for _ in range(200):
            lo, hi = ((lo + hi) / 2, hi) if np.sum(aw * step((lo + hi) / 2)) <= c else (lo, (lo + hi) / 2)
        out[i] = np.where(aw > 0, direction * (room if unreachable[i] else step(lo)), 0.0)
    return out, unreachable


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projections_match_a_float64_solution_with_ties_edges_and_zero_weights(norm):
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, (48, 200))
    t[:, :20] = rng.choice([0.0, 1.0], (48, 20))  # pixels on the edge of the box
    t[:, 20:40] = 0.5  # ties in the breakpoints
    w = rng.standard_normal((48, 200)) * rng.choice([1e-3, 1.0, 30.0], (48, 1))
    w[:, 40:60] = 0.0
    b = np.sum(w * t, 1) + rng.choice([0.01, 0.3, 3.0], 48) * rng.standard_normal(48) * np.abs(w).sum(1) * 0.3
    t, w, b = (a.astype(np.float32) for a in (t, w, b))
    f = fab_module.projection_linf if norm == "linf" else fab_module.projection_l2
    want, unreachable = _exact_projection(*(a.astype(np.float64) for a in (t, w, b)), norm)
    assert 0 < unreachable.mean() < 0.5
    np.testing.assert_allclose(np.asarray(jax.jit(f)(t, w, b)), want, atol=2e-6)


@pytest.mark.parametrize("norm, eps, want, pred", [
    ("linf", 0.3, [0.176299, 0.238779, 0.119168, 0.179973], [2, 3, 1, 2]),
    ("l2", 1.0, [0.362943, 0.779855, 0.273903, 0.370173], None),
    ("l2", 0.3, [0.0, 0.0, 0.273903, 0.0], None),
    ("linf", 0.1, [0.0, 0.0, 0.0, 0.0], None),
])  # fmt: skip
def test_fab_t_follows_the_reference_first_success_winning(norm, eps, want, pred):
    with jax.default_matmul_precision("highest"):
        x_adv, info = fab_t(toy, PARAMS, X, Y, eps=eps, norm=norm, n_target_classes=3, return_info=True)
    np.testing.assert_allclose(size(x_adv - X, norm), want, atol=2e-5)
    if pred:
        np.testing.assert_array_equal(np.asarray(toy(PARAMS, x_adv)).argmax(-1), pred)
    np.testing.assert_array_equal(info["fooled"], np.asarray(want) > 0)


@pytest.mark.parametrize("norm, eps, want", [("linf", 0.3, [0.135850, 0.238779, 0.119168, 0.135621]),
                                             ("l2", 1.0, [0.304381, 0.533096, 0.273903, 0.303854])])
def test_untargeted_fab_follows_the_reference(norm, eps, want):
    with jax.default_matmul_precision("highest"):
        x_adv = fab(toy, PARAMS, X, Y, eps=eps, norm=norm, n_restarts=1)
    np.testing.assert_allclose(size(x_adv - X, norm), want, atol=2e-5)


@pytest.mark.parametrize("parallel", [False, True])  # targets in turn (CPU's default) or all in one batch
def test_early_exit_keeps_the_verdicts(trained_cnn, parallel, monkeypatch):
    monkeypatch.setattr(_core, "PARALLEL_TARGETS", parallel)
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    kw = dict(eps=0.1, n_target_classes=2, n_iter=15, return_info=True)
    a, full = fab_t(apply_fn, params, x, y, **kw)
    b, quick = fab_t(apply_fn, params, x, y, early_exit=True, **kw)
    np.testing.assert_array_equal(full["fooled"], quick["fooled"])
    assert full["fooled"].any() and np.all(size(b - x, "linf") <= 0.1 + 1e-6)
    assert np.all((quick["target"] >= 0) == (quick["fooled"] & ~np.asarray(apply_fn(params, x).argmax(-1) != y)))
