"""Shared test models: an affine classifier with closed forms, and a tiny trained CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadv import models
from jaxadv.attacks import summed_cross_entropy

HWC = (4, 4, 3)
D = int(np.prod(HWC))


# ---------------------------------------------------------------------------------------
# Models: an affine classifier with closed-form gradients, and a small trained CNN
# ---------------------------------------------------------------------------------------


def linear_apply(params, x):
    """logits = x.reshape(B, -1) @ W + b (module level, so a stable static callable)."""
    return x.reshape(x.shape[0], -1) @ params["W"] + params["b"][None, :]


def make_linear(seed, num_classes, scale=1.0, d=D):
    rng = np.random.default_rng(seed)
    w = (scale * rng.standard_normal((d, num_classes))).astype(np.float32)
    b = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
    return {"W": jnp.asarray(w), "b": jnp.asarray(b)}


def uniform_images(seed, batch, lo, hi, hwc=HWC):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(lo, hi, (batch, *hwc)).astype(np.float32))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_summed_ce(params, x, y):
    """float64 NumPy reference of the summed softmax cross-entropy of the linear model."""
    w, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    logits = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w + b
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -log_p[np.arange(len(y)), np.asarray(y)].sum()


def np_ce_grad(params, x, y):
    """Closed form d(sum CE)/dx = (softmax - onehot) @ W^T, reshaped like x."""
    w, b = np.asarray(params["W"], np.float64), np.asarray(params["b"], np.float64)
    logits = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w + b
    p = np_softmax(logits)
    p[np.arange(len(y)), np.asarray(y)] -= 1.0
    return (p @ w.T).reshape(x.shape)


NUM_CLASSES = 3
IMAGE = (8, 8, 3)  # tiny_cnn pools three times: 8 -> 1


def synthetic_patterns(key, n):
    """Three classes: a bright red, green or blue blob on a noisy grey background."""
    k_label, k_noise, k_pos = jax.random.split(key, 3)
    y = jax.random.randint(k_label, (n,), 0, NUM_CLASSES)
    yy, xx = jnp.meshgrid(jnp.arange(8.0), jnp.arange(8.0), indexing="ij")
    centre = jax.random.uniform(k_pos, (n, 2), minval=2.0, maxval=6.0)
    dist2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    blob = jnp.exp(-dist2 / 4.0)
    colour = jax.nn.one_hot(y, 3)
    noise = 0.1 * jax.random.normal(k_noise, (n, *IMAGE))
    x = 0.4 + 0.5 * blob[..., None] * colour[:, None, None, :] + noise
    return jnp.clip(x, 0.0, 1.0), y.astype(jnp.int32)


def he_init(model, seed):
    """He-normal kernels, zero biases, host-side: `model.init`'s truncated-normal init costs
    several seconds of XLA:CPU compile, which this module's time budget cannot afford."""
    x = jnp.zeros((1, *IMAGE))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def leaf(s):
        if len(s.shape) < 2:
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in), s.dtype)

    return jax.tree.map(leaf, shapes)


def train_tiny_cnn():
    """A tiny CNN trained on `synthetic_patterns` (> 90 % accurate): (apply_fn, params, x, correct)."""
    model = models.tiny_cnn(num_classes=NUM_CLASSES)
    apply_fn = models.make_apply(model)
    k_train, k_test = jax.random.split(jax.random.key(42))
    params = he_init(model, seed=0)
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            p, opt = carry
            x, y = synthetic_patterns(k, 64)
            loss_fn = lambda q: summed_cross_entropy(apply_fn(q, x), y) / x.shape[0]  # noqa: E731
            grads = jax.grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, 150))
        return params

    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int32 counts and floats
        params = train(params, k_train)
    x, y = synthetic_patterns(k_test, 48)
    correct = np.asarray(jnp.argmax(apply_fn(params, x), -1) == y)
    assert correct.mean() > 0.9, f"premise: the CNN learned the patterns (acc {correct.mean():.2f})"
    return apply_fn, params, x, correct
