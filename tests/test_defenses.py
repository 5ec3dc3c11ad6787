"""Defenses as a registry of records: training transforms, deploy transforms, the robust monitor."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import data, defenses, squeeze, train
from jaxadv.attacks import fgsm
from jaxadv.configs import DefenseConfig, ModelConfig, OptimConfig, TrainConfig
from jaxadv.evaluation import attack_eval, evaluate
from jaxadv.models import init_params, make_apply, tiny_cnn

TINY = TrainConfig(name="tiny", model=ModelConfig(widths=(8, 16, 16), head=(32,)), batch_size=32, epochs=4,
                   optim=OptimConfig(lr=3e-3, weight_decay=0.0), val_size=64, log_every=5, patience=0,
                   augment=False)  # fmt: skip


def transform(name, apply_fn=None, **settings):
    """The training batch transform of defense `name` with `settings`."""
    cfg = DefenseConfig(name=name, **settings)
    return defenses.resolve(cfg, apply_fn or make_apply(tiny_cnn())).batch_transform


def test_the_registry_names_every_defense_and_rejects_others():
    assert set(defenses.REGISTRY) == {"none", "median", "fgsm_at", "pgd_at", "fast_at", "nfgsm_at"}
    assert transform("none") is defenses.identity_transform
    assert all(d.adversarial == (name.endswith("_at")) for name, d in defenses.REGISTRY.items())
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        defenses.get("nope")
    from jaxadv import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    flag = next(a for a in sub.choices["train"]._actions if a.dest == "defense")
    assert sorted(flag.choices) == sorted(defenses.REGISTRY)


def test_median_transform_filters_the_batch(getkey):
    x = jax.random.uniform(getkey(), (4, 8, 8, 3))
    y = jnp.arange(4)
    t = transform("median", median_size=3)
    x2, y2 = t({}, x, y, getkey())
    np.testing.assert_array_equal(x2, squeeze.median_filter(x, 3))
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("adv_weight, k", [(0.5, 4), (0.25, 2), (1.0, 8), (0.0, 0)])
def test_fgsm_transform_attacks_a_fraction_of_the_batch(adv_weight, k, getkey):
    model = tiny_cnn(num_classes=3)
    apply_fn = make_apply(model)
    params = init_params(model, getkey())
    x = jax.random.uniform(getkey(), (8, 32, 32, 3))
    y = jax.random.randint(getkey(), (8,), 0, 3)
    t = transform("fgsm_at", apply_fn, eps=0.05, adv_weight=adv_weight)
    x2, y2 = jax.jit(t)(params, x, y, getkey())
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(x2[k:], x[k:])
    if k:
        np.testing.assert_allclose(x2[:k], fgsm(apply_fn, params, x[:k], y[:k], eps=0.05), atol=1e-6)
        assert float(jnp.abs(x2[:k] - x[:k]).max()) == pytest.approx(0.05, abs=1e-6)


AT_EPS = 0.15  # on this synthetic data the clean tiny model keeps ~58 % under FGSM, the FGSM-trained one ~75 %


@functools.cache
def _trained(defense: str):
    """A tiny model trained with `defense` on synthetic data (cached: the clean one serves two tests)."""
    splits = data.synthetic(768, 256, num_classes=4, val_size=64, seed=5)
    cfg = TINY.replace(epochs=5).with_defense(defense, eps=AT_EPS)
    apply_fn = make_apply(train.create_model(cfg, 4))
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, progress=False)  # fmt: skip
    return apply_fn, res.state.variables, splits


def _accuracy_under(defense: str, attack) -> float:
    """Test accuracy (%) of the `defense`-trained model under `attack` (an `attacks.Spec`)."""
    apply_fn, variables, splits = _trained(defense)
    out, _ = attack_eval(apply_fn, variables, splits.test.images, splits.test.labels, batch_size=128, attack=attack)
    return out["accuracy_pct"]


def test_fgsm_adversarial_training_raises_fgsm_accuracy():
    from jaxadv.attacks import Spec

    attack = Spec("fgsm", eps=AT_EPS)
    assert _accuracy_under("fgsm_at", attack) > _accuracy_under("none", attack) + 10


def test_median_model_is_validated_and_deployed_through_the_filter():
    splits = data.synthetic(128, 32, num_classes=4, val_size=32, seed=6)
    cfg = TINY.replace(epochs=1).with_defense("median")
    apply_fn = make_apply(train.create_model(cfg, 4))
    deployed = defenses.deployed_apply(cfg.defense, apply_fn)
    assert deployed is squeeze.squeezed(apply_fn, squeeze.median_squeezer(3))
    assert defenses.deployed_apply(TINY.defense, apply_fn) is apply_fn
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, progress=False)  # fmt: skip
    val = evaluate(deployed, res.state.variables, splits.val.images, splits.val.labels)
    raw = evaluate(apply_fn, res.state.variables, splits.val.images, splits.val.labels)
    assert res.history[-1]["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert val["loss"] != pytest.approx(raw["loss"], rel=1e-5)


def test_fast_and_pgd_transforms_are_random_start_pgd(getkey):
    from jaxadv.attacks import pgd

    model = tiny_cnn(num_classes=3)
    apply_fn = make_apply(model)
    params = init_params(model, getkey())
    x = jax.random.uniform(getkey(), (4, 32, 32, 3))
    y = jnp.arange(4) % 3
    key = getkey()
    for defense, steps, step in (("fast_at", 1, 1.25 * 0.03), ("pgd_at", 7, 2.5 * 0.03 / 7)):
        x2, y2 = transform(defense, apply_fn, eps=0.03)(params, x, y, key)
        # Each example's random start comes from the step's key split over the batch.
        ref = pgd(apply_fn, params, x, y, eps=0.03, step_size=step, steps=steps, key=jax.random.split(key, 4))
        np.testing.assert_allclose(x2, ref, atol=1e-6)
        assert float(jnp.abs(x2 - x).max()) <= 0.03 + 1e-6 and float(jnp.abs(x2 - x).max()) > 0.01


def test_nfgsm_is_one_unprojected_fgsm_step_from_wide_noise(getkey):
    """On a linear model the step is closed form: eps * sign(W^T (softmax - onehot)) at the noisy start."""
    w = jax.random.normal(getkey(), (48, 3))
    apply_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p  # noqa: E731
    x = jax.random.uniform(getkey(), (64, 4, 4, 3))
    y = jnp.arange(64) % 3
    key = getkey()
    x2, y2 = transform("nfgsm_at", apply_fn, eps=0.03)(w, x, y, key)
    start = np.clip(np.asarray(x) + np.asarray(jax.random.uniform(key, x.shape, minval=-0.06, maxval=0.06)), 0, 1)
    logits = start.reshape(64, -1) @ np.asarray(w, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[np.asarray(y)]) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(x2, np.clip(start + 0.03 * np.sign(grad).reshape(x.shape), 0, 1), atol=1e-6)
    delta = np.abs(np.asarray(x2) - np.asarray(x))
    assert delta.max() > 0.05 and delta.max() <= 0.09 + 1e-6  # beyond eps (no projection), within (1 + 2) eps
    np.testing.assert_array_equal(y2, y)


def test_catastrophic_overfitting_guard_stops_and_keeps_the_most_robust_params():
    splits = data.synthetic(128, 32, num_classes=4, val_size=32, seed=8)
    robust = iter([40.0, 60.0, 20.0, 70.0])
    seen, lines = [], []

    def robust_eval(variables):
        seen.append(jax.tree.map(np.asarray, variables))
        return next(robust)

    cfg = TINY.replace(epochs=4).with_defense("fgsm_at", co_guard=30.0)
    resolved = defenses.resolve(cfg.defense, make_apply(train.create_model(cfg, 4)))
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, defense=dataclasses.replace(resolved, monitor=robust_eval),
                    progress=False, log=lines.append)  # fmt: skip
    assert res.stopped_early and len(res.history) == 3  # 60 -> 20 is a drop of 40 > 30
    assert "val PGD acc 60.00%" in lines[1] and "catastrophic overfitting" in " ".join(lines)
    assert [h["val_robust_accuracy_pct"] for h in res.history] == [40.0, 60.0, 20.0]
    for a, b in zip(jax.tree.leaves(res.state.variables), jax.tree.leaves(seen[1])):
        np.testing.assert_array_equal(np.asarray(a), b)  # epoch 2's params: the most robust


def test_fast_adversarial_training_beats_clean_training_under_pgd():
    from jaxadv.attacks import Spec

    attack = Spec("pgd", eps=AT_EPS, step_size=AT_EPS / 4, steps=10)
    assert _accuracy_under("fast_at", attack) > _accuracy_under("none", attack) + 10


def test_robust_monitor_is_pgd_accuracy_on_the_first_n_validation_images(getkey):
    from jaxadv.attacks import pgd

    model = tiny_cnn(num_classes=4)
    apply_fn = make_apply(model)
    params = init_params(model, getkey())
    splits = data.synthetic(8, 40, num_classes=4, val_size=40, seed=2)
    images, labels = splits.val.images, splits.val.labels
    resolve = lambda name, **kw: defenses.resolve(DefenseConfig(name=name, **kw), apply_fn, images, labels)  # noqa: E731
    assert resolve("none", co_guard=10.0).monitor is None  # no adversarial training: off
    assert resolve("fast_at").monitor is None  # guard 0: off
    assert resolve("fast_at", co_guard=10.0).monitor is not None
    monitor = defenses.robust_monitor(apply_fn, images, labels, eps=0.05, n=32, steps=3)
    x, y = images[:32] / np.float32(255), labels[:32]
    x_adv = pgd(apply_fn, params, x, y, eps=0.05, step_size=0.05 / 4, steps=3, key=jax.random.split(jax.random.key(0), 32))
    expected = 100.0 * float(np.mean(np.argmax(apply_fn(params, x_adv), -1) == y))
    assert monitor(params) == pytest.approx(expected, abs=1e-4)
