"""Square: the reference's schedule, window sides and L2 patterns; exact query counts; both window modes."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.attacks import square

sq = importlib.import_module("jaxadv.attacks.square")


def test_window_sides_and_patterns_are_the_references():
    its = (10, 50, 200, 500, 1000, 2000, 4000, 4999)
    assert [sq.window_side(sq.p_selection(0.8, i), 32, 32, "linf") for i in its] == [29, 20, 14, 10, 7, 5, 4, 3]
    assert [sq.window_side(sq.p_selection(0.8, i), 32, 32, "l2") for i in its] == [29, 21, 15, 11, 7, 5, 5, 3]
    assert [sq.window_side(sq.p_selection(0.8, i), 28, 28, "linf") for i in its] == [25, 18, 13, 9, 6, 4, 3, 2]
    np.testing.assert_allclose(sq.eta_rectangles(1, 3), [[0.19245, 0.96225, 0.19245]], atol=1e-5)
    np.testing.assert_allclose(sq.eta(3), [[0.136083, 0.680414, 0.136083], [-0.129099] * 3,
                                           [-0.129099, -0.645497, -0.129099]], atol=1e-6)  # fmt: skip
    assert np.sum(sq.eta(5) ** 2) == pytest.approx(1.0)


def test_queries_are_counted_exactly(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    x_adv, info = square(apply_fn, params, x, y, key=jax.random.key(0), eps=0.1, n_queries=40, return_info=True)
    fooled = info["fooled"]
    q = info["queries"]
    # Robust points use every query: the start and 40 iterations, as the reference's loop.
    assert q.max() <= 41 and np.all(q[~fooled] == 41)
    assert np.all(q[fooled] >= 1) and np.all(q[fooled] < 41) and fooled.any()
    # The forward-pass count is the queries plus one clean pass per point.
    assert info["passes"]["forward"] == q.sum() + len(q)
    # A fooled point's example is misclassified; every point stays in the ball.
    assert np.all(np.asarray(apply_fn(params, x_adv)).argmax(-1)[fooled] != np.asarray(y)[fooled])
    assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6



@pytest.mark.parametrize("window", ["image", "batch"])
@pytest.mark.parametrize("shape", [(8, 8, 3), (32, 32, 3), (9, 7, 2)])
def test_l2_start_is_the_references_tile_by_tile_pattern(shape, window):
    """The vectorized L2 start against the reference's loop: tile n (from 1) at each corner gets
    eta(side), transposed when its draw says so (the first image's draw in "batch" mode), times a
    sign per channel, then the whole image scaled to unit norm."""
    h, w, c = shape
    keys = jax.random.split(jax.random.key(3), 4)
    s = h // 5
    sp = (h - 5 * s) // 2
    want = np.zeros((4, h, w, c), np.float32)
    n = 0
    for vh in range(sp, sp + s * (h // s), s):
        for vw in range(sp, sp + s * (w // s), s):
            if vh + s > h or vw + s > w:
                continue
            n += 1
            for b in range(4):
                k_sign = jax.random.split(jax.random.fold_in(keys[b], 1_000_000 + n), 2)[0]
                k_tr = jax.random.split(jax.random.fold_in(keys[0 if window == "batch" else b], 1_000_000 + n), 2)[1]
                pat = sq.eta(s).T if bool(jax.random.uniform(k_tr) > 0.5) else sq.eta(s)
                sign = np.sign(2.0 * np.asarray(jax.random.uniform(k_sign, (c,))) - 1.0)
                want[b, vh:vh + s, vw:vw + s, :] = pat[..., None] * sign
    want /= np.sqrt(np.sum(want**2, axis=(1, 2, 3), keepdims=True)) + 1e-12
    assert n >= 2  # premise: several tiles
    np.testing.assert_allclose(np.asarray(sq._l2_tiles(keys, shape, window)), want, rtol=0, atol=1e-6)

@pytest.mark.parametrize("norm, eps", [("linf", 0.08), ("l2", 0.8)])
def test_window_modes(trained_cnn, norm, eps):
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    kw = dict(eps=eps, norm=norm, n_queries=25, return_info=True)
    keys = jax.random.split(jax.random.key(1), len(y))
    for window, independent in (("image", True), ("batch", False)):
        _, whole = square(apply_fn, params, x, y, key=keys, window=window, **kw)
        halves = [square(apply_fn, params, x[s], y[s], key=keys[s], window=window, **kw)[1]["queries"]
                  for s in (slice(0, 24), slice(24, None))]  # fmt: skip
        same = np.array_equal(np.concatenate(halves), whole["queries"])
        assert same == independent, window  # the reference's shared windows depend on the batch
    with pytest.raises(ValueError, match="window must be one of"):
        square(apply_fn, params, x, y, key=keys, window="pixel", eps=eps)
