"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015, arXiv:1412.6572)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxadv import validate
from jaxadv.types import ApplyFn, Array, Params, PRNGKey


def summed_cross_entropy(logits: Array, y: Array) -> Array:
    """Softmax cross-entropy summed (not averaged) over the batch.

    Summing makes `jax.grad` w.r.t. the input batch equal to the per-example input
    gradients in one backward pass (no cross-batch coupling in eval mode); a mean would
    shrink every example's gradient by 1/B. The class count comes from `logits.shape[-1]`.

    Args:
      logits: f[B,K] logits (cast to float32).
      y: int[B] class indices in [0, K).

    Returns:
      f32[] scalar loss.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=-1).sum()


def _fgsm(apply_fn, params, x, y, eps, clip_min, clip_max, targeted):
    """The traced body shared by `fgsm` and `fgsm_jit` (no input checks)."""

    def loss_fn(z):
        return summed_cross_entropy(apply_fn(params, z), y)

    grad = jax.grad(loss_fn)(x)
    # Untargeted: climb the loss of the true label. Targeted: descend the loss of the target.
    direction = -jnp.sign(grad) if targeted else jnp.sign(grad)
    x_adv = x.astype(jnp.float32) + jnp.asarray(eps, jnp.float32) * direction.astype(jnp.float32)
    x_adv = jnp.clip(x_adv, jnp.asarray(clip_min, jnp.float32), jnp.asarray(clip_max, jnp.float32))
    return x_adv.astype(x.dtype)


_fgsm_jit = functools.partial(jax.jit, static_argnames=("apply_fn", "targeted"))(_fgsm)


def _check(x, y, eps, clip_min, clip_max):
    validate.check_images(x, value_range=(clip_min, clip_max))
    validate.check_labels(y, x)
    validate.check_eps(eps)


def fgsm(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    eps: float | Array,
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    key: PRNGKey | None = None,
) -> Array:
    """L-inf FGSM: one signed-gradient step of size eps on the cross-entropy loss.

    `x_adv = clip(x + eps * sign(grad_x CE(apply_fn(params, x), y)), clip_min, clip_max)`,
    or `x - eps * sign(...)` when `targeted` (then `y` is the target class). The gradient
    is that of the cross-entropy *summed* over the batch (one backward pass; see
    `summed_cross_entropy`). Where the gradient is exactly 0, sign is 0 and the pixel is
    left unchanged.

    This function is unjitted so it inlines into a caller's jit (e.g. an adversarial
    training step, with `apply_fn` and `targeted` static). For standalone calls use
    `fgsm_jit`, which has the same signature and compiles once per (apply_fn, targeted,
    shapes): `eps`, `clip_min`, `clip_max` and `params` are traced, so an eps sweep or new
    params do not recompile.

    Args:
      apply_fn: stable, hashable `apply_fn(params, x) -> f32[B,K]` logits.
      params: model parameters pytree.
      x: f32[B,H,W,C] clean images in [clip_min, clip_max].
      y: int[B] true labels (untargeted) or target labels (targeted).
      eps: scalar L-inf budget >= 0, in pixel units.
      targeted: move towards class `y` instead of away from it.
      clip_min: lower pixel bound of the valid image box.
      clip_max: upper pixel bound of the valid image box.
      key: ignored (FGSM is deterministic); accepted so all attacks share a call site.

    Returns:
      x_adv with the shape and dtype of `x`, `||x_adv - x||_inf <= eps`, inside the box.

    Raises:
      ValueError: on concrete inputs that are malformed (rank, dtype, range, eps < 0,
        label shape); tracers are only checked for rank and dtype.
    """
    del key  # deterministic attack
    _check(x, y, eps, clip_min, clip_max)
    return _fgsm(apply_fn, params, x, y, eps, clip_min, clip_max, targeted)


def fgsm_jit(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    eps: float | Array,
    targeted: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    key: PRNGKey | None = None,
) -> Array:
    """`fgsm` with host-side input checks followed by a cached jitted kernel.

    Same arguments and result as `fgsm`. The jitted kernel is built once at import;
    `apply_fn` and `targeted` are its only static arguments.
    """
    del key
    _check(x, y, eps, clip_min, clip_max)
    return _fgsm_jit(apply_fn, params, x, y, eps, clip_min, clip_max, targeted=targeted)
