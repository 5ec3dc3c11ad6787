"""Auto-PGD (Croce & Hein, ICML 2020, arXiv:2003.01690): APGD-CE, APGD-DLR and APGD-T, L-inf and L2.

A faithful port of the reference (fra31/auto-attack, `autopgd_base.py`, on PyPI as
pyautoattack 0.2.0): the same start point, step-size schedule (checkpoints, the two
halving conditions, restart from the best point), momentum 0.75, initial step 2 eps,
losses (CE, DLR, targeted DLR with its 1e-12 constants), restarts on the points still
robust, and targets taken from the clean logits. Only the random numbers differ (JAX's
generator, one key per example, restart and target).

Driver: the step is one compiled program called from a Python loop without any host
sync (the schedule is static), because XLA:CPU runs convolutions inside a `while_loop`
body ~4x slower than as a program of its own. With `early_exit=True` the loop fetches
which points are fooled and steps only the others (compaction into a few fixed sizes):
a point's verdict is the same as in the reference (fooled by some iterate), but its
returned example is the first fooling iterate instead of the last. Under a caller's jit
the same step runs in a `lax.fori_loop`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import validate
from jaxadv.attacks import _core
from jaxadv.attacks._core import bcast, per_example_norm
from jaxadv.types import ApplyFn, Array, Params, PRNGKey

LOSSES = ("ce", "dlr", "dlr_targeted")


# ---------------------------------------------------------------------------------------
# Losses (per example; the attack ascends their sum)
# ---------------------------------------------------------------------------------------


def ce_loss(logits: Array, y: Array) -> Array:
    """Cross-entropy, f32[B]."""
    z = logits.astype(jnp.float32)
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]


def dlr_loss(logits: Array, y: Array) -> Array:
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), f32[B].

    pi is the descending order of the logits (Croce & Hein 2020, eq. 4). Needs K >= 3.
    """
    z = logits.astype(jnp.float32)
    zs = jnp.sort(z, axis=-1)
    top_is_y = (jnp.argsort(z, axis=-1)[:, -1] == y).astype(jnp.float32)
    zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    return -(zy - zs[:, -2] * top_is_y - zs[:, -1] * (1.0 - top_is_y)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Array, y: Array, y_target: Array) -> Array:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), f32[B]. Needs K >= 4."""
    z = logits.astype(jnp.float32)
    zs = jnp.sort(z, axis=-1)
    zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    zt = jnp.take_along_axis(z, y_target[:, None], axis=1)[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


_LOSS_FNS = {"ce": lambda z, y, t: ce_loss(z, y), "dlr": lambda z, y, t: dlr_loss(z, y),
             "dlr_targeted": dlr_loss_targeted}  # fmt: skip


def losses_for(k: int) -> tuple[str, ...]:
    """The losses a K-class model supports (DLR needs K >= 3, targeted DLR K >= 4), in LOSSES order."""
    return LOSSES[: 1 + (k >= 3) + (k >= 4)]


def _loss(losses, loss_id, logits, y, y_target):
    """Loss `losses[loss_id]` per example. Every loss the model supports is computed in one
    compiled program and the traced `loss_id` selects one (the others get zero gradient):
    APGD-CE, APGD-DLR and APGD-T then share their compiled step (on the study's CNN on CPU,
    compiling one costs ~0.7 s per batch size, which AutoAttack's APGD-T would pay again).
    A select, not `lax.switch`: the switch made a step ~4 % slower here; the select's extra
    losses on [B, K] logits cost nothing measurable."""
    if len(losses) == 1:
        return _LOSS_FNS[losses[0]](logits, y, y_target)
    # The unselected losses get a zero cotangent. With -inf logits (a model masking classes)
    # DLR turns NaN only when a single logit is finite, where cross-entropy's gradient is
    # zero as well, so no NaN reaches a gradient that was finite before.
    per = [jnp.where(loss_id == j, _LOSS_FNS[name](logits, y, y_target), 0.0) for j, name in enumerate(losses)]
    return sum(per[1:], per[0])


def checkpoints(n_iter: int) -> dict[int, int]:
    """{iteration index: window length k} of the step-size checks, as the reference computes them.

    Windows start at int(0.22 n) and shrink by int(0.03 n) to at least int(0.06 n) (each at
    least 1): for n = 100 the checks follow iterations 21, 40, 56, 69, 79, 86, 92, 98, the
    paper's ceil(p_j n) with p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    """
    k, k_min, decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, counter = {}, 0
    for i in range(n_iter):
        counter += 1
        if counter == k:
            out[i] = k
            k, counter = max(k - decr, k_min), 0
    return out


# ---------------------------------------------------------------------------------------
# One run: state, init, step
# ---------------------------------------------------------------------------------------


class _State(NamedTuple):
    x0: Array  # clean input
    y: Array
    y_target: Array
    x_adv: Array
    x_adv_old: Array
    grad: Array
    x_best: Array  # highest-loss iterate
    grad_best: Array
    loss_best: Array
    x_best_adv: Array  # last fooling iterate
    fooled: Array  # bool: some iterate was misclassified
    step: Array  # per-example step size
    loss_steps: Array  # [B, n_iter] loss after each step (zeros before it)
    loss_best_last: Array
    reduced_last: Array


def _grad(apply_fn, params, x, y, y_target, losses, loss_id):
    def total(z):
        logits = apply_fn(params, z).astype(jnp.float32)
        per = _loss(losses, loss_id, logits, y, y_target)
        return jnp.sum(per), (per, logits)

    (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
    return per, logits, g


def _project(v, x0, eps, lo, hi, norm):
    """The reference's projection: L-inf clip to the ball; L2 radial rescale to norm <= eps; then the box."""
    if norm == "linf":
        return jnp.clip(jnp.clip(v, x0 - eps, x0 + eps), lo, hi)
    d = v - x0
    n = per_example_norm(d, "l2")
    return jnp.clip(x0 + d / bcast(n + 1e-12) * bcast(jnp.minimum(eps, n)), lo, hi)


def _start(x, y, y_target, noise, eps, lo, hi, *, norm, n_iter, random_start):
    """The state before the first gradient: the start point (no model pass; `_step` with
    `first` computes its loss and gradient). Fields the first step overwrites are blanks.
    `noise` (random start): per example uniform in [0, 1) for L-inf, standard normal for L2."""
    x0 = x.astype(jnp.float32)
    if random_start:
        t = noise * 2.0 - 1.0 if norm == "linf" else noise
        x_adv = x0 + eps * t / bcast(per_example_norm(t, norm) + 1e-12)
    else:
        x_adv = x0
    x_adv = jnp.clip(x_adv, lo, hi)
    b = x.shape[0]
    zeros = jnp.zeros((b,), jnp.float32)
    step = jnp.full((b,), 2.0, jnp.float32) * eps
    return _State(x0, y, y_target, x_adv, x_adv, jnp.zeros_like(x0), x_adv, jnp.zeros_like(x0), zeros, x_adv,
                  jnp.zeros((b,), bool), step, jnp.zeros((b, n_iter), jnp.float32), zeros,
                  jnp.ones((b,), jnp.float32))  # fmt: skip


def _step(apply_fn, params, s: _State, i, check, k, eps, lo, hi, rho, loss_id, first, *, norm, losses):
    """Iteration i: a momentum step, the new loss and gradient, bookkeeping, and, when `check`,
    the step-size test over the last k losses.

    With `first` (traced), the reference's initialization instead: no move, the loss and
    gradient at the start point of `_start`, which becomes the best point (the step-size
    test is skipped). The start is thus one program with the steps, not a second program with
    its own forward and backward pass to compile (~0.9 s per batch size on the study's CNN)."""
    check = jnp.logical_and(check, jnp.logical_not(first))  # the first call has no losses to test
    a = jnp.where(i > 0, 0.75, 1.0)
    grad2 = s.x_adv - s.x_adv_old
    if norm == "linf":
        z = _project(s.x_adv + bcast(s.step) * jnp.sign(s.grad), s.x0, eps, lo, hi, norm)
    else:
        g_unit = s.grad / bcast(per_example_norm(s.grad, "l2") + 1e-12)
        z = _project(s.x_adv + bcast(s.step) * g_unit, s.x0, eps, lo, hi, norm)
    x_adv = _project(s.x_adv + (z - s.x_adv) * a + grad2 * (1.0 - a), s.x0, eps, lo, hi, norm)
    x_adv = jnp.where(first, s.x_adv, x_adv)
    per, logits, g = _grad(apply_fn, params, x_adv, s.y, s.y_target, losses, loss_id)
    wrong = jnp.argmax(logits, -1) != s.y
    x_best_adv = jnp.where(bcast(wrong), x_adv, s.x_best_adv)  # first: the start's x_best_adv is the start
    loss_steps = jnp.where(first, s.loss_steps, jax.lax.dynamic_update_index_in_dim(s.loss_steps, per, i, axis=1))
    better = (per > s.loss_best) | first
    x_best = jnp.where(bcast(better), x_adv, s.x_best)
    grad_best = jnp.where(bcast(better), g, s.grad_best)
    loss_best = jnp.where(better, per, s.loss_best)
    # Condition 1: the loss increased in at most rho * k of the last k steps. The reference
    # indexes loss_steps[i - c - 1] with Python's wrap-around, so the first window's oldest
    # comparison is against the still-zero last slot; the modulo reproduces it.
    n_iter = s.loss_steps.shape[1]
    c = jnp.arange(n_iter)
    cur = jnp.take(loss_steps, (i - c) % n_iter, axis=1)
    prev = jnp.take(loss_steps, (i - c - 1) % n_iter, axis=1)
    count = jnp.sum((cur > prev) & (c < k)[None, :], axis=1)
    fl_osc = (count.astype(jnp.float32) <= k.astype(jnp.float32) * rho).astype(jnp.float32)
    # Condition 2: no halving at the last check and the best loss did not improve since.
    fl_noimp = (1.0 - s.reduced_last) * (s.loss_best_last >= loss_best).astype(jnp.float32)
    halve = check & (jnp.maximum(fl_osc, fl_noimp) > 0)
    step = jnp.where(halve, s.step / 2.0, s.step)
    x_next = jnp.where(bcast(halve), x_best, x_adv)
    g_next = jnp.where(bcast(halve), grad_best, g)
    reduced_last = jnp.where(check, jnp.maximum(fl_osc, fl_noimp), s.reduced_last)
    loss_best_last = jnp.where(check | first, loss_best, s.loss_best_last)
    # x_adv_old is the iterate this step started from (the reference's order), also after a
    # restart from x_best, so the next momentum term is x_best - (that iterate).
    return _State(s.x0, s.y, s.y_target, x_next, s.x_adv, g_next, x_best, grad_best, loss_best, x_best_adv,
                  s.fooled | wrong, step, loss_steps, loss_best_last, reduced_last)  # fmt: skip


_start_kernel = jax.jit(_start, static_argnames=("norm", "n_iter", "random_start"))
_step_kernel = _core.kernel(_step, static=("norm", "losses"))


def run(apply_fn, params, x, y, y_target, keys, *, eps, norm, loss, n_iter, rho=0.75, random_start=True,
        early_exit=False, clip_min=0.0, clip_max=1.0, counter=None, groups=None):  # fmt: skip
    """One APGD run on a batch: (x_best_adv where fooled else x_best, fooled bool[B]).

    `counter`, a dict, accumulates the forward and backward passes (per example) spent.
    `groups` (early exit only): rows of one group stop together once one of them is fooled.
    """
    lo, hi = jnp.float32(clip_min), jnp.float32(clip_max)
    eps = jnp.asarray(eps, jnp.float32)
    losses = losses_for(_core.num_classes(apply_fn, params, x))
    loss_id = jnp.int32(losses.index(loss))
    step = functools.partial(_step_kernel, apply_fn, params, norm=norm, losses=losses)
    if random_start:
        noise = _core.random_rows(keys, tuple(x.shape[1:]), "uniform" if norm == "linf" else "normal")
    else:
        noise = jnp.zeros((), jnp.float32)
    s = _start_kernel(x, y, y_target, noise, eps, lo, hi, norm=norm, n_iter=n_iter, random_start=random_start)
    s = step(s, jnp.int32(0), jnp.bool_(False), jnp.int32(1), eps, lo, hi, rho, loss_id, jnp.bool_(True))
    checks = checkpoints(n_iter)
    b = x.shape[0]
    passes = b
    if not validate.is_concrete((params, x)):  # under a caller's jit: one loop on device
        check_arr = jnp.asarray([i in checks for i in range(n_iter)])
        k_arr = jnp.asarray([checks.get(i, 1) for i in range(n_iter)], jnp.int32)
        s = jax.lax.fori_loop(0, n_iter, lambda i, s: step(s, i, check_arr[i], k_arr[i], eps, lo, hi, rho, loss_id, False), s)
    else:
        for i in range(n_iter):
            args = (jnp.int32(i), jnp.bool_(i in checks), jnp.int32(checks.get(i, 1)), eps, lo, hi, rho, loss_id,
                    jnp.bool_(False))
            if not early_exit:
                s = step(s, *args)
                passes += b
                continue
            active = _core.group_active(np.asarray(s.fooled), groups)
            if not active.any():
                break
            size, idx = _core.active_index(active, b)
            passes += size
            if idx is None:
                s = step(s, *args)
            else:
                s = _core.scatter_rows(s, step(_core.gather_rows(s, idx, size=size), *args), idx)
    if counter is not None:
        counter["forward"] = counter.get("forward", 0) + passes
        counter["backward"] = counter.get("backward", 0) + passes
    return jnp.where(bcast(s.fooled), s.x_best_adv, s.x_best), s.fooled


# ---------------------------------------------------------------------------------------
# Restarts and targets on the points still robust
# ---------------------------------------------------------------------------------------


def _robust_loop(apply_fn, params, x, y, keys, settings, *, n_restarts, targets, early_exit, counter):
    """The reference's `perturb`: for each target (None: untargeted) and restart, one run on
    the points not yet fooled. Returns (x_adv, fooled, target index or -1) per example."""
    logits = _core.logits(apply_fn, params, x)
    z = np.asarray(logits)  # on the host: no small eager programs to compile
    order = np.argsort(z, axis=-1, kind="stable")  # ascending: [:, -1] is the prediction
    fooled = z.argmax(-1) != np.asarray(y)
    broke_with = np.full(x.shape[0], -1, np.int32)
    out = x.astype(jnp.float32)
    b = x.shape[0]
    if early_exit and len(targets) > 1 and _core.parallel_targets():
        return _parallel_targets(apply_fn, params, x, y, keys, settings, order, fooled, broke_with, out,
                                 n_restarts=n_restarts, targets=targets, counter=counter)  # fmt: skip
    for t_i, target_class in enumerate(targets):
        for r in range(n_restarts):
            todo = ~fooled
            if not todo.any():
                return out, fooled, broke_with
            y_t = y if target_class is None else jnp.asarray(order[:, -target_class], jnp.int32)
            run_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t_i * 1000 + r)
            for size, idx in _core.micro_batches(todo, b):
                idx = jnp.arange(b, dtype=jnp.int32) if idx is None else idx
                sub = _core.gather_rows((x, y, y_t, run_keys), idx, size=size)
                x_r, f_r = run(apply_fn, params, *sub, early_exit=early_exit, counter=counter, **settings)
                out = _core.credit(out, fooled, broke_with, idx, np.asarray(f_r), x_r, todo, t_i)
    return out, fooled, broke_with


def _parallel_targets(apply_fn, params, x, y, keys, settings, order, fooled, broke_with, out, *, n_restarts, targets,
                      counter):  # fmt: skip
    """Early exit's APGD-T: every target of every robust point in one batch; a point stops as
    soon as one of its copies is fooled (the verdict the reference reaches trying targets in
    turn), keeping the lowest-ranked target among the copies fooled by then."""
    x0 = x.astype(jnp.float32)
    for r in range(n_restarts):
        rows = np.flatnonzero(~fooled)
        if rows.size == 0:
            break
        rep, slot, group = _core.replicate_targets(rows, len(targets))
        rep_j, slot_j = jnp.asarray(rep), jnp.asarray(slot)
        y_t = jnp.asarray(order[rep, -np.asarray(targets)[slot]], jnp.int32)
        run_keys = jax.vmap(jax.random.fold_in)(keys[rep_j], slot_j * 1000 + r)
        x_r, f_r = run(apply_fn, params, x0[rep_j], y[rep_j], y_t, run_keys, early_exit=True, counter=counter,
                       groups=group, **settings)  # fmt: skip
        best = _core.first_success(np.asarray(f_r), slot, group, rows.size)
        hit = best >= 0
        out = out.at[rows[hit]].set(x_r[best[hit]])
        fooled[rows[hit]] = True
        broke_with[rows[hit]] = slot[best[hit]]
    return out, fooled, broke_with


def _check(apply_fn, params, x, y, key, eps, norm, loss, n_iter, n_restarts, clip_min, clip_max, name):
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, eps=eps, norm=norm,
                       norms=("linf", "l2"))  # fmt: skip
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for label, v, low in (("n_iter", n_iter, 1), ("n_restarts", n_restarts, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{label} must be an int >= {low}, got {v!r}")
    _core.require_key(key, name)
    k = _core.num_classes(apply_fn, params, x)
    need = 4 if loss == "dlr_targeted" else 3 if loss == "dlr" else 2
    if k < need:
        raise ValueError(f"{name} with the {loss} loss needs at least {need} classes, the model has {k}")
    return k


@_core.attack(name="apgd", smoke={"n_iter": 6}, norms=("linf", "l2"), randomized=True, paper="Croce & Hein 2020, arXiv:2003.01690")
def apgd(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    eps: float | Array,
    norm: str = "linf",
    loss: str = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    random_start: bool = True,
    early_exit: bool = False,
    return_info: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
):
    """Untargeted APGD with the cross-entropy ("ce", APGD-CE) or DLR ("dlr", APGD-DLR) loss.

    Defaults are AutoAttack's: 100 iterations, one restart, rho 0.75, a random start on
    the eps sphere. A point fooled by some iterate is returned as its last fooling iterate
    (the first with `early_exit`); the others, and points misclassified at x, unchanged (the
    reference's `perturb` keeps only successful examples).

    Args:
      apply_fn, params: the classifier.
      x: f[B,H,W,C] in [clip_min, clip_max]; y: int[B] labels.
      key: one PRNG key or one per example (random starts).
      eps: L-inf or L2 budget in pixels of the box.
      norm: "linf" or "l2".
      loss: "ce" or "dlr" ("dlr_targeted" is `apgd_t`'s).
      n_iter: iterations per run (the step-size schedule follows the reference's integers).
      n_restarts: runs; each on the points not fooled by the earlier ones.
      rho: the oscillation threshold of the step-size test.
      random_start: start from a random point of the eps sphere (False: from x).
      early_exit: stop iterating a point once fooled (same verdicts, fewer passes).
      return_info: also return {"fooled": bool[B], "passes": {"forward", "backward"}}.
      clip_min, clip_max: the box.

    Returns:
      x_adv (the dtype of x), or (x_adv, info).
    """
    _check(apply_fn, params, x, y, key, eps, norm, loss, n_iter, n_restarts, clip_min, clip_max, "apgd")
    counter: dict = {}
    settings = dict(eps=eps, norm=norm, loss=loss, n_iter=n_iter, rho=rho, random_start=random_start,
                    clip_min=clip_min, clip_max=clip_max)  # fmt: skip
    out, fooled, _ = _robust_loop(apply_fn, params, x, y, _core.example_keys(key, x), settings,
                                  n_restarts=n_restarts, targets=[None], early_exit=early_exit,
                                  counter=counter)  # fmt: skip
    x_adv = out.astype(x.dtype)
    return (x_adv, {"fooled": fooled, "passes": counter}) if return_info else x_adv


@_core.attack(name="apgd_t", smoke={"n_iter": 6}, norms=("linf", "l2"), randomized=True, paper="Croce & Hein 2020, arXiv:2003.01690")
def apgd_t(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    eps: float | Array,
    norm: str = "linf",
    n_target_classes: int | None = None,
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    random_start: bool = True,
    early_exit: bool = False,
    return_info: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
):
    """APGD-T: APGD on the targeted DLR loss, for the `n_target_classes` highest-scoring wrong
    classes at x in turn (AutoAttack: 9), each on the points no earlier target fooled.

    Same arguments as `apgd` (its loss is fixed), plus `n_target_classes` (None: 9, or K - 1
    for models with fewer than 10 classes).
    With `return_info`, info also holds "target": the class index that fooled each point
    (-1: none, or misclassified at x).
    """
    k = _check(apply_fn, params, x, y, key, eps, norm, "dlr_targeted", n_iter, n_restarts, clip_min, clip_max,
               "apgd_t")  # fmt: skip
    if n_target_classes is None:
        n_target_classes = min(9, k - 1)  # AutoAttack's 9, or every other class of a smaller model
    if not isinstance(n_target_classes, int) or not 1 <= n_target_classes <= k - 1:
        raise ValueError(f"n_target_classes must be an int in [1, {k - 1}] for {k} classes, got {n_target_classes!r}")
    counter: dict = {}
    settings = dict(eps=eps, norm=norm, loss="dlr_targeted", n_iter=n_iter, rho=rho, random_start=random_start,
                    clip_min=clip_min, clip_max=clip_max)  # fmt: skip
    out, fooled, broke_with = _robust_loop(apply_fn, params, x, y, _core.example_keys(key, x), settings,
                                           n_restarts=n_restarts, targets=list(range(2, n_target_classes + 2)),
                                           early_exit=early_exit, counter=counter)  # fmt: skip
    x_adv = out.astype(x.dtype)
    if not return_info:
        return x_adv
    order = np.argsort(np.asarray(_core.logits(apply_fn, params, x)), axis=-1, kind="stable")
    target = np.where(broke_with >= 0, order[np.arange(len(broke_with)), -(np.maximum(broke_with, 0) + 2)], -1)
    target = target.astype(np.int32)
    return x_adv, {"fooled": fooled, "target": target, "passes": counter}
