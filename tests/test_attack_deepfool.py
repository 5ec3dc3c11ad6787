"""DeepFool against closed forms on affine models, a float64 reference of each overshoot convention,
and its drivers on a trained CNN."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attack_utils import *  # noqa: F403  (linear models, references, tiny CNN data)
from typing import NamedTuple

from jaxadv import attacks

# `jaxadv.attacks.deepfool` is the function; the module is reached through importlib.
deepfool_module = importlib.import_module("jaxadv.attacks.deepfool")


class Result(NamedTuple):
    x_adv: jax.Array
    iterations: jax.Array
    success: jax.Array
    norm: jax.Array


def deepfool(apply_fn, params, x, **kwargs):
    """DeepFool with its per-example statistics (`return_info=True`) as one record."""
    x_adv, info = attacks.deepfool(apply_fn, params, x, return_info=True, **kwargs)
    return Result(x_adv, *info)


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
    plain = attacks.deepfool(linear_apply, params, x0, overshoot=overshoot, norm=norm)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(res.x_adv))  # without return_info: x_adv only
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
