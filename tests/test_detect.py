"""Feature-squeezing detector (Xu et al.) and the non-local means squeezer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxadv import detect, squeeze
from jaxadv.models import init_params, make_apply, tiny_cnn


def test_nlm_with_tiny_h_is_the_identity(getkey):
    x = jax.random.uniform(getkey(), (2, 9, 10, 3))
    np.testing.assert_allclose(squeeze.non_local_means(x, 5, 3, 1e-3), x, atol=1e-6)


def test_nlm_with_huge_h_is_the_window_mean_with_symmetric_border(getkey):
    x = jax.random.uniform(getkey(), (2, 9, 10, 3))
    ref = scipy.ndimage.uniform_filter(np.asarray(x, np.float64), size=(1, 5, 5, 1), mode="reflect")
    np.testing.assert_allclose(squeeze.non_local_means(x, 5, 3, 1e9), ref, atol=1e-5)


def test_nlm_removes_noise_but_keeps_edges():
    clean = np.full((1, 16, 16, 3), 0.3, np.float32)
    clean[:, :, 8:] = 0.7  # a vertical edge, away from the clip bounds
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.02, clean.shape), 0, 1).astype(np.float32)
    out = np.asarray(squeeze.non_local_means(jnp.asarray(noisy), 13, 3, 10.0))
    assert np.abs(out - clean).mean() < 0.5 * np.abs(noisy - clean).mean()
    assert out[0, :, :8].max() < 0.4 and out[0, :, 8:].min() > 0.6


def test_score_is_max_l1_distance_between_softmaxes(getkey):
    model = tiny_cnn(num_classes=4)
    apply_fn = make_apply(model)
    params = init_params(model, getkey())
    x = jax.random.uniform(getkey(), (3, 32, 32, 3))
    sq = (squeeze.bit_depth_squeezer(1), squeeze.median_squeezer(3))
    p = jax.nn.softmax(apply_fn(params, x))
    ref = np.max([np.abs(p - jax.nn.softmax(apply_fn(params, s(x)))).sum(-1) for s in sq], axis=0)
    np.testing.assert_allclose(detect.score(apply_fn, params, x, sq), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(detect.scores(apply_fn, params, np.asarray(x), sq, batch_size=2), ref, rtol=1e-5,
                               atol=1e-7)  # fmt: skip


def test_threshold_gives_the_target_fpr_on_held_out_clean_scores():
    rng = np.random.default_rng(0)
    clean = rng.gamma(2.0, 0.1, 20000)  # a skewed score distribution
    t = detect.threshold_at_fpr(clean[:10000], 0.05)
    assert np.mean(clean[10000:] > t) == pytest.approx(0.05, abs=0.008)
    with pytest.raises(ValueError, match="fpr"):
        detect.threshold_at_fpr(clean, 1.5)


def test_roc_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(1)
    clean = np.round(rng.normal(0, 1, 300), 1)  # rounding makes ties
    adv = np.round(rng.normal(0.7, 1, 200), 1)
    pairs = (adv[:, None] > clean[None, :]).mean() + 0.5 * (adv[:, None] == clean[None, :]).mean()
    assert detect.roc_auc(clean, adv) == pytest.approx(pairs, abs=1e-12)
    assert detect.roc_auc(clean, clean + 10) == 1.0


def test_evaluate_counts_only_successful_adversarial_examples():
    val = np.linspace(0, 1, 101)  # threshold at the 95th percentile = 0.95
    rep = detect.evaluate(val, np.array([0.1, 0.2, 0.99]), np.array([0.99, 0.98, 0.1, 0.5]),
                          np.array([False, True, False, True]), fpr=0.05)  # fmt: skip
    assert rep.threshold == pytest.approx(0.95)
    assert rep.fpr_test == pytest.approx(1 / 3)
    assert rep.n_successful == 2 and rep.detection_rate == pytest.approx(0.5)  # of [0.99, 0.1]
    assert rep.detected_or_correct == pytest.approx(3 / 4)  # flagged, correct+flagged, missed, correct


def test_cifar10_squeezers_are_xu_et_al_joint_detector():
    bits, median, nlm = detect.cifar10_squeezers()
    x = jnp.linspace(0, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    np.testing.assert_array_equal(bits(x), squeeze.bit_depth(x, 5))
    np.testing.assert_array_equal(median(x), squeeze.median_filter(x, 2))
    np.testing.assert_array_equal(nlm(x), squeeze.non_local_means(x, 13, 3, 2.0))
