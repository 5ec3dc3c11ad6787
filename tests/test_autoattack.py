"""AutoAttack: the ensemble's order and settings, its verdict rules, the sanity flags, the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aa_toy import PARAMS, X, Y, size, toy
from jaxadv.attacks import _core, apgd_t, autoattack, fab_t
from jaxadv.attacks.autoattack import ensemble

QUICK = dict(n_iter=10, n_queries=30)


def test_the_versions_are_the_references():
    names = lambda v: [a[0] for a in ensemble(v, 10)]  # noqa: E731
    assert names("standard") == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert names("plus") == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert names("rand") == ["apgd-ce", "apgd-dlr"]
    std = {n: kw for n, _, kw in ensemble("standard", 10)}
    assert std["apgd-ce"] == {"loss": "ce", "n_iter": 100, "n_restarts": 1}
    assert std["apgd-t"]["n_target_classes"] == 9 and std["fab-t"]["n_target_classes"] == 9
    assert std["square"]["n_queries"] == 5000
    plus = {n: kw for n, _, kw in ensemble("plus", 10)}
    assert plus["apgd-ce"]["n_restarts"] == plus["apgd-dlr"]["n_restarts"] == plus["fab"]["n_restarts"] == 5
    with pytest.raises(ValueError, match="version must be one of"):
        autoattack(toy, PARAMS, X, Y, key=jax.random.key(0), eps=0.1, version="fast")


def test_a_non_robust_model_has_zero_robust_accuracy_and_a_record_per_point():
    x_adv, info = autoattack(toy, PARAMS, X, Y, key=jax.random.key(0), eps=0.3, return_info=True, **QUICK)
    rec = info["record"]
    assert rec["clean_correct"].all() and not rec["robust"].any()
    assert set(rec["broken_by"]) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
    pred = np.asarray(toy(PARAMS, x_adv)).argmax(-1)
    assert np.all(pred != np.asarray(Y))
    np.testing.assert_allclose(rec["norm"], size(x_adv - X, "linf"), atol=1e-6)
    assert np.all(rec["norm"] <= 0.3 + 1e-6) and np.all(rec["margin"] < 0)
    table = info["attacks"]
    assert [t["name"] for t in table] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert sum(t["newly_broken"] for t in table) == 4 and table[-1]["robust"] == 0
    assert info["flags"]["within_eps"] and info["flags"]["within_box"] and not info["flags"]["nan"]


def constant(params, x):
    """A model that ignores its input: every attack fails, and its gradients are zero."""
    return jnp.broadcast_to(params["b2"][None, :], (x.shape[0], 4)) + 0.0 * jnp.sum(x)


def test_a_constant_model_keeps_its_clean_accuracy():
    y = jnp.asarray([3, 3, 0, 1], jnp.int32)  # the constant prediction is class 3
    x_adv, info = autoattack(constant, PARAMS, X, y, key=jax.random.key(0), eps=0.3, return_info=True, **QUICK)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(X))
    assert info["record"]["robust"].tolist() == [True, True, False, False]
    assert info["flags"]["zero_gradients"] == 2


_rng = np.random.default_rng(0)


def noisy(params, x):
    """A randomized defense: host-side noise on every (op-by-op) call."""
    return toy(params, x) + jnp.asarray(_rng.normal(0, 0.5, (x.shape[0], 4)), jnp.float32)


def softmax_model(params, x):
    return jax.nn.softmax(toy(params, x), axis=-1)


def test_the_flags_fire_on_a_randomized_and_on_a_softmax_model():
    from jaxadv.attacks.autoattack import sanity_flags

    assert not any(sanity_flags(toy, PARAMS, X, Y)[k] for k in ("randomized", "probabilities"))
    mixed = jnp.asarray([0, 1, 2, 3], jnp.int32)  # some points right, some wrong: still deterministic
    assert 0 < np.mean(np.asarray(toy(PARAMS, X)).argmax(-1) == np.asarray(mixed)) < 1
    assert not sanity_flags(toy, PARAMS, X, mixed)["randomized"]
    assert sanity_flags(noisy, PARAMS, X, Y)["randomized"]
    assert sanity_flags(softmax_model, PARAMS, X, Y)["probabilities"]


def test_the_result_does_not_depend_on_batching():
    keys = jax.random.split(jax.random.key(3), 4)
    whole = autoattack(toy, PARAMS, X, Y, key=keys, eps=0.12, **QUICK)
    halves = [autoattack(toy, PARAMS, X[s], Y[s], key=keys[s], eps=0.12, **QUICK) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(np.concatenate(halves), whole, atol=1e-6)


@pytest.mark.parametrize("parallel", [False, True])  # APGD-T's / FAB-T's targets in turn or in one batch
def test_early_exit_keeps_every_verdict(parallel, monkeypatch):
    monkeypatch.setattr(_core, "PARALLEL_TARGETS", parallel)
    kw = dict(key=jax.random.key(1), eps=0.12, return_info=True, **QUICK)
    _, a = autoattack(toy, PARAMS, X, Y, **kw)
    _, b = autoattack(toy, PARAMS, X, Y, early_exit=True, **kw)
    np.testing.assert_array_equal(a["record"]["robust"], b["record"]["robust"])


def test_micro_batches_split_the_active_rows_in_order(monkeypatch):
    active = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)  # 9 of 12 rows
    monkeypatch.setattr(_core, "MICRO_BATCH", 4)
    pieces = _core.micro_batches(active, active.size)
    idx = [np.asarray(i) for _, i in pieces]
    assert [s for s, _ in pieces] == [len(i) for i in idx] == [4, 4, 4]  # 4, 4, then 1 row padded to 4
    rows = np.concatenate([i[i < active.size] for i in idx])
    np.testing.assert_array_equal(rows, np.flatnonzero(active))  # every active row once, in order
    assert all(np.all(i[(i < active.size).sum():] == active.size) for i in idx)  # padding out of range
    monkeypatch.setattr(_core, "MICRO_BATCH", 0)
    assert len(_core.micro_batches(active, active.size)) == 1
    monkeypatch.setattr(_core, "MICRO_BATCH", None)  # the default: 32 rows per device on CPU
    assert _core.micro_batch() == (32 * jax.device_count() if jax.default_backend() == "cpu" else 0)


@pytest.mark.parametrize("early_exit", [False, True])
def test_micro_batches_change_no_result(early_exit, monkeypatch):
    kw = dict(key=jax.random.key(2), eps=0.12, n_iter=10, early_exit=early_exit, return_info=True)
    monkeypatch.setattr(_core, "PARALLEL_TARGETS", False)
    split = _core.micro_batches
    pieces = []  # pieces per call, to see that both attacks do split
    monkeypatch.setattr(_core, "micro_batches", lambda a, b: pieces.append(len(split(a, b))) or split(a, b))
    got = {}
    for mb in (0, 1):  # whole batch; one row per micro-batch
        monkeypatch.setattr(_core, "MICRO_BATCH", mb)
        got[mb] = []
        for fn in (apgd_t, fab_t):
            pieces.clear()
            got[mb].append(fn(toy, PARAMS, X, Y, **kw))
            # whole batch: one piece per call; one row each: the first target's call has all 4 points
            assert (set(pieces) == {1}) if mb == 0 else (pieces[0] == len(Y))
    for (a, ia), (b, ib) in zip(got[0], got[1]):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_array_equal(ia["fooled"], ib["fooled"])
        np.testing.assert_array_equal(ia["target"], ib["target"])
    assert any(i["fooled"].any() and not i["fooled"].all() for _, i in got[0])  # both verdicts occur
