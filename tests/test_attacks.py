"""Tests for jaxadv.attacks: FGSM and DeepFool against closed forms and NumPy references."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadv import detect, models, squeeze
from jaxadv.attacks import REGISTRY, DeepFoolResult, deepfool, fgsm, fgsm_jit, pgd
# `jaxadv.attacks.deepfool` is the function; the module is reached through importlib.
deepfool_module = importlib.import_module("jaxadv.attacks.deepfool")
from jaxadv.attacks.fgsm import summed_cross_entropy

HWC = (4, 4, 3)
D = int(np.prod(HWC))


# ---------------------------------------------------------------------------------------
# Models: an affine classifier with closed-form gradients, and a small trained CNN
# ---------------------------------------------------------------------------------------


def linear_apply(params, x):
    """logits = x.reshape(B, -1) @ W + b (module level, so a stable static callable)."""
    return x.reshape(x.shape[0], -1) @ params["W"] + params["b"][None, :]


def make_linear(seed, num_classes, scale=1.0):
    rng = np.random.default_rng(seed)
    w = (scale * rng.standard_normal((D, num_classes))).astype(np.float32)
    b = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
    return {"W": jnp.asarray(w), "b": jnp.asarray(b)}


def uniform_images(seed, batch, lo, hi):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(lo, hi, (batch, *HWC)).astype(np.float32))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_summed_ce(params, x, y):
    """float64 NumPy reference of the summed softmax cross-entropy of the linear model."""
    w, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    logits = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w + b
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -log_p[np.arange(len(y)), np.asarray(y)].sum()


def np_ce_grad(params, x, y):
    """Closed form d(sum CE)/dx = (softmax - onehot) @ W^T, reshaped like x."""
    w, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    logits = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w + b
    p = np_softmax(logits)
    p[np.arange(len(y)), np.asarray(y)] -= 1.0
    return (p @ w.T).reshape(x.shape)


# ---------------------------------------------------------------------------------------
# FGSM
# ---------------------------------------------------------------------------------------


def test_fgsm_linear_equals_closed_form():
    params = make_linear(0, 5)
    x = uniform_images(1, 6, 0.2, 0.8)
    y = jnp.asarray([0, 1, 2, 3, 4, 0], jnp.int32)
    eps = 0.05
    g = np_ce_grad(params, x, y)
    assert np.abs(g).min() > 1e-5  # premise: no sign ambiguity between f32 and f64
    expected = np.clip(np.asarray(x) + eps * np.sign(g), 0.0, 1.0)
    x_adv = fgsm(linear_apply, params, x, y, eps=eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)


def test_fgsm_gradient_is_summed_ce_and_matches_finite_differences():
    params = make_linear(2, 4)
    x = uniform_images(3, 4, 0.0, 1.0)
    y = jnp.asarray([3, 0, 1, 2], jnp.int32)
    grad = np.asarray(jax.grad(lambda z: summed_cross_entropy(linear_apply(params, z), y))(x))
    np.testing.assert_allclose(grad, np_ce_grad(params, x, y), rtol=1e-4, atol=1e-6)
    # Central differences of the float64 summed loss on a few coordinates of different
    # examples: a mean-reduced loss would be off by the factor B = 4.
    x64 = np.asarray(x, np.float64)
    h = 1e-5
    for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 3, 1, 2), (3, 1, 2, 0)]:
        xp, xm = x64.copy(), x64.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (np_summed_ce(params, xp, y) - np_summed_ce(params, xm, y)) / (2 * h)
        np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-5)


def test_fgsm_eps_ball_and_box():
    params = make_linear(4, 3, scale=3.0)
    x = uniform_images(5, 8, 0.0, 1.0)  # many pixels near the bounds: clipping is active
    y = jnp.asarray(np.arange(8) % 3, jnp.int32)
    eps = 0.1
    x_adv = np.asarray(fgsm(linear_apply, params, x, y, eps=eps))
    assert np.all(np.isfinite(x_adv))
    assert np.abs(x_adv - np.asarray(x)).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.any(x_adv == 0.0) and np.any(x_adv == 1.0)  # premise: the clip was exercised


def test_fgsm_eps_zero_is_identity():
    params = make_linear(6, 3)
    x = uniform_images(7, 4, 0.0, 1.0)
    y = jnp.zeros(4, jnp.int32)
    np.testing.assert_array_equal(np.asarray(fgsm(linear_apply, params, x, y, eps=0.0)), x)


def test_fgsm_targeted_moves_toward_target():
    params = make_linear(8, 5)
    x = uniform_images(9, 6, 0.3, 0.7)
    target = jnp.asarray([1, 2, 3, 4, 0, 1], jnp.int32)
    x_adv = fgsm(linear_apply, params, x, target, eps=0.02, targeted=True)
    rows = np.arange(6)
    before = np.asarray(linear_apply(params, x))[rows, target]
    after = np.asarray(linear_apply(params, x_adv))[rows, target]
    assert np.all(after > before)
    ce = lambda z: np.asarray(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        linear_apply(params, z), target))
    assert np.all(ce(x_adv) < ce(x))
    # And the untargeted attack on the same labels moves the other way.
    x_away = fgsm(linear_apply, params, x, target, eps=0.02)
    assert np.all(np.asarray(linear_apply(params, x_away))[rows, target] < before)


def test_fgsm_jit_equals_eager():
    params = make_linear(10, 4)
    x = uniform_images(11, 4, 0.0, 1.0)
    y = jnp.asarray([0, 1, 2, 3], jnp.int32)
    eager = np.asarray(fgsm(linear_apply, params, x, y, eps=0.03))
    np.testing.assert_allclose(np.asarray(fgsm_jit(linear_apply, params, x, y, eps=0.03)), eager,
                               atol=1e-6)
    user_jit = jax.jit(fgsm, static_argnames=("apply_fn", "targeted"))
    np.testing.assert_allclose(np.asarray(user_jit(linear_apply, params, x, y, eps=0.03)), eager,
                               atol=1e-6)


_FGSM_TRACES = []


def counting_linear_apply(params, x):
    _FGSM_TRACES.append(x.shape)  # runs once per trace, never per call under jit
    return linear_apply(params, x)


def test_fgsm_jit_does_not_retrace_for_new_eps_or_params():
    x = uniform_images(12, 4, 0.0, 1.0)
    y = jnp.asarray([0, 1, 0, 1], jnp.int32)
    fgsm_jit(counting_linear_apply, make_linear(13, 2), x, y, eps=0.01)
    assert len(_FGSM_TRACES) == 1
    out = fgsm_jit(counting_linear_apply, make_linear(14, 2), x, y, eps=0.2)
    assert len(_FGSM_TRACES) == 1
    assert np.abs(np.asarray(out) - np.asarray(x)).max() > 0.01  # the new eps was used


GOOD_X = np.full((2, *HWC), 0.5, np.float32)
GOOD_Y = np.zeros(2, np.int32)


@pytest.mark.parametrize(
    "x, y, eps, match",
    [
        (GOOD_X, GOOD_Y, -0.1, "eps must be finite and >= 0"),
        (GOOD_X + 1.0, GOOD_Y, 0.1, r"values must lie in \[0.0, 1.0\]"),
        (GOOD_X.reshape(2, D), GOOD_Y, 0.1, "rank-4 NHWC"),
        (GOOD_X.astype(np.uint8), GOOD_Y, 0.1, "float image batch"),
        (GOOD_X, np.zeros(3, np.int32), 0.1, "3 labels but x has batch size 2"),
        (GOOD_X, GOOD_Y[:, None], 0.1, "rank-1 array of int labels"),
        (GOOD_X, GOOD_Y.astype(np.float32), 0.1, "integer class labels"),
    ],
)
def test_fgsm_rejects_bad_inputs(x, y, eps, match):
    params = make_linear(15, 2)
    for attack in (fgsm, fgsm_jit):
        with pytest.raises(ValueError, match=match):
            attack(linear_apply, params, x, y, eps=eps)


# ---------------------------------------------------------------------------------------
# DeepFool on affine classifiers: closed forms and a NumPy reference of each convention
# ---------------------------------------------------------------------------------------


def closed_form_step(params, x0, norm, num_candidates=10):
    """Per example: the minimal linearized step r to the nearest candidate boundary."""
    w_all, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    flat = np.asarray(x0, np.float64).reshape(x0.shape[0], -1)
    steps = []
    for xi in flat:
        logits = xi @ w_all + b
        orig = int(np.argmax(logits))
        order = [c for c in np.argsort(-logits, kind="stable") if c != orig]
        others = order[: min(num_candidates, len(logits)) - 1]
        best = None
        for j in others:
            w = w_all[:, j] - w_all[:, orig]
            f = abs(logits[j] - logits[orig])
            dist = f / (np.linalg.norm(w) if norm == "l2" else np.abs(w).sum())
            if best is None or dist < best[0]:
                best = (dist, f, w)
        _, f, w = best
        if norm == "l2":
            steps.append((f + 1e-4) / (w @ w) * w)
        else:
            steps.append((f + 1e-4) / np.abs(w).sum() * np.sign(w))
    return np.stack(steps).reshape(x0.shape), orig


def reference_deepfool_affine(params, x0, *, num_candidates, overshoot, max_iter, norm, mode):
    """Independent float64 NumPy DeepFool for affine models, one example at a time."""
    w_all, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    x0 = np.asarray(x0, np.float64)
    outs, iters, succ = [], [], []
    for x_init in x0.reshape(x0.shape[0], -1):
        logits = x_init @ w_all + b
        orig = int(np.argmax(logits))
        others = [c for c in np.argsort(-logits, kind="stable") if c != orig]
        others = others[: min(num_candidates, len(logits)) - 1]
        x, r_total, n = x_init.copy(), np.zeros_like(x_init), 0
        while n < max_iter:
            lg = x @ w_all + b
            if np.argmax(lg) != orig:
                break
            cands = []
            for j in others:
                w = w_all[:, j] - w_all[:, orig]
                f = abs(lg[j] - lg[orig])
                q = np.linalg.norm(w) if norm == "l2" else np.abs(w).sum()
                cands.append((f / q, f, w))
            _, f, w = min(cands, key=lambda t: t[0])
            if norm == "l2":
                r = (f + 1e-4) / (w @ w) * w
            else:
                r = (f + 1e-4) / np.abs(w).sum() * np.sign(w)
            r_total += r
            if mode == "cumulative":
                x = np.clip(x_init + (1 + overshoot) * r_total, 0, 1)
            elif mode == "final":
                x = np.clip(x_init + r_total, 0, 1)
            else:
                x = np.clip(x + (1 + overshoot) * r, 0, 1)
            n += 1
        x_adv = np.clip(x_init + (1 + overshoot) * r_total, 0, 1) if mode == "final" else x
        outs.append(x_adv)
        iters.append(n)
        succ.append(np.argmax(x_adv @ w_all + b) != orig)
    return np.stack(outs).reshape(x0.shape), np.array(iters), np.array(succ)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_deepfool_affine_one_step_closed_form(num_classes, norm):
    params = make_linear(20 + num_classes, num_classes)
    x0 = uniform_images(21, 6, 0.4, 0.6)
    overshoot = 0.02
    r, _ = closed_form_step(params, x0, norm)
    expected = np.asarray(x0, np.float64) + (1 + overshoot) * r
    assert 0.0 < expected.min() and expected.max() < 1.0  # premise: far from the clip bounds
    res = deepfool(linear_apply, params, x0, overshoot=overshoot, norm=norm)
    assert isinstance(res, DeepFoolResult)
    np.testing.assert_allclose(np.asarray(res.x_adv), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.iterations), 1)
    assert np.all(np.asarray(res.success))
    delta = (np.asarray(res.x_adv) - np.asarray(x0)).reshape(6, -1)
    ref_norm = np.linalg.norm(delta, axis=1) if norm == "l2" else np.abs(delta).max(axis=1)
    np.testing.assert_allclose(np.asarray(res.norm), ref_norm, rtol=1e-5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_step_lands_just_past_nearest_boundary(norm):
    # Without overshoot, one linearized step on an affine model reaches
    # logit_l - logit_orig = +1e-4 exactly for the nearest boundary l (the step margin).
    params = make_linear(25, 5)
    x0 = uniform_images(26, 6, 0.4, 0.6)
    res = deepfool(linear_apply, params, x0, overshoot=0.0, norm=norm)
    w_all, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    before = np.asarray(x0, np.float64).reshape(6, -1) @ w_all + b
    after = np.asarray(res.x_adv, np.float64).reshape(6, -1) @ w_all + b
    rows = np.arange(6)
    orig = before.argmax(-1)
    gap = after - after[rows, orig][:, None]
    gap[rows, orig] = -np.inf
    np.testing.assert_allclose(gap.max(-1), 1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.iterations), 1)


def clipped_affine_case():
    """Affine 6-class model and inputs with many pixels at 0 or 1, so clipping blocks steps."""
    params = make_linear(30, 6)
    x0 = jnp.clip(uniform_images(31, 16, -0.4, 1.4), 0.0, 1.0)
    return params, x0


def switching_affine_case():
    """Two pixels, three classes, built so the nearest boundary switches mid-run.

    Pixel 0 starts at the upper bound. Class 1 is nearest but mostly reached by raising
    pixel 0, which clipping blocks; the small progress on pixel 1 brings class 2, reached
    by *lowering* pixel 0 and raising pixel 1, nearer after a few steps. Then
    "cumulative" keeps pixel 0 clipped at 1 (r_total's first component stays large) while
    "per_step" lowers it, and "final" takes more steps because its iterates lack overshoot.
    """
    params = {"W": jnp.asarray([[0.0, 4.0, -1.0], [0.0, 0.5, 6.0]], jnp.float32),
              "b": jnp.asarray([0.0, -5.25, -4.0], jnp.float32)}
    x0 = jnp.asarray([[1.0, 0.5], [1.0, 0.3]], jnp.float32).reshape(2, 1, 1, 2)
    return params, x0


CASES = {"clipped": clipped_affine_case, "switching": switching_affine_case}


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("mode", ["cumulative", "final", "per_step"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_deepfool_overshoot_modes_match_reference(case, mode, norm):
    params, x0 = CASES[case]()
    kw = dict(num_candidates=3, overshoot=0.3, max_iter=20, norm=norm)
    res = deepfool(linear_apply, params, x0, overshoot_mode=mode, **kw)
    x_ref, it_ref, succ_ref = reference_deepfool_affine(params, x0, mode=mode, **kw)
    assert it_ref.max() >= 2  # premise: clipping forced several steps
    np.testing.assert_array_equal(np.asarray(res.iterations), it_ref)
    np.testing.assert_array_equal(np.asarray(res.success), succ_ref)
    np.testing.assert_allclose(np.asarray(res.x_adv), x_ref, atol=1e-4)
    assert np.asarray(res.x_adv).min() >= 0.0 and np.asarray(res.x_adv).max() <= 1.0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_overshoot_modes_differ(norm):
    # Premise of the test above: the three conventions really give different results.
    params, x0 = switching_affine_case()
    outs = {m: deepfool(linear_apply, params, x0, overshoot=0.3, max_iter=20, norm=norm,
                        overshoot_mode=m) for m in ("cumulative", "final", "per_step")}
    x = {m: np.asarray(r.x_adv) for m, r in outs.items()}
    assert np.all(x["cumulative"][..., 0] == 1.0) and np.all(x["per_step"][..., 0] < 0.99)
    assert not np.allclose(x["final"], x["cumulative"])
    assert np.all(np.asarray(outs["final"].iterations) > np.asarray(outs["cumulative"].iterations))
    assert all(np.all(np.asarray(r.success)) for r in outs.values())


def test_deepfool_freezes_fooled_examples():
    params, x0 = clipped_affine_case()
    one = deepfool(linear_apply, params, x0, overshoot=0.3, max_iter=1)
    many = deepfool(linear_apply, params, x0, overshoot=0.3, max_iter=20)
    it = np.asarray(many.iterations)
    early = it == 1
    assert early.any() and (it > 1).any()  # premise: both kinds present
    # Examples fooled after one step do not move while the others keep iterating.
    np.testing.assert_array_equal(np.asarray(many.x_adv)[early], np.asarray(one.x_adv)[early])
    assert np.all(np.asarray(many.success))


@pytest.mark.parametrize("overshoot_mode", ["cumulative", "final", "per_step"])
def test_deepfool_host_equals_device_and_jit(overshoot_mode):
    params, x0 = clipped_affine_case()
    kw = dict(num_candidates=4, max_iter=6, overshoot_mode=overshoot_mode)
    host = deepfool(linear_apply, params, x0, driver="host", **kw)
    device = deepfool(linear_apply, params, x0, driver="device", **kw)
    traced = jax.jit(lambda p, x: deepfool(linear_apply, p, x, **kw))(params, x0)  # device
    for other in (device, traced):
        np.testing.assert_allclose(np.asarray(other.x_adv), np.asarray(host.x_adv), atol=1e-6)
        for field in ("iterations", "success"):
            np.testing.assert_array_equal(np.asarray(getattr(other, field)),
                                          np.asarray(getattr(host, field)))


def test_deepfool_zero_iterations_and_reference_class():
    params, x0 = clipped_affine_case()
    res = deepfool(linear_apply, params, x0, max_iter=0)
    np.testing.assert_array_equal(np.asarray(res.x_adv), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(res.iterations), 0)
    assert not np.asarray(res.success).any()  # the reference class is the prediction at x0


_DF_TRACES = []


def counting_linear_apply_df(params, x):
    _DF_TRACES.append(x.shape)
    return linear_apply(params, x)


def test_deepfool_host_driver_does_not_retrace():
    params, x0 = clipped_affine_case()
    deepfool(counting_linear_apply_df, params, x0, max_iter=5)
    first = len(_DF_TRACES)
    assert first > 0
    deepfool(counting_linear_apply_df, make_linear(32, 6), x0, max_iter=5, overshoot=0.1)
    assert len(_DF_TRACES) == first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm="l1"), "norm must be one of"),
        (dict(overshoot_mode="sometimes"), "overshoot_mode must be one of"),
        (dict(jacobian="jacfwd"), "jacobian must be one of"),
        (dict(driver="gpu"), "driver must be one of"),
        (dict(num_candidates=1), "num_candidates must be an int >= 2"),
        (dict(max_iter=-1), "max_iter must be an int >= 0"),
        (dict(overshoot=-0.5), "overshoot must be finite and >= 0"),
    ],
)
def test_deepfool_rejects_bad_options(kwargs, match):
    params, x0 = clipped_affine_case()
    with pytest.raises(ValueError, match=match):
        deepfool(linear_apply, params, x0, **kwargs)


def test_deepfool_host_driver_under_jit_raises():
    params, x0 = clipped_affine_case()
    with pytest.raises(ValueError, match='driver="host" needs concrete inputs'):
        jax.jit(lambda p, x: deepfool(linear_apply, p, x, driver="host"))(params, x0)


def test_registry():
    assert REGISTRY["fgsm"] is fgsm and REGISTRY["deepfool"] is deepfool and REGISTRY["pgd"] is pgd


# ---------------------------------------------------------------------------------------
# DeepFool on a small CNN trained on synthetic colour patterns
# ---------------------------------------------------------------------------------------

NUM_CLASSES = 3
IMAGE = (8, 8, 3)  # tiny_cnn pools three times: 8 -> 1


def synthetic_patterns(key, n):
    """Three classes: a bright red, green or blue blob on a noisy grey background."""
    k_label, k_noise, k_pos = jax.random.split(key, 3)
    y = jax.random.randint(k_label, (n,), 0, NUM_CLASSES)
    yy, xx = jnp.meshgrid(jnp.arange(8.0), jnp.arange(8.0), indexing="ij")
    centre = jax.random.uniform(k_pos, (n, 2), minval=2.0, maxval=6.0)
    dist2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    blob = jnp.exp(-dist2 / 4.0)
    colour = jax.nn.one_hot(y, 3)
    noise = 0.1 * jax.random.normal(k_noise, (n, *IMAGE))
    x = 0.4 + 0.5 * blob[..., None] * colour[:, None, None, :] + noise
    return jnp.clip(x, 0.0, 1.0), y.astype(jnp.int32)


def he_init(model, seed):
    """He-normal kernels, zero biases, host-side: `model.init`'s truncated-normal init costs
    several seconds of XLA:CPU compile, which this module's time budget cannot afford."""
    x = jnp.zeros((1, *IMAGE))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def leaf(s):
        if len(s.shape) < 2:
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in), s.dtype)

    return jax.tree.map(leaf, shapes)


