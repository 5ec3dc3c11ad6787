"""The deterministic toy MLP of the AutoAttack reference's test vectors (docs in the notes of issue 13)."""

import jax.numpy as jnp
import numpy as np

_h, _d, _k = np.arange(8)[:, None], np.arange(6)[None, :], np.arange(4)[:, None]
PARAMS = {
    "W1": jnp.asarray((2 * np.sin(1 + 0.7 * _h + 1.3 * _d)).astype(np.float32)),
    "b1": jnp.asarray((0.1 * np.cos(np.arange(8))).astype(np.float32)),
    "W2": jnp.asarray((1.5 * np.cos(0.5 + 0.9 * _k - 0.4 * np.arange(8)[None, :])).astype(np.float32)),
    "b2": jnp.asarray((0.05 * np.arange(4)).astype(np.float32)),
}
# Four points of 2x3 pixels, 1 channel (the reference's [N,1,2,3] flattens in the same order).
X = jnp.asarray((0.5 + 0.4 * np.sin(2.1 * np.arange(4)[:, None] + 0.9 * _d)).astype(np.float32).reshape(4, 2, 3, 1))
Y = jnp.asarray([3, 0, 0, 3], jnp.int32)


def toy(params, x):
    """tanh MLP, 6 -> 8 -> 4 logits."""
    z = x.reshape(x.shape[0], -1)
    return jnp.tanh(z @ params["W1"].T + params["b1"][None, :]) @ params["W2"].T + params["b2"][None, :]


def size(delta, norm):
    d = np.asarray(delta, np.float64).reshape(len(delta), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
