"""The attack contract, checked on every registered attack and norm (optax's `transform_test` style).

A new attack that joins `jaxadv.attacks.REGISTRY` is covered here without a new test: the
checks are functions of (name, norm), parametrized over the registry at collection time,
and `test_a_new_attack_joins_the_registry_the_cli_and_the_harness` runs them on an attack
registered inside the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attack_utils import linear_apply
from attack_utils import make_linear as _make_linear
from attack_utils import uniform_images as _uniform_images
from jaxadv import attacks
from jaxadv.attacks import REGISTRY, _core

EPS = {"linf": 0.05, "l2": 0.5}
K = 5
B = 8
HWC = (6, 6, 3)  # Square's L2 start needs at least 5x5 pixels


def make_linear(seed, num_classes, scale=1.0):
    return _make_linear(seed, num_classes, scale / 1.5, d=int(np.prod(HWC)))


def uniform_images(seed, batch, lo, hi):
    return _uniform_images(seed, batch, lo, hi, HWC)


def cases():
    return [(name, norm) for name, fn in sorted(REGISTRY.items()) for norm in fn.meta.norms]


def call(name, norm, params, x, y, *, apply_fn=linear_apply, key=None, eps=None, **kw):
    """The attack as a user calls it: `REGISTRY[name](apply_fn, params, x, y, key=k, eps=e)`."""
    fn = REGISTRY[name]
    hp = {**dict(fn.meta.smoke), "norm": norm, **kw}
    if not fn.meta.minimum_norm:
        hp["eps"] = EPS.get(norm, 0.1) if eps is None else eps
    return fn(apply_fn, params, x, y, key=jax.random.key(7) if key is None else key, **hp)


def setup(seed=0, lo=0.0, hi=1.0, dtype=jnp.float32):
    params = make_linear(seed, K, scale=3.0)
    x = uniform_images(seed + 1, B, lo, hi).astype(dtype)
    # The model's own predictions: every point starts correctly classified, so attacks that
    # leave misclassified points alone (APGD, FAB, Square, AutoAttack) attack all of them.
    y = jnp.argmax(linear_apply(params, x.astype(jnp.float32)), -1).astype(jnp.int32)
    return params, x, y


def size(delta, norm):
    d = np.asarray(delta, np.float64).reshape(delta.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


def check_shape_dtype_ball_box(name, norm):
    params, x, y = setup()
    x_adv = call(name, norm, params, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    a = np.asarray(x_adv)
    assert np.all(np.isfinite(a))
    assert a.min() >= 0.0 and a.max() <= 1.0
    if not REGISTRY[name].meta.minimum_norm:
        assert np.all(size(a - np.asarray(x), norm) <= EPS[norm] + 1e-5)
    assert np.any(a != np.asarray(x))  # premise: it attacked


def check_eps_zero_is_identity(name, norm):
    if REGISTRY[name].meta.minimum_norm:
        return
    params, x, y = setup(1)
    np.testing.assert_array_equal(np.asarray(call(name, norm, params, x, y, eps=0.0)), np.asarray(x))


def check_deterministic(name, norm):
    params, x, y = setup(2)
    a = call(name, norm, params, x, y, key=jax.random.key(3))
    b = call(name, norm, params, x, y, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def check_batch_split_independent(name, norm):
    """Per-example keys (from the dataset index, or from one key and the example) make the
    result independent of how a batch is split or ordered."""
    params, x, y = setup(3)
    per_example = jax.random.split(jax.random.key(4), B)
    for key in (per_example, jax.random.key(5)):
        whole = np.asarray(call(name, norm, params, x, y, key=key))
        h = B // 2
        split = [call(name, norm, params, x[s], y[s], key=key[s] if key.shape else key)
                 for s in (slice(0, h), slice(h, B))]  # fmt: skip
        np.testing.assert_allclose(np.concatenate([np.asarray(p) for p in split]), whole, atol=1e-5)
        perm = np.random.default_rng(0).permutation(B)
        shuffled = call(name, norm, params, x[perm], y[perm], key=key[perm] if key.shape else key)
        np.testing.assert_allclose(np.asarray(shuffled), whole[perm], atol=1e-5)


_TRACES: list = []


def counting_apply(params, x):
    _TRACES.append(x.shape)  # runs when traced, never per call of a compiled program
    return linear_apply(params, x)


def check_no_recompile(name, norm):
    params, x, y = setup(4)
    call(name, norm, params, x, y, apply_fn=counting_apply)
    before = len(_TRACES)
    assert before > 0
    out = call(name, norm, make_linear(9, K, scale=3.0), x, y, apply_fn=counting_apply,
               eps=None if REGISTRY[name].meta.minimum_norm else 0.5 * EPS[norm])  # fmt: skip
    assert len(_TRACES) == before, f"{name} recompiled for new params or eps"
    assert np.all(np.isfinite(np.asarray(out)))


def check_custom_box_and_dtype(name, norm):
    lo, hi = 0.2, 0.7
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2.0 ** -7)):
        params, x, y = setup(5, lo, hi, dtype)
        x_adv = call(name, norm, params, x, y, clip_min=lo, clip_max=hi)
        assert x_adv.dtype == dtype and x_adv.shape == x.shape
        a = np.asarray(x_adv, np.float32)
        assert a.min() >= lo - tol and a.max() <= hi + tol
        if not REGISTRY[name].meta.minimum_norm:
            assert np.all(size(a - np.asarray(x, np.float32), norm) <= EPS[norm] * (1 + tol) + 2 * tol)
    with pytest.raises(ValueError, match=r"values must lie in \[0.2, 0.7\]"):
        call(name, norm, params, x + 0.5, y, clip_min=lo, clip_max=hi)


def check_bad_inputs(name, norm):
    params, x, y = setup(6)
    bad = [
        (dict(y=jnp.asarray([0, 1, 2, 3, 4, 0, 1, 15], jnp.int32)), r"label 15, but the model has 5 classes"),
        (dict(y=y[:3]), "3 labels but x has batch size 8"),
        (dict(x=x.reshape(B, -1)), "rank-4 NHWC"),
        (dict(x=(np.asarray(x) * 255).astype(np.uint8)), "float image batch"),
        (dict(norm="l7"), "norm must be one of"),
    ]
    if not REGISTRY[name].meta.minimum_norm:
        bad.append((dict(eps=-0.1), "eps must be finite and >= 0"))
    for change, match in bad:
        kw = {"params": params, "x": x, "y": y, "norm": norm, **change}
        with pytest.raises(ValueError, match=match) as e:
            call(name, kw.pop("norm"), **kw)
        assert "\n" not in str(e.value)


def check_key_and_info(name, norm):
    fn = REGISTRY[name]
    params, x, y = setup(7)
    if fn.meta.randomized:
        with pytest.raises(ValueError, match="PRNG key"):
            fn(linear_apply, params, x, y, key=None, norm=norm, eps=EPS[norm], **dict(fn.meta.smoke))
    if fn.meta.minimum_norm:
        x_adv, info = fn(linear_apply, params, x, y, norm=norm, return_info=True)
        assert isinstance(info, attacks.MinNormInfo)
        np.testing.assert_allclose(np.asarray(info.norm), size(np.asarray(x_adv) - np.asarray(x), norm),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        pred0 = np.asarray(linear_apply(params, x)).argmax(-1)
        pred1 = np.asarray(linear_apply(params, x_adv)).argmax(-1)
        np.testing.assert_array_equal(np.asarray(info.success), pred1 != pred0)


CHECKS = (check_shape_dtype_ball_box, check_eps_zero_is_identity, check_deterministic, check_batch_split_independent,
          check_no_recompile, check_custom_box_and_dtype, check_bad_inputs, check_key_and_info)  # fmt: skip


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
@pytest.mark.parametrize("name, norm", cases())
def test_contract(name, norm, check):
    check(name, norm)


def test_every_hyperparameter_but_eps_has_a_default():
    import inspect

    for name, fn in REGISTRY.items():
        sig = inspect.signature(fn)
        required = [k for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        assert required == ([] if fn.meta.minimum_norm else ["eps"]), f"{name}: {required}"
        assert list(sig.parameters)[:4] == ["apply_fn", "params", "x", "y"]
        assert sig.parameters["key"].default is None


# ---------------------------------------------------------------------------------------
# The one-file test: an attack defined and registered here joins everything
# ---------------------------------------------------------------------------------------


@_core.attack(name="random_sign", norms=("linf",), randomized=True, paper="a test")
def random_sign(apply_fn, params, x, y, *, key=None, eps, norm="linf", clip_min=0.0, clip_max=1.0):
    """A toy attack: a random corner of the L-inf ball."""
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, eps=eps, norm=norm,
                       norms=("linf",))  # fmt: skip
    _core.require_key(key, "random_sign")
    keys = _core.example_keys(key, x)
    signs = jax.vmap(lambda k: jax.random.rademacher(k, x.shape[1:], jnp.float32))(keys)
    x_adv = jnp.clip(x.astype(jnp.float32) + jnp.asarray(eps, jnp.float32) * signs, clip_min, clip_max)
    return x_adv.astype(x.dtype)


def test_a_new_attack_joins_the_registry_the_cli_and_the_harness(monkeypatch):
    monkeypatch.setitem(REGISTRY, "random_sign", random_sign)
    assert ("random_sign", "linf") in cases()
    for check in CHECKS:
        if check is not check_no_recompile:  # an unjitted toy retraces by design
            check("random_sign", "linf")
    from jaxadv import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    attack_flag = next(a for a in sub.choices["attack"]._actions if a.dest == "attack")
    assert "random_sign" in attack_flag.choices
    from benchmarks import run

    assert "random_sign" in run.jax_ops()
    assert run.attack_settings("random_sign") == {"eps": run.EPS}