@pytest.fixture(scope="module")
def trained_cnn():
    model = models.tiny_cnn(num_classes=NUM_CLASSES)
    apply_fn = models.make_apply(model)
    k_train, k_test = jax.random.split(jax.random.key(42))
    params = he_init(model, seed=0)
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            p, opt = carry
            x, y = synthetic_patterns(k, 64)
            loss_fn = lambda q: summed_cross_entropy(apply_fn(q, x), y) / x.shape[0]  # noqa: E731
            grads = jax.grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, 150))
        return params

    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int32 counts and floats
        params = train(params, k_train)
    x, y = synthetic_patterns(k_test, 48)
    correct = np.asarray(jnp.argmax(apply_fn(params, x), -1) == y)
    assert correct.mean() > 0.9, f"premise: the CNN learned the patterns (acc {correct.mean():.2f})"
    return apply_fn, params, x, correct


def test_deepfool_fools_trained_cnn(trained_cnn):
    apply_fn, params, x, correct = trained_cnn
    res = deepfool(apply_fn, params, x, max_iter=50)
    success = np.asarray(res.success)
    assert success[correct].mean() > 0.95
    # Reported fields are consistent with x_adv.
    pred_adv = np.asarray(jnp.argmax(apply_fn(params, res.x_adv), -1))
    pred_clean = np.asarray(jnp.argmax(apply_fn(params, x), -1))
    np.testing.assert_array_equal(success, pred_adv != pred_clean)
    delta = (np.asarray(res.x_adv) - np.asarray(x)).reshape(len(success), -1)
    np.testing.assert_allclose(np.asarray(res.norm), np.linalg.norm(delta, axis=1),
                               rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(res.iterations)[success] >= 1)
    assert np.asarray(res.x_adv).min() >= 0.0 and np.asarray(res.x_adv).max() <= 1.0


