"""Training-time defenses as batch transforms `(variables, x, y, key) -> (x', y')`.

They plug into `jaxadv.train.train_step` (applied to every float batch in [0, 1] inside
the jitted step), so a defense never needs its own copy of the training loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxadv import squeeze
from jaxadv.attacks.fgsm import fgsm
from jaxadv.attacks.pgd import pgd
from jaxadv.configs import TrainConfig
from jaxadv.train import identity_transform
from jaxadv.types import ApplyFn, Array, BatchTransform


def median_transform(variables, x: Array, y: Array, key, *, size: int = 3):
    """Train on median-filtered images (the study's feature-squeezing model)."""
    del variables, key
    return squeeze.median_filter(x, size), y


def fgsm_adversarial_transform(variables, x: Array, y: Array, key, *, apply_fn: ApplyFn, eps: float, adv_weight: float):
    """FGSM adversarial training (Goodfellow, Shlens & Szegedy 2015, arXiv:1412.6572).

    Replaces a fraction `adv_weight` of the batch by FGSM(eps) examples made against the
    current params (true labels, eval-mode model), so the batch loss is, in expectation over
    the shuffled batch, `(1 - adv_weight) * J(x) + adv_weight * J(x_adv)`: Goodfellow's
    objective with alpha = 1 - adv_weight (0.5 by default). Only the attacked slice pays
    for the attack's extra forward and backward pass. The adversarial examples are
    constants for the parameter update (`stop_gradient`).
    """
    del key  # FGSM is deterministic
    k = int(round(adv_weight * x.shape[0]))
    if k == 0:
        return x, y
    x_adv = jax.lax.stop_gradient(fgsm(apply_fn, variables, x[:k], y[:k], eps=eps))
    return jnp.concatenate([x_adv, x[k:]], axis=0), y


def pgd_adversarial_transform(variables, x: Array, y: Array, key, *, apply_fn: ApplyFn, eps: float, steps: int,
                              step_size: float):  # fmt: skip
    """Train on PGD examples from a random start (Madry et al. 2018, arXiv:1706.06083).

    With `steps=1` and `step_size=1.25 * eps` this is fast adversarial training (FGSM from
    a uniform random start; Wong, Rice & Kolter 2020, arXiv:2001.03994).
    """
    x_adv = pgd(apply_fn, variables, x, y, eps=eps, step_size=step_size, steps=steps, random_start=True, key=key,
                jit=False)  # fmt: skip
    return jax.lax.stop_gradient(x_adv), y


def batch_transform(cfg: TrainConfig, apply_fn: ApplyFn | None = None) -> BatchTransform:
    """The batch transform named by `cfg.defense`.

    Args:
      cfg: training config (`defense`, `defense_eps`, `adv_weight`, `median_size`).
      apply_fn: the model's eval-mode `apply(variables, x)`; needed for "fgsm_at"
        (default: built from `cfg`).
    """
    if cfg.defense == "none":
        return identity_transform
    if cfg.defense == "median":
        return functools.partial(median_transform, size=cfg.median_size)
    if cfg.defense not in ("fgsm_at", "pgd_at", "fast_at"):
        raise ValueError(f"unknown defense {cfg.defense!r}; expected none, median, fgsm_at, pgd_at or fast_at")
    if apply_fn is None:
        from jaxadv.models import make_apply
        from jaxadv.train import create_model

        apply_fn = make_apply(create_model(cfg))
    eps = cfg.defense_eps
    if cfg.defense == "fgsm_at":
        return functools.partial(fgsm_adversarial_transform, apply_fn=apply_fn, eps=eps, adv_weight=cfg.adv_weight)
    if cfg.defense == "pgd_at":
        return functools.partial(pgd_adversarial_transform, apply_fn=apply_fn, eps=eps, steps=cfg.pgd_steps,
                                 step_size=2.5 * eps / cfg.pgd_steps)  # fmt: skip
    return functools.partial(pgd_adversarial_transform, apply_fn=apply_fn, eps=eps, steps=1,
                             step_size=cfg.fast_alpha * eps)  # fmt: skip


def robust_monitor(cfg: TrainConfig, apply_fn: ApplyFn, images, labels, *, n: int = 512, steps: int = 10):
    """`variables -> PGD accuracy (%)` on `n` class-balanced validation images, or None.

    Returned only for adversarial training with `cfg.co_guard > 0`: PGD-`steps` at
    `cfg.defense_eps`, step eps/4, one fixed random start (the same every epoch, so epochs
    are compared on the same attack).
    """
    if cfg.co_guard <= 0 or cfg.defense not in ("fgsm_at", "pgd_at", "fast_at") or not len(labels):
        return None
    import numpy as np

    from jaxadv.data import balanced_indices

    # A seeded class-balanced subset: the splits are stored class by class, so a prefix
    # would watch one or two classes only.
    idx = balanced_indices(np.asarray(labels), min(n, len(labels)), np.random.default_rng(0))
    x = jnp.asarray(np.asarray(images)[idx], jnp.float32) / 255.0
    y = jnp.asarray(np.asarray(labels)[idx])
    eps = cfg.defense_eps

    @jax.jit
    def accuracy(variables, x, y):  # the data as arguments, not closed-over constants
        x_adv = pgd(apply_fn, variables, x, y, eps=eps, step_size=eps / 4, steps=steps, key=jax.random.key(0),
                    jit=False)  # fmt: skip
        return 100.0 * jnp.mean(jnp.argmax(apply_fn(variables, x_adv), -1) == y)

    return lambda variables: float(accuracy(variables, x, y))


def eval_squeezer(cfg: TrainConfig):
    """The test-time input transform that belongs to `cfg.defense` (None if there is none).

    A model trained on median-filtered images is used as `apply(params, median(x))`.
    """
    if cfg.defense == "median":
        return squeeze.median_squeezer(cfg.median_size)
    return None


def defended_apply(cfg: TrainConfig, apply_fn: ApplyFn) -> ApplyFn:
    """The classifier as the defense deploys it: `apply_fn`, composed with its squeezer if any."""
    sq = eval_squeezer(cfg)
    return apply_fn if sq is None else squeeze.squeezed(apply_fn, sq)
