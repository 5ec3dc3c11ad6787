"""The evaluation layer: padded, masked, sharded batches; attacks under it; resumable stores."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import evaluation
from jaxadv.models import init_params, make_apply, tiny_cnn


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
    out = evaluation.evaluate(make_apply(model), params, x, y, batch_size=10)
    assert out["n"] == 23
    assert math.isclose(out["accuracy_pct"], expected_acc, abs_tol=1e-4)
    assert math.isclose(out["loss"], expected_loss, rel_tol=1e-4)


def _linear_setup():
    from attack_utils import linear_apply, make_linear

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8)
    params = make_linear(3, 4, scale=3.0)
    y = np.array(np.argmax(linear_apply(params, jnp.asarray(x, jnp.float32) / 255), -1), np.int32)
    y[::5] = (y[::5] + 1) % 4  # some wrong labels: accuracy strictly between 0 and 100
    return linear_apply, params, x, y


def test_to_float_is_one_conversion_for_numpy_and_jax():
    x = np.array([[0, 128, 255]], np.uint8)
    for a in (x, jnp.asarray(x)):
        out = evaluation.to_float(a)
        assert out.dtype == np.float32 and type(out) is type(evaluation.to_float(a))
        np.testing.assert_array_equal(np.asarray(out), x.astype(np.float32) / np.float32(255))
    f = np.array([0.5], np.float64)
    assert evaluation.to_float(f).dtype == np.float32


def test_attack_keys_come_from_the_dataset_index_not_the_batch():
    from jaxadv.attacks import Spec

    apply_fn, params, x, y = _linear_setup()
    spec = Spec("pgd", eps=0.1, steps=3)
    a, _ = evaluation.attack_eval(apply_fn, params, x, y, attack=spec, batch_size=8, keep_adv=True)
    b, xb = evaluation.attack_eval(apply_fn, params, x, y, attack=spec, batch_size=37, keep_adv=True)
    _, xa = evaluation.attack_eval(apply_fn, params, x, y, attack=spec, batch_size=8, keep_adv=True)
    np.testing.assert_allclose(xa, xb, atol=1e-6)
    perm = np.random.default_rng(1).permutation(len(y))
    _, xp = evaluation.attack_eval(apply_fn, params, x[perm], y[perm], attack=spec, index=perm, batch_size=16,
                                   keep_adv=True)  # fmt: skip
    np.testing.assert_allclose(xp, xb[perm], atol=1e-6)
    assert a["accuracy_pct"] == pytest.approx(b["accuracy_pct"]) and 0 < a["accuracy_pct"] < 100
    _, xk = evaluation.attack_eval(apply_fn, params, x, y, attack=spec, key=jax.random.key(9), batch_size=37,
                                   keep_adv=True)  # fmt: skip
    assert np.abs(xk - xb).max() > 0.01  # another root key, other random starts


def test_min_norm_attacks_report_per_example_statistics():
    from jaxadv.attacks import deepfool

    apply_fn, params, x, y = _linear_setup()
    s, x_adv = evaluation.attack_eval(apply_fn, params, x, y, attack="deepfool", batch_size=10, keep_adv=True)
    xf = x.astype(np.float32) / 255
    x_ref, info = deepfool(apply_fn, params, jnp.asarray(xf), jnp.asarray(y), return_info=True)
    np.testing.assert_allclose(x_adv, np.asarray(x_ref), atol=1e-5)
    per = s["per_example"]
    np.testing.assert_array_equal(per["success"], np.asarray(info.success))
    np.testing.assert_allclose(per["norm"], np.asarray(info.norm), rtol=1e-5)
    clean_ok = np.asarray(apply_fn(params, jnp.asarray(xf))).argmax(-1) == y
    assert s["n_correct"] == clean_ok.sum()
    assert s["accuracy_label_aware_pct"] == pytest.approx(100 * np.mean(clean_ok & ~np.asarray(info.success)))
    assert s["norm_median"] == pytest.approx(np.median(np.asarray(info.norm)[np.asarray(info.success)]), rel=1e-6)


def test_transfer_inputs_are_evaluated_as_given():
    apply_fn, params, x, y = _linear_setup()
    inputs = np.clip(x.astype(np.float32) / 255 + 0.05, 0, 1)
    s, kept = evaluation.attack_eval(apply_fn, params, x, y, inputs=inputs, batch_size=16, keep_adv=True)
    np.testing.assert_array_equal(kept, inputs)
    want = np.mean(np.asarray(apply_fn(params, jnp.asarray(inputs))).argmax(-1) == y) * 100
    assert s["accuracy_pct"] == pytest.approx(want)


def test_an_interrupted_evaluation_resumes_from_its_last_stored_batch(tmp_path):
    from jaxadv.attacks import fgsm

    apply_fn, params, x, y = _linear_setup()
    calls = []

    class Interrupt(Exception):
        pass

    fail_at = [3]

    def flaky(apply_fn, params, xb, yb, *, key=None):
        calls.append(len(calls))
        if fail_at and len(calls) == fail_at[0]:
            raise Interrupt
        return fgsm(apply_fn, params, xb, yb, eps=0.05)

    store = lambda: evaluation.BatchStore(tmp_path / "run", {"attack": "fgsm", "eps": 0.05})  # noqa: E731
    with pytest.raises(Interrupt):
        evaluation.attack_eval(apply_fn, params, x, y, attack=flaky, batch_size=8, store=store())
    assert len(list((tmp_path / "run").glob("batch_*.npz"))) == 2
    calls.clear()
    fail_at.clear()
    resumed, _ = evaluation.attack_eval(apply_fn, params, x, y, attack=flaky, batch_size=8, store=store())
    assert len(calls) == 3  # batches 3, 4 and 5 of 5
    whole, _ = evaluation.attack_eval(apply_fn, params, x, y, attack=lambda *a, key=None: fgsm(*a, eps=0.05),
                                      batch_size=8)  # fmt: skip
    assert resumed["accuracy_pct"] == pytest.approx(whole["accuracy_pct"])
    np.testing.assert_array_equal(resumed["per_example"]["correct"], whole["per_example"]["correct"])
    # Another fingerprint clears the store.
    evaluation.BatchStore(tmp_path / "run", {"attack": "fgsm", "eps": 0.1})
    assert not list((tmp_path / "run").glob("batch_*.npz"))
