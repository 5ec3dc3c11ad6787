"""Type aliases and protocols shared across jaxadv."""

from typing import Any, Callable, Protocol

import jax

Array = jax.Array
Params = Any  # a pytree of arrays: for Flax models, the full variables dict
PRNGKey = jax.Array

# apply_fn(params, x: f32[B,H,W,C] in [0,1]) -> f32[B,K] logits. Must be a stable,
# hashable callable (module-level function or cached) so jit treats it as static.
ApplyFn = Callable[[Params, Array], Array]

# A squeezer maps f32[B,H,W,C] in [0,1] to the same shape and range.
Squeezer = Callable[[Array], Array]


class BatchTransform(Protocol):
    """`(params, x, y, key) -> (x', y')`, applied to every training batch inside the jitted step."""

    def __call__(self, params: Params, x: Array, y: Array, key: PRNGKey) -> tuple[Array, Array]: ...
