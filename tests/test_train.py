"""Model, training loop, checkpoints and resume."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import checkpoint, data, train
from jaxadv.configs import FAST, SEED, TrainConfig, get_config
from jaxadv.models import CNN, count_params, init_params, make_apply, max_pool_2x2, tiny_cnn

TINY = TrainConfig(
    name="tiny", widths=(8, 16, 16), head=(32,), batch_size=32, epochs=3, lr=3e-3, weight_decay=0.0,
    val_size=64, log_every=5, patience=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def synth():
    return data.synthetic(640, 200, num_classes=4, val_size=64, seed=1)


def _conv_count(cin, cout):
    return 9 * cin * cout + cout


def test_seed_cnn_parameter_count_matches_closed_form():
    # Three [conv3x3, conv3x3] blocks of widths 32, 64, 128 on 32x32x3, 4x4x128 after three
    # 2x2 pools, then Dense(128) and Dense(10): the study's architecture.
    expected = (
        _conv_count(3, 32) + _conv_count(32, 32) + _conv_count(32, 64) + _conv_count(64, 64)
        + _conv_count(64, 128) + _conv_count(128, 128) + (4 * 4 * 128 * 128 + 128) + (128 * 10 + 10)
    )  # fmt: skip
    params = init_params(CNN(), jax.random.key(0))
    assert count_params(params) == expected == 550_570


@pytest.mark.parametrize("norm", [None, "batch"])
def test_model_output_shape_and_dtype(norm, getkey):
    model = CNN(widths=(4, 8, 8), head=(16,), norm=norm, num_classes=7)
    params = init_params(model, getkey())
    x = jax.random.uniform(getkey(), (5, 32, 32, 3))
    logits = make_apply(model)(params, x)
    assert logits.shape == (5, 7) and logits.dtype == jnp.float32
    assert ("batch_stats" in params) == (norm == "batch")


def test_bfloat16_compute_returns_float32_logits(getkey):
    model = tiny_cnn(dtype=jnp.bfloat16)
    params = init_params(model, getkey())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    ref = make_apply(tiny_cnn())(params, jnp.full((2, 32, 32, 3), 0.5))
    out = make_apply(model)(params, jnp.full((2, 32, 32, 3), 0.5))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05, rtol=0.05)


def test_max_pool_2x2_equals_flax_max_pool_and_its_gradient(getkey):
    x = jax.random.normal(getkey(), (2, 8, 6, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
    g1 = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)
    g2 = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-6)


def test_make_apply_is_cached_per_model():
    assert make_apply(tiny_cnn()) is make_apply(tiny_cnn())
    assert make_apply(tiny_cnn()) is not make_apply(tiny_cnn(num_classes=3))


def test_optimizer_adam_l2_is_pytorch_adam_weight_decay():
    # torch.optim.Adam(weight_decay=wd) first step: g' = g + wd*p; update = -lr * g'/(|g'| + eps)
    cfg = SEED.replace(lr=0.1, weight_decay=0.5)
    tx = train.create_optimizer(cfg, train.create_learning_rate_fn(cfg, 10))
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.3, 0.0])}
    upd, _ = tx.update(g, tx.init(p), p)
    gp = np.array([0.3 + 0.5, 0.0 + 0.5 * -2.0])
    np.testing.assert_allclose(upd["w"], -0.1 * gp / (np.abs(gp) + 1e-8), rtol=1e-5)


def test_adamw_decays_kernels_only():
    cfg = FAST.replace(lr=0.1, weight_decay=0.5, schedule="constant")
    tx = train.create_optimizer(cfg, train.create_learning_rate_fn(cfg, 10))
    p = {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, p)
    upd, _ = tx.update(zero, tx.init(p), p)
    np.testing.assert_allclose(upd["Dense_0"]["kernel"], -0.1 * 0.5 * np.ones(2), rtol=1e-6)
    np.testing.assert_allclose(upd["Dense_0"]["bias"], 0.0)


def test_onecycle_schedule_peaks_at_lr_and_decays():
    cfg = FAST.replace(epochs=10)
    fn = train.create_learning_rate_fn(cfg, 100)
    values = np.array([fn(i) for i in range(0, 1000, 10)])
    assert math.isclose(values.max(), cfg.lr, rel_tol=0.02)
    assert values[0] < cfg.lr / 10 and values[-1] < cfg.lr / 100


def test_evaluate_pads_and_masks_the_last_batch(getkey):
    model = tiny_cnn(num_classes=3)
    params = init_params(model, getkey())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 23).astype(np.int32)
    logits = np.asarray(make_apply(model)(params, jnp.asarray(x, jnp.float32) / 255))
    expected_acc = 100 * np.mean(logits.argmax(-1) == y)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected_loss = -np.mean(logp[np.arange(23), y])
    out = train.evaluate(make_apply(model), params, x, y, batch_size=10)
    assert out["n"] == 23
    assert math.isclose(out["accuracy_pct"], expected_acc, abs_tol=1e-4)
    assert math.isclose(out["loss"], expected_loss, rel_tol=1e-4)


def test_fit_learns_synthetic_data_well_above_chance(synth):
    result = train.fit(
        TINY, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, progress=False,
    )  # fmt: skip
    test = train.evaluate(make_apply(result.state.model), result.state.variables, synth.test.images, synth.test.labels)
    assert test["accuracy_pct"] > 70, test  # chance is 25 %
    assert len(result.history) == 3
    assert {"train_loss", "val_loss", "val_accuracy_pct", "lr", "seconds", "img_per_s"} <= set(result.history[0])


def test_fit_with_batchnorm_and_augmentation_learns(synth):
    import functools

    cfg = TINY.replace(norm="batch", optimizer="adamw", schedule="onecycle", label_smoothing=0.1, weight_decay=5e-2)
    aug = functools.partial(data.augment, pad=4, pad_mode="reflect", flip=True)
    result = train.fit(
        cfg, synth.train.images, synth.train.labels, synth.val.images, synth.val.labels,
        key=jax.random.key(0), num_classes=4, augment_fn=aug, progress=False,
    )  # fmt: skip
    test = train.evaluate(make_apply(result.state.model), result.state.variables, synth.test.images, synth.test.labels)
    assert test["accuracy_pct"] > 60, test


def test_early_stopping_stops_when_validation_loss_stalls(synth):
    cfg = TINY.replace(lr=0.0, epochs=10, patience=2)  # lr 0: the validation loss never improves
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
        train.fit(TINY.replace(epochs=1, lr=0.1), *args, key=jax.random.key(0), num_classes=4, ckpt_dir=str(tmp_path),
                  resume=True, progress=False)  # fmt: skip


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.restore(tmp_path / "missing", {"a": jnp.zeros(2)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.read_meta(tmp_path / "empty")
    checkpoint.save(tmp_path / "ck", 0, {"a": jnp.zeros(2)}, {"x": 1})
    with pytest.raises(checkpoint.CheckpointError, match="incompatible") as e:
        checkpoint.restore(tmp_path / "ck", {"a": jnp.zeros(3)})
    assert "\n" not in str(e.value)
    # A save interrupted before orbax's final rename is not a checkpoint.
    (tmp_path / "partial" / "0.orbax-checkpoint-tmp-123").mkdir(parents=True)
    assert checkpoint.latest_step(tmp_path / "partial") is None


def test_checkpoint_keeps_the_last_few(tmp_path):
    for step in range(5):
        checkpoint.save(tmp_path, step, {"a": jnp.full(2, step)}, {"step": step}, max_to_keep=3)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3, 4]
    _, state, meta = checkpoint.restore(tmp_path, {"a": jnp.zeros(2)})
    assert meta == {"step": 4} and float(state["a"][0]) == 4


def test_get_config_rejects_unknown_names():
    assert get_config("fast") is FAST
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        get_config("nope")


def test_config_roundtrips_through_json_dict():
    assert TrainConfig.from_dict(FAST.to_dict()) == FAST
