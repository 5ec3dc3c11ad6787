"""Losses shared by training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxadv.types import Array


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy, f32[B] (computed in float32)."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
