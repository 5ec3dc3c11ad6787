"""Optimizers, schedules, the training loop, early stopping, resume and `train_and_evaluate`."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import checkpoint, data, evaluation, train
from jaxadv.configs import FAST, SEED, ModelConfig, OptimConfig, TrainConfig
from jaxadv.models import make_apply

TINY = TrainConfig(
    name="tiny", model=ModelConfig(widths=(8, 16, 16), head=(32,)), optim=OptimConfig(lr=3e-3, weight_decay=0.0),
    batch_size=32, epochs=3, val_size=64, log_every=5, patience=0, augment=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def synth():
    return data.synthetic(640, 200, num_classes=4, val_size=64, seed=1)


def test_optimizer_adam_l2_is_pytorch_adam_weight_decay():
    # torch.optim.Adam(weight_decay=wd) first step: g' = g + wd*p; update = -lr * g'/(|g'| + eps)
    cfg = dataclasses.replace(SEED.optim, lr=0.1, weight_decay=0.5)
    tx = train.create_optimizer(cfg, train.create_learning_rate_fn(cfg, 10))
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.3, 0.0])}
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
        upd, _ = tx.update(g, tx.init(p), p)
    gp = np.array([0.3 + 0.5, 0.0 + 0.5 * -2.0])
    np.testing.assert_allclose(upd["w"], -0.1 * gp / (np.abs(gp) + 1e-8), rtol=1e-5)


def test_adamw_decays_kernels_only():
    cfg = dataclasses.replace(FAST.optim, lr=0.1, weight_decay=0.5, schedule="constant")
    tx = train.create_optimizer(cfg, train.create_learning_rate_fn(cfg, 10))
    p = {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, p)
    with jax.numpy_dtype_promotion("standard"):
        upd, _ = tx.update(zero, tx.init(p), p)
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -0.1 * 0.5 * np.ones(2), rtol=1e-6)
    np.testing.assert_allclose(upd["Dense_0"]["bias"], 0.0)


def test_onecycle_schedule_peaks_at_lr_and_decays():
    cfg = FAST.optim
    fn = train.create_learning_rate_fn(cfg, 10 * 100)
    with jax.numpy_dtype_promotion("standard"):
        values = np.array([fn(i) for i in range(0, 1000, 10)])
    assert math.isclose(values.max(), cfg.lr, rel_tol=0.02)
    assert values[0] < cfg.lr / 10 and values[-1] < cfg.lr / 100


def test_fit_learns_synthetic_data_well_above_chance(synth):
    result = train.fit(
        TINY, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, progress=False,
    )  # fmt: skip
    test = evaluation.evaluate(make_apply(result.state.model), result.state.variables, synth.test.images, synth.test.labels)
    assert test["accuracy_pct"] > 70, test  # chance is 25 %
    assert len(result.history) == 3
    assert {"train_loss", "val_loss", "val_accuracy_pct", "lr", "seconds", "img_per_s"} <= set(result.history[0])


def test_fit_with_batchnorm_and_augmentation_learns(synth):
    cfg = TINY.replace(model=dataclasses.replace(TINY.model, norm="batch"), augment=True,
                       optim=OptimConfig(optimizer="adamw", lr=3e-3, schedule="onecycle", label_smoothing=0.1,
                                         weight_decay=5e-2))  # fmt: skip
    result = train.fit(
        cfg, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, progress=False,
    )  # fmt: skip
    test = evaluation.evaluate(make_apply(result.state.model), result.state.variables, synth.test.images, synth.test.labels)
    assert test["accuracy_pct"] > 60, test


def test_early_stopping_stops_when_validation_loss_stalls(synth):
    cfg = TINY.replace(optim=dataclasses.replace(TINY.optim, lr=0.0), epochs=10, patience=2)  # lr 0: the validation loss never improves
    result = train.fit(
        cfg, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, progress=False,
    )  # fmt: skip
    assert result.stopped_early and len(result.history) == 3


def _params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_interruption_gives_the_same_params(synth, tmp_path):
    cfg = TINY.replace(epochs=3)
    args = (cfg, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels)
    kw = dict(key=jax.random.key(3), num_classes=4, progress=False)
    full = train.fit(*args, ckpt_dir=str(tmp_path / "full"), **kw)

    class Interrupt(Exception):
        pass

    def interrupt_after_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train.fit(*args, ckpt_dir=str(tmp_path / "cut"), log=interrupt_after_epoch_2, **kw)
    assert checkpoint.latest_step(tmp_path / "cut") is not None
    lines = []
    resumed = train.fit(*args, ckpt_dir=str(tmp_path / "cut"), resume=True, log=lines.append, **kw)
    assert any(line.startswith("resumed") for line in lines)
    _params_equal(full.state.params, resumed.state.params)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose([h["train_loss"] for h in resumed.history], [h["train_loss"] for h in full.history])


def test_load_trained_restores_best_params_and_config(synth, tmp_path):
    cfg = TINY.replace(epochs=2)
    result = train.fit(
        cfg, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, ckpt_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    apply_fn, variables, cfg2, meta = train.load_trained(str(tmp_path))
    assert cfg2 == cfg and meta["num_classes"] == 4
    _params_equal(variables, result.state.variables)


def test_resume_with_a_different_config_is_refused(synth, tmp_path):
    args = (synth.train.images, synth.train.labels, synth.val.images, synth.val.labels)
    train.fit(TINY.replace(epochs=1), *args, key=jax.random.key(0), num_classes=4, ckpt_dir=str(tmp_path), progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="different config"):
        train.fit(TINY.replace(epochs=1, optim=dataclasses.replace(TINY.optim, lr=0.1)), *args, key=jax.random.key(0), num_classes=4, ckpt_dir=str(tmp_path),
                  resume=True, progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "scores, patience, co_guard, robust, want",
    [
        ([1.0, 0.9, 0.95, 0.96], 2, 0.0, False, [None, None, None, "early stop"]),
        ([1.0, 0.9, 0.95, 0.96], 0, 0.0, False, [None, None, None, None]),
        ([-30.0, -35.0, -20.0], 0, 10.0, True, [None, None, "catastrophic overfitting"]),
        ([-30.0, -35.0, -20.0], 0, 10.0, False, [None, None, None]),  # the guard needs a robust score
        ([-30.0, -35.0, -26.0], 0, 10.0, True, [None, None, None]),  # 9 points below the best: still fine
    ],
)
def test_update_stopping_is_a_pure_verdict_per_epoch(scores, patience, co_guard, robust, want):
    s = train.Stopping()
    got, improved = [], []
    for score in scores:
        s, imp, reason = train.update_stopping(s, score, patience=patience, co_guard=co_guard, robust=robust)
        got.append(reason)
        improved.append(imp)
    for w, g in zip(want, got):
        assert (g is None) if w is None else (w in g)
    assert improved[:2] == [True, True]
    assert s.best_score == min(scores)


def test_train_and_evaluate_writes_the_run_and_resumes_a_finished_one(synth, tmp_path):
    cfg = TINY.replace(epochs=1).with_defense("median")
    r = train.train_and_evaluate(cfg, synth, tmp_path, seed=0, progress=False)
    for name in ("history.json", "summary.json", "curves.png"):
        assert (tmp_path / name).exists()
    assert r.summary["config"]["defense"]["name"] == "median" and r.summary["n"] == len(synth.test)
    # The test summary is the deployed model's: median-filtered inputs.
    from jaxadv import defenses

    deployed = defenses.deployed_apply(cfg.defense, r.apply_fn)
    assert r.summary["accuracy_pct"] == pytest.approx(
        evaluation.evaluate(deployed, r.variables, synth.test.images, synth.test.labels)["accuracy_pct"])
    lines = []
    again = train.train_and_evaluate(cfg, synth, tmp_path, seed=0, resume=True, progress=False, log=lines.append)
    assert any(line.startswith("resumed") for line in lines) and len(again.history) == 1
    _params_equal(again.variables, r.variables)

