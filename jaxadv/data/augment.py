"""Device-side data ops, called inside the jitted step: augmentation and uint8 -> float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxadv.types import Array, PRNGKey


def augment(key: PRNGKey, x: Array, *, pad: int = 4, pad_mode: str = "reflect", flip: bool = True) -> Array:
    """Random crop after padding, then random horizontal flip, independently per example.

    Jittable with `pad`, `pad_mode` and `flip` static, e.g.
    `jax.jit(augment, static_argnames=("pad", "pad_mode", "flip"))`; normally it is simply
    called inside the jitted train step. Works on uint8 (cheapest, before `to_float`) or
    float inputs.

    Args:
        key: PRNG key; the same key gives the same output.
        x: [B, H, W, C] images, any dtype.
        pad: pixels of padding per side; each example is cropped back to H x W at a
            uniform random offset in [0, 2 * pad] per axis. 0 disables cropping.
        pad_mode: "reflect" (no artificial borders; needs pad < H, W) or "constant" (zeros).
        flip: flip each example left-right with probability 1/2.

    Returns:
        Augmented images with the shape and dtype of `x`.
    """
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b, h, w, c = x.shape
    crop_key, flip_key = jax.random.split(key)
    if pad > 0:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
        x = crop(padded, offsets, (h, w))
    if flip:
        flipped = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(flipped[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def crop(x: Array, offsets: Array, size: tuple[int, int]) -> Array:
    """Crop a `size` window from each example at its own (row, col) offset.

    Args:
        x: [B, H, W, C] images.
        offsets: int[B, 2] top-left corner of each window.
        size: (height, width) of the windows.

    Returns:
        [B, size[0], size[1], C], same dtype as `x`.
    """
    c = x.shape[-1]
    zero = jnp.zeros((), offsets.dtype)
    return jax.vmap(lambda img, o: lax.dynamic_slice(img, (o[0], o[1], zero), (*size, c)))(x, offsets)


def to_float(x: Array) -> Array:
    """uint8 [..] -> float32 in [0, 1] (x / 255)."""
    return jnp.asarray(x).astype(jnp.float32) / 255.0
