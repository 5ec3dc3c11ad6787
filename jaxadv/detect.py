"""The feature-squeezing detector of Xu, Evans & Qi (NDSS 2018, arXiv:1704.01155).

An input is flagged as adversarial when squeezing changes the model's prediction too
much: score(x) = max over squeezers s of || softmax(f(x)) - softmax(f(s(x))) ||_1, and
the threshold is the (1 - FPR) quantile of the scores of legitimate validation images
(FPR = 5 % in the paper). For CIFAR-10 their joint detector squeezes with 5-bit depth,
a 2x2 median filter and non-local means 13-3-2.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import squeeze
from jaxadv.types import ApplyFn, Array, Params, Squeezer


def cifar10_squeezers() -> tuple[Squeezer, ...]:
    """Xu et al.'s CIFAR-10 joint detector: 5-bit depth, 2x2 median, non-local means 13-3-2."""
    return (squeeze.bit_depth_squeezer(5), squeeze.median_squeezer(2), squeeze.non_local_means_squeezer(13, 3, 2.0))


def score(apply_fn: ApplyFn, params: Params, x: Array, squeezers: Sequence[Squeezer]) -> Array:
    """f32[B] detector scores: the max over squeezers of the L1 distance of the softmaxes.

    Pure and differentiable (through the squeezers' own gradients, or wrap them in
    `squeeze.bpda` for an adaptive attack on the detector).
    """
    p = jax.nn.softmax(apply_fn(params, x).astype(jnp.float32), axis=-1)
    dists = [jnp.sum(jnp.abs(p - jax.nn.softmax(apply_fn(params, s(x)).astype(jnp.float32), axis=-1)), axis=-1)
             for s in squeezers]  # fmt: skip
    return jnp.max(jnp.stack(dists), axis=0)


_score_jit = jax.jit(score, static_argnums=(0, 3))


@functools.cache
def adaptive_objective(apply_fn: ApplyFn, squeezers: tuple[Squeezer, ...], lam: float = 10.0, kappa: float = 1.0):
    """The objective of an adaptive attack on classifier + detector, for `attacks.pgd(objective=...)`.

    Maximizes `-max(margin, -kappa) - lam * score(x)` per example, where margin =
    logit_y - max_{j != y} logit_j (Carlini & Wagner's loss: once the example is
    misclassified by kappa the first term is flat, so the steps then go to lowering the
    detector score) and the score goes through BPDA versions of the squeezers (forward
    pass unchanged, identity backward), since bit-depth rounding has no useful gradient.
    Cached: the same arguments give the same function, so pgd compiles once.
    """
    through = tuple(squeeze.bpda(s) for s in squeezers)

    def objective(params, x, y):
        logits = apply_fn(params, x).astype(jnp.float32)
        true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=-1)
        margin = true - other
        return -jnp.maximum(margin, -kappa) - lam * score(apply_fn, params, x, through)

    objective.__name__ = f"detector_adaptive_objective_lam{lam:g}"
    return objective


def scores(apply_fn, params, images: np.ndarray, squeezers: Sequence[Squeezer], *, batch_size: int = 500):
    """Scores f32[N] of a dataset (u8 or f32 images), in padded batches sharded over all devices."""
    from jaxadv import distributed, evaluation
    from jaxadv.evaluation import batches

    squeezers = tuple(squeezers)
    out = []
    params = evaluation.local_params(params)
    for _, b in batches(images, np.zeros(len(images), np.int32), batch_size=batch_size):
        score = np.asarray(_score_jit(apply_fn, params, b.x, squeezers))
        out.append(distributed.gather({"s": score})["s"][: b.stop - b.start])
    return np.concatenate(out)


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float = 0.05) -> float:
    """The (1 - fpr) quantile of legitimate scores: about `fpr` of clean inputs score above it."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(np.asarray(clean_scores, np.float64), 1.0 - fpr))


def roc_auc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float:
    """Area under the ROC curve of score-as-detector = P(adv score > clean score) (ties count 1/2).

    Computed from ranks (the Mann-Whitney U statistic), O(n log n).
    """
    clean = np.asarray(clean_scores, np.float64)
    adv = np.asarray(adv_scores, np.float64)
    if not len(clean) or not len(adv):
        return float("nan")
    allv = np.concatenate([clean, adv])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    uniq, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    r_adv = ranks[len(clean):].sum()
    u = r_adv - len(adv) * (len(adv) + 1) / 2.0
    return float(u / (len(clean) * len(adv)))


class DetectorReport(NamedTuple):
    threshold: float
    fpr_val: float  # fraction of the validation images flagged (by construction ~fpr)
    fpr_test: float  # fraction of clean test images flagged
    detection_rate: float  # fraction of successful adversarial examples flagged
    roc_auc: float  # clean test vs successful adversarial examples
    detected_or_correct: float  # fraction of all attacked inputs either flagged or correctly classified
    n_successful: int


def evaluate(
    val_scores: np.ndarray,
    clean_scores: np.ndarray,
    adv_scores: np.ndarray,
    adv_correct: np.ndarray,
    *,
    fpr: float = 0.05,
) -> DetectorReport:
    """Detector metrics for one attack, following Xu et al.

    Args:
      val_scores: scores of legitimate validation images (sets the threshold).
      clean_scores: scores of the clean test images.
      adv_scores: scores of the attacked test images.
      adv_correct: bool, whether the model still classifies each attacked image correctly.
        Only the successful adversarial examples (not correct) count for detection rate
        and ROC-AUC, as in the paper.
      fpr: target false-positive rate on legitimate inputs.
    """
    t = threshold_at_fpr(val_scores, fpr)
    adv_correct = np.asarray(adv_correct, bool)
    flagged = np.asarray(adv_scores) > t
    succ = ~adv_correct
    return DetectorReport(
        threshold=t,
        fpr_val=float(np.mean(np.asarray(val_scores) > t)),
        fpr_test=float(np.mean(np.asarray(clean_scores) > t)),
        detection_rate=float(flagged[succ].mean()) if succ.any() else float("nan"),
        roc_auc=roc_auc(clean_scores, np.asarray(adv_scores)[succ]),
        detected_or_correct=float(np.mean(flagged | adv_correct)),
        n_successful=int(succ.sum()),
    )

