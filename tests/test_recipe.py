"""The `quick` preset's pieces: whitening and dirac init, frozen first conv, alternating
flips, the triangular schedule, BatchNorm without scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import data, train
from jaxadv.configs import QUICK, ModelConfig, OptimConfig, TrainConfig
from jaxadv.models import CNN, init_params, patch_whitening_kernel, whiten_and_dirac


def _patches(x, size=3):
    """Patches f32[P, size*size*C] in (kh, kw, C) order, from a plain NumPy loop."""
    n, h, w, c = x.shape
    out = [x[:, i:i + size, j:j + size, :].reshape(n, -1) for i in range(h - size + 1) for j in range(w - size + 1)]
    return np.concatenate(out, 0)


def test_whitening_kernel_whitens_patches():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(64, 10, 10, 3)).astype(np.float32)
    x = base + 0.8 * np.roll(base, 1, axis=1) + 0.5 * base[..., :1]  # correlated pixels and channels
    k = np.asarray(patch_whitening_kernel(jnp.asarray(x), 8, eps=1e-6))
    assert k.shape == (3, 3, 3, 8)
    np.testing.assert_allclose(k[..., 4:], -k[..., :4])  # each direction with both signs
    p = _patches(x.astype(np.float64))
    p = p - p.mean(0)
    w = k[..., :4].reshape(27, 4)  # (kh, kw, C) rows, the order of _patches
    out = p @ w
    np.testing.assert_allclose(out.T @ out / len(out), np.eye(4), atol=2e-3)  # unit variance, uncorrelated
    variances = np.linalg.eigvalsh(p.T @ p / len(p))[::-1][:4]  # the top four directions
    np.testing.assert_allclose(np.sort(1 / np.sum(w**2, 0))[::-1], variances, rtol=1e-3)


def test_dirac_init_makes_later_convs_identity_on_their_first_channels():
    model = CNN(widths=(4, 8, 8), head=(16,), num_classes=3, norm="batch")
    v = init_params(model, jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    w = whiten_and_dirac(v, model, images)["params"]
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    y = jax.lax.conv_general_dilated(x, w["Conv_1"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    np.testing.assert_allclose(y, x, atol=1e-6)  # 4 -> 4 channels: the identity
    k2 = w["Conv_2"]["kernel"]  # 4 -> 8: the first 4 outputs copy the input, the rest stay random
    y2 = jax.lax.conv_general_dilated(x, k2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y2[..., :4], x, atol=1e-6)
    np.testing.assert_array_equal(k2[..., 4:], v["params"]["Conv_2"]["kernel"][..., 4:])


def test_alternate_flips_switch_every_epoch():
    idx = jnp.arange(400)
    f0, f1, f2 = (np.asarray(train.alternate_flips(jax.random.key(3), idx, jnp.int32(e))) for e in (0, 1, 2))
    assert 150 < f0.sum() < 250
    np.testing.assert_array_equal(f1, ~f0)
    np.testing.assert_array_equal(f2, f0)


def test_triangular_schedule():
    lr = train.create_learning_rate_fn(OptimConfig(lr=1.0, schedule="triangular", warmup_frac=0.25), 100)
    vals = np.array([float(lr(i)) for i in range(101)])
    assert vals[0] == pytest.approx(0.2) and vals[25] == pytest.approx(1.0) and vals[100] == pytest.approx(0.07)
    assert vals.argmax() == 25 and np.all(np.diff(vals[:26]) > 0) and np.all(np.diff(vals[25:]) < 0)


def test_quick_recipe_trains_with_its_first_conv_frozen():
    cfg = QUICK.replace(model=ModelConfig(widths=(4, 8, 8), head=(16,), norm="batch", bn_scale=False, bn_momentum=0.6,
                                          init="whiten"), batch_size=32, epochs=2, val_size=32, log_every=4)  # fmt: skip
    s = data.synthetic(256, 32, num_classes=4, val_size=32, seed=1)
    r = train.fit(cfg, s.train.images, s.train.labels, s.val.images, s.val.labels, key=jax.random.key(0),
                  num_classes=4, progress=False)  # fmt: skip
    model = train.create_model(cfg, 4)
    start = whiten_and_dirac(init_params(model, jax.random.split(jax.random.key(0), 3)[0]), model, s.train.images)
    p = r.state.params
    np.testing.assert_array_equal(p["Conv_0"]["kernel"], start["params"]["Conv_0"]["kernel"])  # frozen
    assert not np.allclose(p["Conv_1"]["kernel"], start["params"]["Conv_1"]["kernel"])  # the rest trains
    assert "scale" not in p["BatchNorm_0"] and "bias" in p["BatchNorm_0"]
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_old_configs_load_with_the_new_fields_defaulted():
    d = TrainConfig().to_dict()
    for k in ("bn_scale", "bn_momentum", "init"):
        del d["model"][k]
    del d["pad"], d["flip"]
    assert TrainConfig.from_dict(d) == TrainConfig()


def test_config_overrides_by_dotted_field():
    from jaxadv.configs import override

    cfg = override(QUICK, {"model.init": "default", "batch_size": "512", "optim.label_smoothing": 0.1,
                           "model.bn_scale": "true", "model.widths": (8, 16, 32)})  # fmt: skip
    assert (cfg.model.init, cfg.batch_size, cfg.optim.label_smoothing) == ("default", 512, 0.1)
    assert cfg.model.bn_scale is True and cfg.model.widths == (8, 16, 32) and cfg.epochs == QUICK.epochs
    for bad, msg in (({"optim.nope": 1}, "unknown config field 'optim.nope'"), ({"model": 1}, "unknown config field"),
                     ({"batch_size": "big"}, "not a valid int"), ({"model.bn_scale": "maybe"}, "not a valid bool")):
        with pytest.raises(ValueError, match=msg):
            override(QUICK, bad)


# --- weight averaging, optimizers, label smoothing of adversarial training -----------------

TINY_BN = ModelConfig(widths=(4, 8, 8), head=(16,), norm="batch", bn_scale=False, bn_momentum=0.6)


def _state(optim: OptimConfig, *, ema: bool = False):
    model = train.create_model(TINY_BN, 4)
    tx = train.create_optimizer(optim, train.create_learning_rate_fn(optim, 10))
    return train.create_train_state(model, tx, jax.random.key(0), ema=ema)


def _one_step(state, optim: OptimConfig, **kw):
    s = data.synthetic(64, 8, num_classes=4, val_size=0, seed=3)
    step = jax.jit(lambda st, x, y, perm: train.train_step(st, x, y, perm, jnp.int32(0), jax.random.key(1),
                                                           batch_size=32, **kw))  # fmt: skip
    return step(state, jnp.asarray(s.train.images), jnp.asarray(s.train.labels), jnp.arange(64, dtype=jnp.int32))


def test_ema_follows_its_formula_with_the_ramp():
    optim = OptimConfig(optimizer="adamw", lr=1e-2, ema=0.99)
    st0 = _state(optim, ema=True)
    st1, _ = _one_step(st0, optim, ema=0.99)
    st2, _ = _one_step(st1, optim, ema=0.99)
    d0, d1 = 1 / 10, 2 / 11  # min(0.99, (1 + t) / (10 + t)) at steps 0 and 1
    for e0, p1, p2, e2 in zip(*(jax.tree.leaves(t) for t in (st0.params, st1.params, st2.params, st2.ema_params))):
        e1 = d0 * np.asarray(e0) + (1 - d0) * np.asarray(p1)
        np.testing.assert_allclose(e2, d1 * e1 + (1 - d1) * np.asarray(p2), rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(st2.ema_params)[-1], jax.tree.leaves(st2.params)[-1])


def test_recomputed_batch_stats_are_the_data_statistics():
    """The first BatchNorm's statistics equal the mean and variance of the first conv's
    output over all the batches (equal-size batches: the mean of batch means is the mean)."""
    model = train.create_model(TINY_BN, 4)
    v = init_params(model, jax.random.key(0))
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 32, 32, 3), dtype=np.uint8)
    stats = train.recompute_batch_stats(model, v["params"], v["batch_stats"], jnp.asarray(x))
    xf = (x.reshape(-1, 32, 32, 3) / 255.0 - np.asarray(model.mean)) / np.asarray(model.std)
    h = jax.lax.conv_general_dilated(jnp.asarray(xf, jnp.float32), v["params"]["Conv_0"]["kernel"], (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    h = np.asarray(h, np.float64).reshape(3, -1, 4)
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], h.mean((0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], h.var(1).mean(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stats["BatchNorm_0"]["mean"], v["batch_stats"]["BatchNorm_0"]["mean"])


def test_a_run_with_ema_validates_and_returns_the_average(tmp_path):
    cfg = TrainConfig(name="tiny", model=TINY_BN, optim=OptimConfig(optimizer="adamw", lr=1e-2, ema=0.9),
                      batch_size=32, epochs=2, val_size=32, patience=0, log_every=4)  # fmt: skip
    s = data.synthetic(128, 16, num_classes=4, val_size=32, seed=1)
    r = train.fit(cfg, s.train.images, s.train.labels, s.val.images, s.val.labels, key=jax.random.key(0),
                  num_classes=4, progress=False, ckpt_dir=str(tmp_path / "ck"))  # fmt: skip
    _, v, cfg2, _ = train.load_trained(str(tmp_path / "ck"))
    _, last, _, _ = train.load_trained(str(tmp_path / "ck"), which="last")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(r.state.variables), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, b)  # what fit returns is what "best" loads: the average
    assert not np.allclose(v["params"]["Dense_1"]["kernel"], last["params"]["Dense_1"]["kernel"])
    assert not np.allclose(v["batch_stats"]["BatchNorm_0"]["mean"], last["batch_stats"]["BatchNorm_0"]["mean"])


def test_sgd_nesterov_scales_bias_steps():
    optim = OptimConfig(optimizer="sgd_nesterov", lr=0.1, momentum=0.9, bias_lr_scale=8.0, weight_decay=0.0,
                        schedule="constant")  # fmt: skip
    st0 = _state(optim)
    grads = jax.tree.map(jnp.ones_like, st0.params)
    updates, _ = st0.tx.update(grads, st0.opt_state, st0.params)
    first = -0.1 * (1 + 0.9)  # Nesterov's first step from zero momentum: -lr (g + m g)
    np.testing.assert_allclose(updates["BatchNorm_0"]["bias"], 8.0 * first, rtol=1e-6)
    np.testing.assert_allclose(updates["Dense_0"]["bias"], 8.0 * first, rtol=1e-6)
    np.testing.assert_allclose(updates["Conv_1"]["kernel"], first, rtol=1e-6)


def test_muon_orthogonalizes_conv_kernels_and_adams_the_rest():
    optim = OptimConfig(optimizer="muon", lr=0.02, adam_lr=1e-3, weight_decay=0.0, schedule="constant")
    st0 = _state(optim)
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), st0.params)
    with jax.numpy_dtype_promotion("standard"):  # as in train_step: optax mixes int steps and floats
        updates, _ = jax.jit(st0.tx.update)(grads, st0.opt_state, st0.params)
    k = np.asarray(updates["Conv_2"]["kernel"]).reshape(-1, 8)  # (3*3*8) x 8
    sv = np.linalg.svd(k, compute_uv=False) / 0.02
    assert sv.min() > 0.5 and sv.max() < 1.5, sv  # about orthogonal (Newton-Schulz is approximate)
    g = np.asarray(grads["Conv_2"]["kernel"]).reshape(-1, 8)
    assert np.linalg.svd(g, compute_uv=False).max() / np.linalg.svd(g, compute_uv=False).min() > 2  # the gradient is not
    # The rest: Nesterov Adam's first step, the same size everywhere: adam_lr (1 + b1 (1 - b1) / (1 - b1^2)).
    d = np.abs(np.asarray(updates["Dense_0"]["kernel"]))
    np.testing.assert_allclose(d, 1e-3 * (1 + 0.9 * 0.1 / (1 - 0.81)), rtol=1e-4)


def test_adversarial_training_uses_its_own_label_smoothing():
    from jaxadv.configs import FAST, override

    assert train.label_smoothing(QUICK) == 0.2 and train.label_smoothing(QUICK.with_defense("median")) == 0.2
    assert train.label_smoothing(QUICK.with_defense("fgsm_at")) == 0.0  # smoothing would mask FGSM's gradient
    assert train.label_smoothing(FAST.with_defense("fgsm_at")) == 0.1  # unset: the optim section's
    assert override(QUICK, {"defense.adv_label_smoothing": "none"}).defense.adv_label_smoothing is None