def test_deepfool_linf_fools_trained_cnn(trained_cnn):
    apply_fn, params, x, correct = trained_cnn
    res = deepfool(apply_fn, params, x, norm="linf", max_iter=50)
    assert np.asarray(res.success)[correct].mean() > 0.95
    delta = (np.asarray(res.x_adv) - np.asarray(x)).reshape(x.shape[0], -1)
    np.testing.assert_allclose(np.asarray(res.norm), np.abs(delta).max(axis=1),
                               rtol=1e-5, atol=1e-7)


def test_candidate_jacobian_vmap_equals_vjps_equals_jacrev(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    x = x[:5]

    @jax.jit  # one compile instead of many eager op-by-op ones
    def jacobians(params, x):
        consts, state = deepfool_module._init(apply_fn, params, x, num_candidates=3)
        logits_fn = lambda z: apply_fn(params, z)  # noqa: E731
        _, pullback = jax.vjp(logits_fn, state.x)
        w_vjps = deepfool_module._candidate_jacobian(pullback, consts, NUM_CLASSES, "vjps")
        w_vmap = deepfool_module._candidate_jacobian(pullback, consts, NUM_CLASSES, "vmap")
        return consts, w_vjps, w_vmap, jax.jacrev(logits_fn)(x)  # jac: [B,K,B,H,W,C]

    consts, w_vjps, w_vmap, jac = jax.device_get(jacobians(params, x))
    assert np.abs(w_vjps).max() > 1.0  # premise: a non-trivial Jacobian
    np.testing.assert_allclose(w_vmap, w_vjps, rtol=1e-5, atol=1e-5)
    # Per-example reference from the full batch Jacobian: no cross-example mixing.
    for b in range(x.shape[0]):
        for j in range(consts.others.shape[1]):
            ref = jac[b, consts.others[b, j], b] - jac[b, consts.orig[b], b]
            np.testing.assert_allclose(w_vjps[j, b], ref, rtol=1e-5, atol=1e-5)


def test_deepfool_cnn_drivers_and_jacobians_agree(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    run = functools.partial(deepfool, apply_fn, params, x, max_iter=20)
    ref = run(driver="host", jacobian="vjps")
    for driver, jacobian in (("host", "vmap"), ("device", "vjps")):
        res = run(driver=driver, jacobian=jacobian)
        np.testing.assert_allclose(np.asarray(res.x_adv), np.asarray(ref.x_adv), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(res.iterations), np.asarray(ref.iterations))
        np.testing.assert_array_equal(np.asarray(res.success), np.asarray(ref.success))


# ---------------------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_stays_in_the_eps_ball_and_the_box(norm, eps):
    params = make_linear(0, 5, scale=3.0)
    x = uniform_images(1, 6, 0.0, 1.0)  # some pixels at the box edges
    y = jnp.arange(6) % 5
    x_adv = pgd(linear_apply, params, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm, restarts=2,
                key=jax.random.key(0))  # fmt: skip
    d = np.asarray(x_adv - x).reshape(6, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_one_step_from_x_is_fgsm():
    params = make_linear(2, 4)
    x = uniform_images(3, 5, 0.2, 0.8)
    y = jnp.arange(5) % 4
    a = pgd(linear_apply, params, x, y, eps=0.03, step_size=0.03, steps=1, random_start=False)
    np.testing.assert_allclose(a, fgsm(linear_apply, params, x, y, eps=0.03), atol=1e-6)


def test_pgd_unrolled_equals_the_fori_loop():
    params = make_linear(6, 4, scale=2.0)
    x = uniform_images(7, 5, 0.1, 0.9)
    y = jnp.arange(5) % 4
    kw = dict(eps=0.05, step_size=0.02, steps=4, restarts=3, key=jax.random.key(2))
    np.testing.assert_allclose(pgd(linear_apply, params, x, y, unroll=True, **kw),
                               pgd(linear_apply, params, x, y, unroll=False, **kw), atol=1e-6)  # fmt: skip


def test_pgd_needs_a_key_for_random_starts():
    params = make_linear(0, 3)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        pgd(linear_apply, params, uniform_images(0, 2, 0.2, 0.8), jnp.zeros(2, jnp.int32), eps=0.1, step_size=0.1,
            steps=1)  # fmt: skip


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_cnn(trained_cnn):
    apply_fn, params, x, correct = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    eps = 0.03
    acc = lambda z: float(jnp.mean(jnp.argmax(apply_fn(params, z), -1) == y))  # noqa: E731
    acc_fgsm = acc(fgsm(apply_fn, params, x, y, eps=eps))
    acc_pgd = acc(pgd(apply_fn, params, x, y, eps=eps, step_size=eps / 4, steps=10, key=jax.random.key(0)))
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < 1.0  # the budget is large enough to fool some examples


def test_pgd_restarts_keep_the_strongest_per_example(trained_cnn):
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    kw = dict(eps=0.02, step_size=0.005, steps=3, key=jax.random.key(1))
    fooled = lambda z: np.asarray(jnp.argmax(apply_fn(params, z), -1) != y)  # noqa: E731
    one = fooled(pgd(apply_fn, params, x, y, restarts=1, **kw))
    four = fooled(pgd(apply_fn, params, x, y, restarts=4, **kw))
    assert np.all(four >= one)  # restart 0 is the same run; later ones can only add successes


def _ce_objective(params, x, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(linear_apply(params, x)), y[:, None], axis=1)[:, 0]


def test_pgd_with_the_cross_entropy_objective_equals_the_default():
    params = make_linear(4, 4, scale=2.0)
    x = uniform_images(5, 6, 0.2, 0.8)
    y = jnp.arange(6) % 4
    kw = dict(eps=0.05, step_size=0.01, steps=5, restarts=2, key=jax.random.key(3))
    np.testing.assert_allclose(pgd(linear_apply, params, x, y, objective=_ce_objective, **kw),
                               pgd(linear_apply, params, x, y, **kw), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="objective"):
        pgd(linear_apply, params, x, y, objective=_ce_objective, targeted=True, **kw)


def test_adaptive_detector_attack_fools_with_lower_detector_scores(trained_cnn):
    """The score term (through BPDA) steers PGD to adversarial examples the detector misses."""
    apply_fn, params, x, _ = trained_cnn
    y = jnp.argmax(apply_fn(params, x), -1)
    sq = (squeeze.bit_depth_squeezer(2), squeeze.median_squeezer(2))
    kw = dict(eps=0.3, step_size=0.03, steps=30, key=jax.random.key(0))
    fooled = lambda z: np.asarray(jnp.argmax(apply_fn(params, z), -1) != y)  # noqa: E731
    score = lambda z: np.asarray(detect.score(apply_fn, params, z, sq))  # noqa: E731
    blind = pgd(apply_fn, params, x, y, objective=detect.adaptive_objective(apply_fn, sq, lam=0.0), **kw)
    aware = pgd(apply_fn, params, x, y, objective=detect.adaptive_objective(apply_fn, sq, lam=1.0), **kw)
    assert fooled(blind).mean() > 0.8 and fooled(aware).mean() > 0.8
    threshold = 0.1
    assert (score(blind)[fooled(blind)] > threshold).mean() > 0.5  # the squeezers see the detector-blind attack
    assert (score(aware)[fooled(aware)] > threshold).mean() < 0.25  # and mostly miss the adaptive one
    assert detect.adaptive_objective(apply_fn, sq, lam=1.0) is detect.adaptive_objective(apply_fn, sq, lam=1.0)


def test_deepfool_host_compaction_equals_device_driver(trained_cnn, monkeypatch):
    apply_fn, params, x, _ = trained_cnn
    calls = []
    real = deepfool_module._gather_rows
    monkeypatch.setattr(deepfool_module, "_gather_rows", lambda *a, **k: calls.append(k["size"]) or real(*a, **k))
    host = deepfool(apply_fn, params, x, max_iter=50, driver="host")
    device = deepfool(apply_fn, params, x, max_iter=50, driver="device")
    assert calls, "the batch of 48 never shrank to a compacted sub-batch"
    for a, b in zip(host, device):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_deepfool_host_driver_takes_no_step_after_the_last_example_is_fooled(trained_cnn, monkeypatch):
    # The stopping test runs on the new iterate inside the step, so the host loop calls the
    # step exactly max(iterations) times: no extra Jacobian once every example is fooled.
    apply_fn, params, x, _ = trained_cnn
    calls = []
    real = deepfool_module._step_jit
    monkeypatch.setattr(deepfool_module, "_step_jit", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = deepfool(apply_fn, params, x, max_iter=50, driver="host")
    assert bool(res.success.all())
    assert len(calls) == int(res.iterations.max()) >= 2


@pytest.mark.parametrize("batch", [1, 7, 48, 128, 1024])
def test_deepfool_bucket_sizes_cover_the_count_with_bounded_padding(batch):
    sizes = {deepfool_module._bucket(c, batch) for c in range(1, batch + 1)}
    for count in range(1, batch + 1):
        size = deepfool_module._bucket(count, batch)
        assert count <= size <= batch
        assert size == batch or size - count < max(8, count / 4)
    assert len(sizes) <= 24
