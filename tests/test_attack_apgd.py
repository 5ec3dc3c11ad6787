"""APGD against the AutoAttack reference: its losses in float64, its checkpoint schedule,
and its trajectories on the reference's deterministic toy model."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_toy import PARAMS, X, Y, size, toy
from jaxadv.attacks import _core, apgd, apgd_t

apgd_module = importlib.import_module("jaxadv.attacks.apgd")


def np_dlr(z, y):
    z = np.asarray(z, np.float64)
    zs = np.sort(z, axis=1)
    zy = z[np.arange(len(y)), y]
    other = np.max(np.where(np.eye(z.shape[1])[y] == 1, -np.inf, z), axis=1)
    return -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def np_dlr_t(z, y, t):
    z = np.asarray(z, np.float64)
    zs = np.sort(z, axis=1)
    r = np.arange(len(y))
    return -(z[r, y] - z[r, t]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def test_dlr_losses_equal_their_formulas_with_ties_and_wrong_top_classes():
    z = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0.5, -1, 3, 3, 2], [2, 9, 1, 9, 0]], np.float32)
    y = np.array([4, 0, 2, 1])
    t = np.array([3, 4, 3, 3])
    np.testing.assert_allclose(apgd_module.dlr_loss(jnp.asarray(z), jnp.asarray(y)), np_dlr(z, y), atol=1e-6)
    np.testing.assert_allclose(apgd_module.dlr_loss(jnp.asarray(z), jnp.asarray(y))[:3], [-0.5, 2.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(apgd_module.dlr_loss_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t)),
                               np_dlr_t(z, y, t), atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(apgd_module.dlr_loss_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t))[:3],
                               [-0.4, 1.6, 0.0], atol=1e-6)  # fmt: skip
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 10)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    np.testing.assert_allclose(apgd_module.dlr_loss(jnp.asarray(z), jnp.asarray(y)), np_dlr(z, y), rtol=1e-5)


@pytest.mark.parametrize("n_iter, want", [
    (100, {21: 22, 40: 19, 56: 16, 69: 13, 79: 10, 86: 7, 92: 6, 98: 6}),
    (50, {10: 11, 20: 10, 29: 9, 37: 8, 44: 7}),
])  # fmt: skip
def test_checkpoint_schedule_is_the_references(n_iter, want):
    assert apgd_module.checkpoints(n_iter) == want
    if n_iter == 100:  # the paper's p_j: ceil(100 p_j) steps, i.e. after iteration index ceil(100 p_j) - 1
        p = [0, 0.22]
        while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
            p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        assert [int(np.ceil(100 * q - 1e-9)) - 1 for q in p[1:]] == sorted(want)


def _single(norm, loss, eps):
    """One reference run started at the clean point (no randomness): the final state."""
    f = jnp.float32
    losses = apgd_module.losses_for(4)
    loss_id = jnp.int32(losses.index(loss))
    s = apgd_module._start_kernel(X, Y, Y, jnp.zeros(()), f(eps), f(0), f(1), norm=norm, n_iter=100, random_start=False)
    ch = apgd_module.checkpoints(100)
    for i in range(-1, 100):  # -1: the first call computes the start's loss and gradient
        s = apgd_module._step_kernel(toy, PARAMS, s, jnp.int32(max(i, 0)), jnp.bool_(i in ch), jnp.int32(ch.get(i, 1)),
                                     f(eps), f(0), f(1), 0.75, loss_id, i < 0, norm=norm, losses=losses)  # fmt: skip
    return s


@pytest.mark.parametrize("norm, loss, eps, loss_best, robust, steps", [
    ("linf", "ce", 0.1, [0.244281, 0.019122, 0.500134, 0.232271], [1, 1, 1, 1], [0.00078125] * 4),
    ("linf", "dlr", 0.1, [-0.248157, -0.577742, -0.137711, -0.256614], [1, 1, 1, 1], [0.00078125] * 4),
    ("l2", "dlr", 0.3, [-0.161433, -0.546106, 0.144216, -0.173898], [1, 1, 0, 1], None),
])  # fmt: skip
def test_a_run_from_the_clean_point_follows_the_reference(norm, loss, eps, loss_best, robust, steps):
    with jax.default_matmul_precision("highest"):
        s = _single(norm, loss, eps)
    np.testing.assert_allclose(np.asarray(s.loss_best), loss_best, atol=2e-6)
    np.testing.assert_array_equal(~np.asarray(s.fooled), np.asarray(robust, bool))
    if steps:
        np.testing.assert_allclose(np.asarray(s.step), steps)
    if norm == "linf" and loss == "ce":
        np.testing.assert_allclose(np.asarray(s.x_best)[0].ravel(),
                                   [0.4, 0.713331, 0.789539, 0.770952, 0.422992, 0.008988], atol=2e-6)  # fmt: skip


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.3)])
def test_apgd_never_returns_a_point_worse_than_its_start(norm, eps):
    s = _single(norm, "ce", eps)
    start = apgd_module.ce_loss(toy(PARAMS, X), Y)
    assert np.all(np.asarray(s.loss_best) >= np.asarray(start) - 1e-7)
    x_adv = apgd(toy, PARAMS, X, Y, key=jax.random.key(1), eps=eps, norm=norm)
    fooled = np.asarray(toy(PARAMS, x_adv)).argmax(-1) != np.asarray(Y)
    # Returned: the last fooling iterate, else x itself (the reference's perturb).
    assert np.all(size(x_adv - X, norm) <= eps + 1e-6)
    assert fooled.any() or np.all(np.asarray(apgd_module.ce_loss(toy(PARAMS, x_adv), Y)) > 0)


def test_early_exit_keeps_the_verdicts_and_spends_fewer_passes(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    kw = dict(key=jax.random.key(0), eps=0.15, n_iter=20, return_info=True)
    _, full = apgd(apply_fn, params, x, y, **kw)
    _, quick = apgd(apply_fn, params, x, y, early_exit=True, **kw)
    np.testing.assert_array_equal(full["fooled"], quick["fooled"])
    assert full["fooled"].any() and quick["passes"]["forward"] < full["passes"]["forward"]


@pytest.mark.parametrize("parallel", [False, True])  # targets in turn (CPU's default) or all in one batch
def test_apgd_t_early_exit_keeps_the_verdicts(parallel, monkeypatch):
    monkeypatch.setattr(_core, "PARALLEL_TARGETS", parallel)
    kw = dict(key=jax.random.key(3), eps=0.5, norm="l2", n_iter=12, return_info=True)
    _, full = apgd_t(toy, PARAMS, X, Y, **kw)
    _, quick = apgd_t(toy, PARAMS, X, Y, early_exit=True, **kw)
    np.testing.assert_array_equal(full["fooled"], quick["fooled"])
    assert full["fooled"].any() and not full["fooled"].all()  # both verdicts occur
    assert quick["passes"]["forward"] <= full["passes"]["forward"]  # 4 points: one compiled size of 4 rows
    if not parallel:  # in turn, as the reference: the same target breaks each point
        np.testing.assert_array_equal(full["target"], quick["target"])


def test_apgd_t_attacks_the_targets_in_order_and_reports_them(trained_cnn):
    apply_fn, params, x, _ = trained_cnn  # 3 classes: 2 targets at most
    y = jnp.argmax(apply_fn(params, x), -1)
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_t(apply_fn, params, x, y, key=jax.random.key(0), eps=0.05)
    x_adv, info = apgd_t(toy, PARAMS, X, Y, key=jax.random.key(0), eps=0.3, norm="l2", return_info=True)
    order = np.argsort(np.asarray(toy(PARAMS, X)), axis=1)
    for i in np.flatnonzero(info["fooled"]):
        assert info["target"][i] in order[i, -4:-1]  # one of the 3 wrong classes, highest first
    assert info["target"][~info["fooled"]].tolist() == [-1] * int((~info["fooled"]).sum())


def test_the_three_losses_share_one_compiled_step():
    """The loss is a traced branch index, not a static argument: APGD-DLR and APGD-T run
    APGD-CE's compiled program (AutoAttack compiles it once per batch size, not per attack)."""
    kw = dict(key=jax.random.key(0), eps=0.1, n_iter=3)
    apgd(toy, PARAMS, X, Y, loss="ce", **kw)
    compiled = apgd_module._step_kernel._cache_size()
    apgd(toy, PARAMS, X, Y, loss="dlr", **kw)
    apgd_t(toy, PARAMS, X, Y, n_target_classes=2, **kw)
    assert apgd_module._step_kernel._cache_size() == compiled
    assert apgd_module.losses_for(2) == ("ce",) and apgd_module.losses_for(3) == ("ce", "dlr")


def test_random_starts_are_the_vmapped_draws_in_one_program_for_every_batch_size():
    draws = {"uniform": jax.random.uniform, "normal": jax.random.normal}
    compiled = None
    for n in (1, 5, 37):  # below, between and above multiples of RNG_ROWS
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(n), jnp.arange(n, dtype=jnp.uint32))
        for dist, draw in draws.items():
            want = jax.vmap(lambda k: draw(k, (2, 3, 1), jnp.float32))(keys)  # noqa: B023
            np.testing.assert_array_equal(_core.random_rows(keys, (2, 3, 1), dist), want)
            traced = jax.jit(lambda k: _core.random_rows(k, (2, 3, 1), dist))(keys)  # noqa: B023
            np.testing.assert_array_equal(traced, want)
        compiled = compiled or _core._draw_rows._cache_size()  # (inlined under the jit above)
    assert _core._draw_rows._cache_size() == compiled

