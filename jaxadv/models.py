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
      bn_scale, bn_momentum: BatchNorm's learned scale (on/off) and the weight of the old
        running statistics per update.
      mean, std: input normalization constants, applied inside the model.
      dtype: compute dtype (params stay float32; logits are returned as float32).
    """

    widths: Sequence[int] = (32, 64, 128)
    head: Sequence[int] = (128,)
    num_classes: int = 10
    norm: str | None = None
    bn_scale: bool = True
    bn_momentum: float = 0.9
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
                    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, use_scale=self.bn_scale,
                                     dtype=self.dtype)(x)  # fmt: skip
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


def patch_whitening_kernel(x: Array, out_channels: int, *, size: int = 3, eps: float = 5e-4) -> Array:
    """Conv kernel f32[size,size,C,out] that whitens the `size` x `size` patches of `x`.

    The filters are the top `out_channels // 2` eigenvectors of the patch covariance,
    each scaled by 1/sqrt(eigenvalue + eps), and their negatives (ReLU keeps both signs
    of each direction), as in airbench and Page's cifar10-fast.

    Args:
      x: f32[N,H,W,C] images as the first conv sees them (normalized).
      out_channels: even number of filters.
    """
    if out_channels % 2:
        raise ValueError(f"whitening needs an even number of first-layer channels, got {out_channels}")
    c = x.shape[-1]
    patches = jax.lax.conv_general_dilated_patches(x, (size, size), (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    patches = patches.reshape(-1, patches.shape[-1]).astype(jnp.float32)  # [P, C*size*size], channel-major
    patches = patches - patches.mean(0, keepdims=True)
    cov = patches.T @ patches / patches.shape[0]
    eigval, eigvec = jnp.linalg.eigh(cov)  # ascending
    k = out_channels // 2
    if k > eigval.shape[0]:
        raise ValueError(f"at most {2 * eigval.shape[0]} whitening filters for {size}x{size}x{c} patches")
    top = eigvec[:, ::-1][:, :k] / jnp.sqrt(eigval[::-1][:k] + eps)[None, :]  # [C*size*size, k]
    filters = jnp.concatenate([top, -top], axis=1)  # [C*size*size, out]
    # conv_general_dilated_patches orders features as (C, kh, kw); the kernel is (kh, kw, C, out).
    return filters.reshape(c, size, size, out_channels).transpose(1, 2, 0, 3)


def whiten_and_dirac(variables: Any, model: "CNN", images_u8, *, n: int = 1000) -> Any:
    """`variables` with the first conv set to `patch_whitening_kernel` of the first `n`
    training images and every other conv's first `in` filters set to the identity."""
    x = jnp.asarray(images_u8[:n], jnp.float32) / 255.0
    mean = jnp.asarray(model.mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(model.std, jnp.float32).reshape(1, 1, 1, -1)
    params = jax.tree.map(lambda a: a, variables["params"])
    convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
    first = params[convs[0]]["kernel"]
    white = patch_whitening_kernel((x - mean) / std, first.shape[-1]).astype(first.dtype)
    params[convs[0]] = {**params[convs[0]], "kernel": white}
    for name in convs[1:]:
        w = params[name]["kernel"]
        kh, kw, cin, cout = w.shape
        m = min(cin, cout)
        eye = jnp.zeros((kh, kw, m, m), w.dtype).at[kh // 2, kw // 2].set(jnp.eye(m, dtype=w.dtype))
        params[name] = {**params[name], "kernel": w.at[:, :, :m, :m].set(eye)}
    return {**variables, "params": params}
