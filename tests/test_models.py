"""The study's CNN: parameter count, shapes, dtypes, pooling, the cached apply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.models import CNN, count_params, init_params, make_apply, max_pool_2x2, tiny_cnn


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
