"""Carlini-Wagner L2 (Carlini & Wagner, IEEE S&P 2017, arXiv:1608.04644), untargeted.

Minimizes ||x' - x||_2^2 + c * max(z_y - max_{i != y} z_i, -kappa) over x' = box(tanh(w)),
with Adam on w, and a per-example binary search over c: after each search step an
example that was fooled halves the gap above, one that was not raises c (x10 until it has
been fooled once). The best (smallest) fooling perturbation over all steps is returned.
Defaults are the paper's code (nn_robust_attacks/l2_attack.py): 9 search steps, Adam
lr 1e-2, initial c 1e-3, kappa 0, up to 10,000 iterations per step with the early abort
(every max_iter/10 iterations, stop when the loss fell by less than 0.01 %), here per
example instead of per batch so that results do not depend on batching.

A minimum-norm attack: it takes no eps; `return_info=True` gives `MinNormInfo`
(iterations: Adam steps taken over the whole search; success; the L2 norm).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks import _core
from jaxadv.attacks._core import MinNormInfo, bcast, per_example_norm
from jaxadv.types import ApplyFn, Array, Params, PRNGKey


class _State(NamedTuple):
    w: Array
    m: Array  # Adam moments
    v: Array
    t: Array  # Adam step count (per example: frozen examples do not advance)
    prev: Array  # loss at the last abort check
    active: Array  # bool: still optimizing in this search step
    best_l2: Array  # within this search step (squared)
    best_score: Array  # 1 if fooled in this search step
    o_best_l2: Array  # over all steps (squared)
    o_best: Array  # the best fooling example so far
    steps: Array  # Adam steps taken over the whole search


def _to_x(w, lo, hi):
    return lo + (hi - lo) * (jnp.tanh(w) + 1.0) / 2.0


def _step(apply_fn, params, s: _State, x0, y, c, kappa, lr, lo, hi, check):
    """One Adam step on the active examples; `check`: the early-abort test of this iteration."""

    def objective(w):
        xa = _to_x(w, lo, hi)
        z = apply_fn(params, xa).astype(jnp.float32)
        zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
        other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=jnp.bool_), -jnp.inf, z), axis=-1)
        l2 = jnp.sum((xa - x0).reshape(x0.shape[0], -1) ** 2, axis=1)
        f = jnp.maximum(zy - other, -kappa)
        loss = l2 + c * f
        return jnp.sum(loss), (loss, l2, z, xa)

    (_, (loss, l2, z, xa)), g = jax.value_and_grad(objective, has_aux=True)(s.w)
    # The loss, norm and success belong to the iterate before this update (the paper's order).
    fooled = jnp.argmax(z, -1) != y
    better = s.active & fooled & (l2 < s.best_l2)
    obetter = s.active & fooled & (l2 < s.o_best_l2)
    t = s.t + s.active.astype(jnp.float32)
    m = 0.9 * s.m + 0.1 * g
    v = 0.999 * s.v + 0.001 * g * g
    mhat = m / bcast(1 - 0.9**t)
    vhat = v / bcast(1 - 0.999**t)
    w = jnp.where(bcast(s.active), s.w - lr * mhat / (jnp.sqrt(vhat) + 1e-8), s.w)
    stalled = check & (loss > s.prev * 0.9999)
    return _State(w, jnp.where(bcast(s.active), m, s.m), jnp.where(bcast(s.active), v, s.v), t,
                  jnp.where(check, loss, s.prev), s.active & ~stalled, jnp.where(better, l2, s.best_l2),
                  jnp.where(better, 1.0, s.best_score), jnp.where(obetter, l2, s.o_best_l2),
                  jnp.where(bcast(obetter), xa, s.o_best), s.steps + s.active.astype(jnp.int32))  # fmt: skip


_step_kernel = _core.kernel(_step)


@_core.attack(name="cw", norms=("l2",), minimum_norm=True, paper="Carlini & Wagner 2017, arXiv:1608.04644",
              smoke={"max_iter": 8, "binary_search_steps": 2})  # fmt: skip
def cw(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    return_info: bool = False,
    norm: str = "l2",
    binary_search_steps: int = 9,
    max_iter: int = 10_000,
    learning_rate: float = 1e-2,
    initial_const: float = 1e-3,
    confidence: float = 0.0,
    abort_early: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
):
    """Untargeted Carlini-Wagner L2 with a per-example binary search over c.

    Args:
      apply_fn, params, x, y: the classifier, the images (in the box) and their labels.
      key: ignored (deterministic attack).
      return_info: also return `MinNormInfo(iterations, success, norm)`.
      norm: "l2" (the only one).
      binary_search_steps: search steps over c (9).
      max_iter: Adam iterations per search step (10,000; the early abort usually stops sooner).
      learning_rate: Adam's (1e-2).
      initial_const: c at the start (1e-3).
      confidence: kappa, the margin the misclassification must have (0).
      abort_early: stop an example's search step when its loss stalls.
      clip_min, clip_max: the box.

    Returns:
      x_adv (x where no step fooled the model), or (x_adv, MinNormInfo).
    """
    del key
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, norm=norm, norms=("l2",))
    for label, v in (("binary_search_steps", binary_search_steps), ("max_iter", max_iter)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be an int >= 1, got {v!r}")
    b = x.shape[0]
    x0 = x.astype(jnp.float32)
    lo, hi = jnp.float32(clip_min), jnp.float32(clip_max)
    w0 = jnp.arctanh(jnp.clip((x0 - lo) / (hi - lo) * 2 - 1, -1, 1) * 0.999999)
    c = np.full(b, initial_const, np.float64)
    lower, upper = np.zeros(b), np.full(b, 1e10)
    big = jnp.full((b,), 1e10, jnp.float32)
    s = _State(w0, jnp.zeros_like(x0), jnp.zeros_like(x0), jnp.zeros((b,), jnp.float32), big, jnp.ones((b,), bool),
               big, jnp.zeros((b,), jnp.float32), big, x0, jnp.zeros((b,), jnp.int32))  # fmt: skip
    step = functools.partial(_step_kernel, apply_fn, params)
    every = max(max_iter // 10, 1)
    for _ in range(binary_search_steps):
        s = s._replace(w=w0, m=jnp.zeros_like(x0), v=jnp.zeros_like(x0), t=jnp.zeros((b,), jnp.float32), prev=big,
                       active=jnp.ones((b,), bool), best_l2=big, best_score=jnp.zeros((b,), jnp.float32))  # fmt: skip
        cj = jnp.asarray(c, jnp.float32)
        for i in range(max_iter):
            check = jnp.bool_(abort_early and i % every == 0)
            s = step(s, x0, y, cj, jnp.float32(confidence), jnp.float32(learning_rate), lo, hi, check)
            if abort_early and i % every == 0 and i and not bool(jnp.any(s.active)):
                break
        ok = np.asarray(s.best_score) > 0
        upper = np.where(ok, np.minimum(upper, c), upper)
        lower = np.where(ok, lower, np.maximum(lower, c))
        c = np.where(upper < 1e9, (lower + upper) / 2, c * 10)
    success = np.asarray(s.o_best_l2) < 1e10
    x_adv = jnp.where(bcast(jnp.asarray(success)), s.o_best, x0).astype(x.dtype)
    if not return_info:
        return x_adv
    norms = per_example_norm(x_adv.astype(jnp.float32) - x0, "l2")
    pred = jnp.argmax(_core.logits(apply_fn, params, x_adv), -1)
    return x_adv, MinNormInfo(s.steps, pred != jnp.argmax(_core.logits(apply_fn, params, x0), -1), norms)
