"""Training-time defenses as batch transforms `(variables, x, y, key) -> (x', y')`.

They plug into `jaxadv.train.train_step` (applied to every float batch in [0, 1] inside
the jitted step), so a defense never needs its own copy of the training loop. The
attacks they call are jaxadv's compiled kernels, which inline into the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import squeeze
from jaxadv.attacks import fgsm, pgd
from jaxadv.types import ApplyFn, Array


def identity_transform(variables, x: Array, y: Array, key):
    """No defense: the batch as it is."""
    del variables, key
    return x, y


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
    a uniform random start; Wong, Rice & Kolter 2020, arXiv:2001.03994). Each example's
    random start comes from the step's key folded with its position in the batch.
    """
    keys = jax.random.split(key, x.shape[0])
    x_adv = pgd(apply_fn, variables, x, y, eps=eps, step_size=step_size, steps=steps, random_start=True, key=keys)
    return jax.lax.stop_gradient(x_adv), y


def nfgsm_adversarial_transform(variables, x: Array, y: Array, key, *, apply_fn: ApplyFn, eps: float,
                                noise: float = 2.0):  # fmt: skip
    """N-FGSM (de Jorge et al. 2022, arXiv:2202.01181): one FGSM step of size eps from
    x + U(-noise * eps, noise * eps), not projected back to the eps ball (the perturbation
    may reach (1 + noise) * eps); only the [0, 1] box is kept. Stronger noise instead of a
    projection avoids catastrophic overfitting at no extra cost over fast adversarial training.
    """
    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -noise * eps, noise * eps), 0.0, 1.0)
    return jax.lax.stop_gradient(fgsm(apply_fn, variables, start, y, eps=eps)), y


def robust_monitor(apply_fn: ApplyFn, images, labels, *, eps: float, n: int = 512, steps: int = 10):
    """`variables -> PGD accuracy (%)` on the first `n` validation images.

    PGD-`steps` at `eps`, step eps/4, one fixed random start (the same every epoch, so
    epochs are compared on the same attack). The splits are in a seeded class-balanced
    order, so the first n images are a balanced sample.
    """
    n = min(n, len(labels))
    x = jnp.asarray(np.asarray(images[:n]), jnp.float32) / 255.0
    y = jnp.asarray(np.asarray(labels[:n]))
    keys = jax.random.split(jax.random.key(0), n)

    @jax.jit
    def accuracy(variables, x, y, keys):  # the data as arguments, not closed-over constants
        x_adv = pgd(apply_fn, variables, x, y, eps=eps, step_size=eps / 4, steps=steps, key=keys)
        return 100.0 * jnp.mean(jnp.argmax(apply_fn(variables, x_adv), -1) == y)

    return lambda variables: float(accuracy(variables, x, y, keys))
