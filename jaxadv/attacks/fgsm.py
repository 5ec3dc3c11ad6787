"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015, arXiv:1412.6572).

With `norm="l2"` it is the fast gradient method with an L2-normalized step (as in
CleverHans' `fast_gradient_method(norm=2)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxadv.attacks import _core
from jaxadv.attacks._core import summed_cross_entropy  # noqa: F401  (public name since 0.1)
from jaxadv.types import ApplyFn, Array, Params, PRNGKey


def _fgsm(apply_fn, params, x, y, eps, clip_min, clip_max, *, norm, targeted):
    def loss_fn(z):
        return summed_cross_entropy(apply_fn(params, z), y)

    grad = jax.grad(loss_fn)(x.astype(jnp.float32))
    if norm == "linf":
        direction = jnp.sign(grad)
    else:
        direction = grad / _core.bcast(jnp.maximum(_core.per_example_norm(grad, "l2"), 1e-12))
    # Untargeted: climb the loss of the true label. Targeted: descend the loss of the target.
    if targeted:
        direction = -direction
    x_adv = x.astype(jnp.float32) + jnp.asarray(eps, jnp.float32) * direction
    x_adv = jnp.clip(x_adv, jnp.asarray(clip_min, jnp.float32), jnp.asarray(clip_max, jnp.float32))
    return x_adv.astype(x.dtype)


_fgsm_kernel = _core.kernel(_fgsm, static=("norm", "targeted"))


@_core.attack(name="fgsm", norms=("linf", "l2"), paper="Goodfellow et al. 2015, arXiv:1412.6572")
def fgsm(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    eps: float | Array,
    norm: str = "linf",
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
) -> Array:
    """One gradient step of size eps on the cross-entropy loss.

    L-inf: `x_adv = clip(x + eps * sign(grad_x CE(apply_fn(params, x), y)))`; L2: the step
    is `eps * grad / ||grad||_2` per example. With `targeted`, the step descends the loss of
    target class `y` instead. The gradient is that of the cross-entropy *summed* over the
    batch (one backward pass; see `summed_cross_entropy`). Where the L-inf gradient is
    exactly 0, sign is 0 and the pixel is left unchanged.

    Compiled once per (apply_fn, norm, targeted, shapes): `eps`, the box and `params` are
    traced, so an eps sweep or new params do not recompile. Inside a caller's jit (e.g. an
    adversarial-training step) it inlines.

    Args:
      apply_fn: stable, hashable `apply_fn(params, x) -> f32[B,K]` logits.
      params: model parameters pytree.
      x: f[B,H,W,C] clean images in [clip_min, clip_max].
      y: int[B] true labels (untargeted) or target labels (targeted), in [0, K).
      key: ignored (FGSM is deterministic); accepted so all attacks share a call site.
      eps: budget >= 0 in the attack's norm, pixel units.
      norm: "linf" (FGSM) or "l2" (fast gradient method, L2).
      targeted: move towards class `y` instead of away from it.
      clip_min: lower pixel bound of the valid image box.
      clip_max: upper pixel bound of the valid image box.

    Returns:
      x_adv with the shape and dtype of `x`, `||x_adv - x|| <= eps`, inside the box.

    Raises:
      ValueError: one line, on malformed inputs (rank, dtype, range, a label outside
        [0, K), eps < 0, an unknown norm).
    """
    del key  # deterministic attack
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, eps=eps, norm=norm,
                       norms=fgsm.meta.norms)  # fmt: skip
    return _fgsm_kernel(apply_fn, params, x, y, eps, clip_min, clip_max, norm=norm, targeted=targeted)
