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
