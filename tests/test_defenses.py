"""Training-time defenses through the batch-transform hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import data, defenses, squeeze, train
from jaxadv.attacks import fgsm, fgsm_jit
from jaxadv.configs import TrainConfig
from jaxadv.evaluation import attack_eval
from jaxadv.models import init_params, make_apply, tiny_cnn

TINY = TrainConfig(name="tiny", widths=(8, 16, 16), head=(32,), batch_size=32, epochs=4, lr=3e-3, weight_decay=0.0,
                   val_size=64, log_every=5, patience=0, augment=False)  # fmt: skip


def test_batch_transform_by_name():
    assert defenses.batch_transform(TINY) is train.identity_transform
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        defenses.batch_transform(TINY.replace(defense="nope"))


def test_median_transform_filters_the_batch(getkey):
    x = jax.random.uniform(getkey(), (4, 8, 8, 3))
    y = jnp.arange(4)
    t = defenses.batch_transform(TINY.replace(defense="median", median_size=3))
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
    cfg = TINY.replace(defense="fgsm_at", defense_eps=0.05, adv_weight=adv_weight)
    x2, y2 = jax.jit(defenses.batch_transform(cfg, apply_fn))(params, x, y, getkey())
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
    cfg = TINY.replace(defense=defense, defense_eps=AT_EPS, epochs=5)
    apply_fn = make_apply(train.create_model(cfg, 4))
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, batch_transform=defenses.batch_transform(cfg, apply_fn),
                    progress=False)  # fmt: skip
    return apply_fn, res.state.variables, splits


def _accuracy_under(defense: str, attack_fn) -> float:
    """Test accuracy (%) of the `defense`-trained model under `attack_fn(apply_fn, variables, x, y)`."""
    apply_fn, variables, splits = _trained(defense)
    out, _ = attack_eval(apply_fn, variables, splits.test.images, splits.test.labels, batch_size=128,
                         attack=lambda x, y: attack_fn(apply_fn, variables, x, y))  # fmt: skip
    return out["accuracy_pct"]


def test_fgsm_adversarial_training_raises_fgsm_accuracy():
    def attack(f, v, x, y):
        return fgsm_jit(f, v, x, y, eps=AT_EPS)

    assert _accuracy_under("fgsm_at", attack) > _accuracy_under("none", attack) + 10


def test_median_model_is_validated_and_deployed_through_the_filter():
    splits = data.synthetic(128, 32, num_classes=4, val_size=32, seed=6)
    cfg = TINY.replace(defense="median", epochs=1)
    apply_fn = make_apply(train.create_model(cfg, 4))
    deployed = defenses.defended_apply(cfg, apply_fn)
    assert deployed is squeeze.squeezed(apply_fn, squeeze.median_squeezer(3))
    assert defenses.defended_apply(TINY, apply_fn) is apply_fn
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, batch_transform=defenses.batch_transform(cfg),
                    eval_squeezer=defenses.eval_squeezer(cfg), progress=False)  # fmt: skip
    val = train.evaluate(deployed, res.state.variables, splits.val.images, splits.val.labels)
    raw = train.evaluate(apply_fn, res.state.variables, splits.val.images, splits.val.labels)
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
        cfg = TINY.replace(defense=defense, defense_eps=0.03)
        x2, y2 = defenses.batch_transform(cfg, apply_fn)(params, x, y, key)
        ref = pgd(apply_fn, params, x, y, eps=0.03, step_size=step, steps=steps, key=key)
        np.testing.assert_allclose(x2, ref, atol=1e-6)
        assert float(jnp.abs(x2 - x).max()) <= 0.03 + 1e-6 and float(jnp.abs(x2 - x).max()) > 0.01


def test_catastrophic_overfitting_guard_stops_and_keeps_the_most_robust_params():
    splits = data.synthetic(128, 32, num_classes=4, val_size=32, seed=8)
    robust = iter([40.0, 60.0, 20.0, 70.0])
    seen, lines = [], []

    def robust_eval(variables):
        seen.append(jax.tree.map(np.asarray, variables))
        return next(robust)

    cfg = TINY.replace(epochs=4, co_guard=30.0)
    res = train.fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                    key=jax.random.key(0), num_classes=4, robust_eval=robust_eval, progress=False,
                    log=lines.append)  # fmt: skip
    assert res.stopped_early and len(res.history) == 3  # 60 -> 20 is a drop of 40 > 30
    assert "val PGD acc 60.00%" in lines[1] and "catastrophic overfitting" in " ".join(lines)
    assert [h["val_robust_accuracy_pct"] for h in res.history] == [40.0, 60.0, 20.0]
    for a, b in zip(jax.tree.leaves(res.state.variables), jax.tree.leaves(seen[1])):
        np.testing.assert_array_equal(np.asarray(a), b)  # epoch 2's params: the most robust


def test_fast_adversarial_training_beats_clean_training_under_pgd():
    from jaxadv.attacks import pgd

    def attack(f, v, x, y):
        return pgd(f, v, x, y, eps=AT_EPS, step_size=AT_EPS / 4, steps=10, key=jax.random.key(1))

    assert _accuracy_under("fast_at", attack) > _accuracy_under("none", attack) + 10


def test_robust_monitor_is_pgd_accuracy_on_n_class_balanced_validation_images(getkey):
    from jaxadv.attacks import pgd

    model = tiny_cnn(num_classes=4)
    apply_fn = make_apply(model)
    params = init_params(model, getkey())
    splits = data.synthetic(8, 40, num_classes=4, val_size=40, seed=2)
    images, labels = splits.val.images, splits.val.labels
    assert defenses.robust_monitor(TINY, apply_fn, images, labels) is None  # no adversarial training: off
    assert defenses.robust_monitor(TINY.replace(defense="fast_at"), apply_fn, images, labels) is None  # guard 0: off
    cfg = TINY.replace(defense="fast_at", defense_eps=0.05, co_guard=10.0)
    monitor = defenses.robust_monitor(cfg, apply_fn, images, labels, n=32, steps=3)
    idx = data.balanced_indices(labels, 32, np.random.default_rng(0))
    assert np.bincount(labels[idx], minlength=4).min() >= 7  # all classes watched, not a prefix
    x, y = images[idx] / np.float32(255), labels[idx]
    x_adv = pgd(apply_fn, params, x, y, eps=0.05, step_size=0.05 / 4, steps=3, key=jax.random.key(0))
    expected = 100.0 * float(np.mean(np.argmax(apply_fn(params, x_adv), -1) == y))
    assert monitor(params) == pytest.approx(expected, abs=1e-4)
