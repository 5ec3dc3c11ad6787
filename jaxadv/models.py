"""The seed study's CNN in Flax Linen, exposed through a pure `apply(params, x) -> logits`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxadv.types import Array

# Per-channel statistics of the CIFAR-10 training set; normalization lives inside the
# model so that attacks always work in [0, 1] pixel space and eps means pixels.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def max_pool_2x2(x: Array) -> Array:
    """2x2 stride-2 max pool as reshape + max.

    Equal to `nn.max_pool(x, (2, 2), (2, 2))` for even H, W, but its backward pass is a
    cheap elementwise select instead of XLA's select-and-scatter, which is slow on CPU.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    """Three blocks of [conv3x3 + ReLU, conv3x3 + ReLU, maxpool 2x2], then an MLP head.

    Attributes:
      widths: output channels of the three conv blocks.
      head: hidden widths of the classifier head (Dense + ReLU each), before the final Dense.
      num_classes: number of logits.
      norm: None, or "batch" for BatchNorm after every conv (the `fast` config).
      mean, std: input normalization constants, applied inside the model.
      dtype: compute dtype (params stay float32; logits are returned as float32).
    """

    widths: Sequence[int] = (32, 64, 128)
    head: Sequence[int] = (128,)
    num_classes: int = 10
    norm: str | None = None
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        mean = jnp.asarray(self.mean, jnp.float32).reshape(1, 1, 1, -1)
        std = jnp.asarray(self.std, jnp.float32).reshape(1, 1, 1, -1)
        x = (x.astype(jnp.float32) - mean) / std
        x = x.astype(self.dtype)
        for width in self.widths:
            for _ in range(2):
                x = nn.Conv(width, (3, 3), padding=1, use_bias=self.norm is None, dtype=self.dtype)(x)
                if self.norm == "batch":
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
                elif self.norm is not None:
                    raise ValueError(f"unknown norm {self.norm!r}; expected None or 'batch'")
                x = nn.relu(x)
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for width in self.head:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)


def tiny_cnn(**kwargs) -> CNN:
    """A very small CNN of the same topology, for tests."""
    return CNN(widths=(4, 8, 8), head=(16,), **kwargs)


@functools.cache
def make_apply(model: nn.Module) -> Callable[[Any, Array], Array]:
    """Return the pure, stable `apply(params, x) -> logits` for `model` (eval mode).

    `params` is the model's full variables dict ({'params': ..., maybe 'batch_stats': ...}).
    The function is cached per (hashable) module, so jit sees the same static callable
    every time and never recompiles because of it.
    """

    def apply(params: Any, x: Array) -> Array:
        return model.apply(params, x, train=False)

    apply.__name__ = f"apply_{type(model).__name__}"
    return apply


def init_params(model: nn.Module, key: jax.Array, input_shape=(1, 32, 32, 3)) -> Any:
    """Initialize the model's variables dict for inputs of `input_shape`."""
    return jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros(input_shape, jnp.float32))


def count_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params.get("params", params)))
