"""Host-side input checks for public attacks and defenses, raising one-line ValueErrors.

Every check inspects *values* only when they are concrete (NumPy arrays, Python scalars,
committed jax Arrays) and skips tracers silently, so the functions calling them stay
jittable: under `jax.jit` the checks run at trace time on shapes and dtypes only.
Value checks on a concrete jax Array cost one small device reduction and a scalar fetch,
which is why attacks run them once per call, never inside their loops.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
    """True if `value` holds data we can look at on the host (not a jax tracer)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def _min_max(x: Any) -> tuple[float, float]:
    if isinstance(x, jax.Array) and not all(d.platform == "cpu" for d in x.devices()):
        # Reduce on device and fetch two scalars instead of copying the whole batch. Eagerly,
        # also when a concrete array is closed over inside someone's jit trace. (On CPU the
        # batch is already in host memory: NumPy reads it without compiling a reduction for
        # every new shape, ~0.03 s each.)
        with jax.ensure_compile_time_eval():
            lo, hi = jax.device_get((jnp.min(x), jnp.max(x)))
        return float(lo), float(hi)
    x = np.asarray(x)
    return float(x.min()), float(x.max())


def check_images(x: Any, *, value_range: tuple[Any, Any] = (0.0, 1.0), name: str = "x") -> None:
    """Check that `x` is a float NHWC image batch with values in `value_range`.

    Args:
      x: the batch, expected f32[B,H,W,C] (any float dtype) with B, H, W, C >= 1.
      value_range: inclusive (low, high) bounds, normally the attack's (clip_min, clip_max).
        Skipped if `x` or either bound is a tracer.
      name: argument name used in the error message.

    Raises:
      ValueError: wrong rank, empty batch, non-float dtype, NaN, or values out of range.
    """
    shape = np.shape(x)
    if len(shape) != 4:
        raise ValueError(f"{name} must be a rank-4 NHWC batch [B,H,W,C], got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a float image batch in [0, 1], got dtype {dtype} "
            "(convert uint8 images with x.astype(jnp.float32) / 255)"
        )
    if not (is_concrete(x) and is_concrete(value_range)):
        return
    lo, hi = float(value_range[0]), float(value_range[1])
    if not lo < hi:
        raise ValueError(f"clip_min must be < clip_max, got clip_min={lo}, clip_max={hi}")
    xmin, xmax = _min_max(x)
    # Written so that NaN (all comparisons False) also fails the check.
    if not (lo <= xmin and xmax <= hi):
        raise ValueError(
            f"{name} values must lie in [{lo}, {hi}] (pixel space), got min={xmin}, max={xmax}"
        )


def check_eps(eps: Any, *, name: str = "eps") -> None:
    """Check that the perturbation budget is a finite, non-negative scalar.

    Args:
      eps: Python or array scalar. Skipped (apart from the rank) if it is a tracer.
      name: argument name used in the error message.

    Raises:
      ValueError: eps is not a scalar, negative, or not finite.
    """
    if np.ndim(eps) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(eps)}")
    if not is_concrete(eps):
        return
    value = float(eps)
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_labels(y: Any, x: Any, *, name: str = "y") -> None:
    """Check that `y` holds one non-negative integer label per example of `x`.

    Args:
      y: int[B] class labels (or targets). Values are checked only if concrete. The upper
        bound (class count K) is only known from the logits, so it is not checked here.
      x: the image batch whose leading dimension is B.
      name: argument name used in the error message.

    Raises:
      ValueError: wrong rank, batch-size mismatch, non-integer dtype, or negative labels.
    """
    shape = np.shape(y)
    if len(shape) != 1:
        raise ValueError(f"{name} must be a rank-1 array of int labels [B], got shape {shape}")
    batch = np.shape(x)[0]
    if shape[0] != batch:
        raise ValueError(f"{name} has {shape[0]} labels but x has batch size {batch}")
    dtype = jnp.result_type(y)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {dtype}")
    if is_concrete(y):
        ymin = _min_max(y)[0]
        if ymin < 0:
            raise ValueError(f"{name} must hold non-negative class labels, got min={ymin:g}")
