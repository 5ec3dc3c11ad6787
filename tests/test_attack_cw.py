"""Carlini-Wagner L2: near the closed-form minimal perturbation of an affine model, per-example search."""

import jax.numpy as jnp
import numpy as np

from attack_utils import linear_apply, make_linear, uniform_images
from jaxadv.attacks import cw


def test_cw_finds_nearly_the_minimal_l2_perturbation_of_an_affine_binary_model():
    params = make_linear(3, 2, scale=0.3)
    x = uniform_images(4, 6, 0.35, 0.65)
    y = jnp.argmax(linear_apply(params, x), -1)
    x_adv, info = cw(linear_apply, params, x, y, return_info=True, max_iter=1000, binary_search_steps=9)
    w = np.asarray(params["W"][:, 1] - params["W"][:, 0], np.float64)
    f = np.asarray(linear_apply(params, x), np.float64) @ np.array([-1.0, 1.0])
    minimal = np.abs(f) / np.linalg.norm(w)  # the distance to the boundary; far from the box here
    assert np.all(np.asarray(info.success))
    got = np.asarray(info.norm)
    assert np.all(got >= minimal * (1 - 1e-3)) and np.all(got <= minimal * 1.1), (got, minimal)
    assert np.all(np.asarray(linear_apply(params, x_adv)).argmax(-1) != np.asarray(y))


def test_the_binary_search_is_per_example():
    params = make_linear(5, 2, scale=0.3)
    x = uniform_images(6, 4, 0.3, 0.7)
    y = jnp.argmax(linear_apply(params, x), -1)
    kw = dict(max_iter=200, binary_search_steps=5, return_info=True)
    batch, info = cw(linear_apply, params, x, y, **kw)
    for i in range(4):
        alone, info_i = cw(linear_apply, params, x[i:i + 1], y[i:i + 1], **kw)
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(batch[i]), atol=1e-5)
        assert int(info_i.iterations[0]) == int(info.iterations[i])
    assert len(set(np.asarray(info.iterations).tolist())) > 1  # the examples stopped at different steps
