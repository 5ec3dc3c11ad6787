"""Accuracy under attack over a whole dataset: fixed-size padded batches, masked sums."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxadv.attacks.deepfool import DeepFoolResult
from jaxadv.train import _eval_step_jit, pad_batches, pad_to, summarize

# attack(x: f32[B,H,W,C] in [0,1], y: i32[B]) -> x_adv or DeepFoolResult
AttackFn = Callable[[jax.Array, jax.Array], "jax.Array | DeepFoolResult"]


def attack_eval(
    apply_fn,
    params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    attack: AttackFn | None = None,
    inputs: np.ndarray | None = None,
    batch_size: int = 500,
    keep_adv: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict, np.ndarray | None]:
    """Accuracy and loss of `apply_fn(params, .)` on attacked (or given) inputs.

    Every batch has the same shape (the last one is padded and masked), so each attack and
    the evaluation compile once.

    Args:
      apply_fn, params: the classifier that is evaluated.
      images: u8[N,H,W,C] (or f32 in [0, 1]) clean images.
      labels: i32[N] true labels.
      attack: `(x, y) -> x_adv` or `-> DeepFoolResult`, run per batch on the float images
        (None: evaluate `inputs`, or the clean images).
      inputs: precomputed f32[N,H,W,C] inputs to evaluate instead of attacking, e.g.
        adversarial examples crafted on another model (the transfer protocol).
      batch_size: examples per batch.
      keep_adv: return the attacked inputs (f32[N,H,W,C]) as well.
      progress: show a tqdm bar.

    Returns:
      (summary, x_adv or None). summary has "accuracy_pct", "loss", "n"; for DeepFool also
      "success_rate_pct" (prediction changed), "success_rate_correct_pct" (over examples
      the model classified correctly), "l2_mean", "l2_median" (or the attack's norm),
      "iterations_mean", "iterations_max", "accuracy_label_aware_pct" (accuracy had
      misclassified inputs been left unattacked), and "norms" (of successful attacks).
    """
    from tqdm.auto import tqdm

    n = len(labels)
    batch_size = min(batch_size, n)
    sums, kept, extras = [], [], []
    batches = list(pad_batches(n, batch_size))
    for start, stop, pad in tqdm(batches, desc=desc, disable=not progress, leave=False):
        src = inputs if inputs is not None else images
        x = pad_to(np.asarray(src[start:stop]), pad)
        y = pad_to(labels[start:stop], pad)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        mask = np.arange(batch_size) < (stop - start)
        if attack is not None:
            out = attack(x, y)
            if isinstance(out, DeepFoolResult):
                extras.append((out.iterations, out.success, out.norm, mask))
                out = out.x_adv
            x = out
        sums.append(_eval_step_jit(apply_fn, params, x, y, mask))
        if keep_adv:
            kept.append(np.asarray(x)[: stop - start])
    summary = summarize(sums)
    if extras:
        summary.update(_deepfool_stats(extras, labels, images, apply_fn, params, batch_size))
    return summary, (np.concatenate(kept) if keep_adv else None)


def _deepfool_stats(extras, labels, images, apply_fn, params, batch_size) -> dict:
    iters, success, norms = (
        np.concatenate([np.asarray(e[i])[np.asarray(e[3])] for e in extras]) for i in range(3)
    )
    clean_pred = predict(apply_fn, params, images, batch_size=batch_size)
    correct = clean_pred == labels
    return {
        # DeepFool's reference class is the prediction, so it also moves misclassified
        # inputs (often onto the true class). Label-aware peers (torchattacks) leave those
        # unchanged; their accuracy is the fraction correct at x0 and not fooled:
        "accuracy_label_aware_pct": 100.0 * float(np.mean(correct & ~success)),
        "success_rate_pct": 100.0 * float(success.mean()),
        "success_rate_correct_pct": 100.0 * float(success[correct].mean()) if correct.any() else float("nan"),
        "n_correct": int(correct.sum()),
        "norm_mean": float(norms[success].mean()) if success.any() else float("nan"),
        "norm_median": float(np.median(norms[success])) if success.any() else float("nan"),
        "iterations_mean": float(iters.mean()),
        "iterations_max": int(iters.max()),
        "norms": norms[success].tolist(),  # of the successful attacks, like the mean/median
        # For accuracy against an L2 radius r: correct inputs whose minimal perturbation
        # (as DeepFool measures it) exceeds r, plus the correct ones it never fooled.
        "norms_correct": norms[success & correct].tolist(),
        "n_correct_unfooled": int((correct & ~success).sum()),
    }


def predict(apply_fn, params, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """Predicted class ids i32[N] for u8 or f32 images."""
    fn = _predict_jit
    out = []
    n = len(images)
    batch_size = min(batch_size, n)
    for start, stop, pad in pad_batches(n, batch_size):
        x = pad_to(np.asarray(images[start:stop]), pad)
        out.append(np.asarray(fn(apply_fn, params, x))[: stop - start])
    return np.concatenate(out)


def _predict(apply_fn, params, x):
    from jaxadv.train import to_float

    return apply_fn(params, to_float(x)).argmax(-1)


_predict_jit = jax.jit(_predict, static_argnums=0)
