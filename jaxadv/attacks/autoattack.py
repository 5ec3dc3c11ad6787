"""AutoAttack (Croce & Hein, ICML 2020, arXiv:2003.01690): the standard robustness evaluation.

An ensemble of parameter-free attacks run in sequence, each only on the points still
robust, as the reference does (fra31/auto-attack, `autoattack.py`; pyautoattack 0.2.0):

  * "standard": APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries);
  * "plus": APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts, Square, APGD-T, FAB-T;
  * "rand" (randomized defenses): APGD-CE and APGD-DLR with EOT over 20 samples. jaxadv's
    models are deterministic functions of (params, x), so the 20 EOT gradients would be
    equal; one is computed (the reference's result for a deterministic model).

After each attack the model is re-evaluated on its output and only points it
misclassifies are counted as broken (the reference's rule); a point's adversarial example
is the first attack's that broke it, and points never broken are returned as x. The
reference's sanity flags are computed and returned: a randomized model, probabilities
instead of logits, zero gradients, Square beating the white-box attacks, and hard checks
of the budget, the box and NaNs.

Speed: with `early_exit=True` every attack stops iterating a point once it is fooled
(APGD, FAB) and APGD-T / FAB-T's targets are tried on the points still robust only, which
keeps every verdict (a point is broken iff some iterate of some attack fools it within
eps) but returns other adversarial examples. Square always drops fooled points, as in the
reference. Keys are folded per point (`example_keys`) and per attack, so the result does
not depend on batch size or sharding, except with `square_window="batch"` (the
reference's shared windows).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks import _core
from jaxadv.attacks.apgd import apgd, apgd_t, dlr_loss
from jaxadv.attacks.fab import fab, fab_t
from jaxadv.attacks.square import margin, square
from jaxadv.types import ApplyFn, Array, Params, PRNGKey

VERSIONS = ("standard", "plus", "rand")


def ensemble(version: str, n_classes: int, *, n_iter: int = 100, n_queries: int = 5000,
             square_window: str = "image") -> list[tuple[str, Callable, dict]]:  # fmt: skip
    """The reference's attacks and settings for `version`, in order: [(name, attack, kwargs)]."""
    targets = min(9, n_classes - 1)
    apgd_ce = ("apgd-ce", apgd, dict(loss="ce", n_iter=n_iter, n_restarts=1))
    sq = ("square", square, dict(n_queries=n_queries, n_restarts=1, window=square_window))
    if version == "standard":
        return [apgd_ce, ("apgd-t", apgd_t, dict(n_target_classes=targets, n_iter=n_iter, n_restarts=1)),
                ("fab-t", fab_t, dict(n_target_classes=targets, n_iter=n_iter, n_restarts=1)), sq]  # fmt: skip
    if version == "plus":
        return [("apgd-ce", apgd, dict(loss="ce", n_iter=n_iter, n_restarts=5)),
                ("apgd-dlr", apgd, dict(loss="dlr", n_iter=n_iter, n_restarts=5)),
                ("fab", fab, dict(n_iter=n_iter, n_restarts=5)), sq,
                ("apgd-t", apgd_t, dict(n_target_classes=targets, n_iter=n_iter, n_restarts=1)),
                ("fab-t", fab_t, dict(n_target_classes=targets, n_iter=n_iter, n_restarts=1))]  # fmt: skip
    if version == "rand":
        return [apgd_ce, ("apgd-dlr", apgd, dict(loss="dlr", n_iter=n_iter, n_restarts=1))]
    raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")


# ---------------------------------------------------------------------------------------
# Sanity flags (the reference's checks.py)
# ---------------------------------------------------------------------------------------


def sanity_flags(apply_fn, params, x, y) -> dict:
    """Flags computed before attacking, on the first (up to) 250 points.

    randomized: five forward passes disagree (max L2 distance of the row-normalized logits
      above 1e-4, or a different number of correct predictions);
    probabilities: the outputs lie in [0, 1] and sum to 1 (softmax passed instead of logits);
    zero_gradients: points whose DLR-loss gradient is exactly zero (the attacks cannot see them).

    The five passes run the model compiled, as every attack does, from two separate traces
    of the same forward program (`_logits_again`, then `_core.logits` four times): randomness
    drawn on the host while tracing differs between the traces, and randomness at run time
    (a host callback, or a model that reads a changing key) between calls; a deterministic
    model gives identical logits. Op-by-op passes would catch the same, but compiling each
    op of the model one by one cost ~2 s of a cold start.
    """
    x = x[:250].astype(jnp.float32)
    y = y[:250]
    k = _core.num_classes(apply_fn, params, x)
    outs = [np.asarray(_logits_again(apply_fn, params, x), np.float64)]
    outs += [np.asarray(_core.logits(apply_fn, params, x), np.float64) for _ in range(4)]
    normed = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outs]
    diff = max(float(np.max(np.linalg.norm(a - b, axis=1))) for i, a in enumerate(normed) for b in normed[i + 1:])
    n_correct = [int(np.sum(o.argmax(1) == np.asarray(y))) for o in outs]
    o = outs[0]
    probabilities = bool(o.max() < 1 + 1e-5 and o.min() > -1e-5 and np.all(np.abs(o.sum(-1) - 1) < 1e-5))
    zero = 0
    if k >= 3:  # on the points the attacks will see: the correctly classified ones
        correct = o.argmax(1) == np.asarray(y)
        zero = int(np.sum(np.asarray(_zero_grad_kernel(apply_fn, params, x, y)) & correct))
    return {"randomized": bool(diff > 1e-4 or len(set(n_correct)) > 1), "probabilities": probabilities,
            "zero_gradients": zero, "n_classes": k}  # fmt: skip


def _zero_grad(apply_fn, params, x, y):
    g = jax.grad(lambda z: jnp.sum(dlr_loss(apply_fn(params, z), y)))(x)
    return jnp.sum(jnp.abs(g).reshape(x.shape[0], -1), axis=1) == 0


# The forward program of `_core.logits` under another function object: jit traces it anew.
_logits_again = _core.kernel(lambda apply_fn, params, x: _core._logits(apply_fn, params, x))


_zero_grad_kernel = _core.kernel(_zero_grad)


def hard_checks(x, x_adv, eps, norm, clip_min, clip_max) -> dict:
    """The budget, the box and finiteness of the returned examples."""
    d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
    d = d.reshape(len(d), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    a = np.asarray(x_adv)
    return {"max_perturbation": float(size.max(initial=0.0)), "within_eps": bool(np.all(size <= eps + 1e-5)),
            "within_box": bool(a.min() >= clip_min - 1e-6 and a.max() <= clip_max + 1e-6),
            "nan": bool(np.isnan(a).any())}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The ensemble loop
# ---------------------------------------------------------------------------------------


def run_attack(name, fn, kwargs, apply_fn, params, x, y, keys, *, eps, norm, early_exit, clip_min, clip_max):
    """One attack of the ensemble on a batch of robust points: (x_adv, broken bool, target, passes)."""
    kw = dict(kwargs, eps=eps, norm=norm, clip_min=clip_min, clip_max=clip_max, return_info=True)
    if "square" not in name:
        kw["early_exit"] = early_exit
    x_adv, info = fn(apply_fn, params, x, y, key=keys, **kw)
    broken = _core.predict(apply_fn, params, x_adv) != np.asarray(y)  # the reference re-evaluates and trusts only this
    target = np.asarray(info.get("target", np.full(len(y), -1)))
    return x_adv, broken, np.where(broken, target, -1), info["passes"]


def new_record(n: int) -> dict:
    """The per-point record of an evaluation of n points."""
    return {"robust": np.zeros(n, bool), "clean_correct": np.zeros(n, bool), "broken_by": np.full(n, "", object),
            "target": np.full(n, -1, np.int32), "norm": np.zeros(n, np.float32), "margin": np.zeros(n, np.float32)}


def autoattack_batch(apply_fn, params, x, y, keys, attacks, *, eps, norm, early_exit, clip_min, clip_max,
                     log=lambda s: None) -> tuple[Array, dict, list]:  # fmt: skip
    """All attacks on one batch in order, each on the points still robust."""
    x = x.astype(jnp.float32)
    rec = new_record(x.shape[0])
    pred = _core.predict(apply_fn, params, x)
    rec["clean_correct"] = pred == np.asarray(y)
    rec["robust"] = rec["clean_correct"].copy()
    out = x
    table = []
    for a_i, (name, fn, kwargs) in enumerate(attacks):
        t0 = time.perf_counter()
        rows = np.flatnonzero(rec["robust"])
        if rows.size == 0:
            table.append({"name": name, "newly_broken": 0, "robust": 0, "passes": {}, "seconds": 0.0})
            continue
        size, idx = _core.active_index(rec["robust"], x.shape[0])
        idx = jnp.arange(x.shape[0], dtype=jnp.int32) if idx is None else idx
        sub_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, a_i)
        xs, ys, ks = _core.gather_rows((x, y, sub_keys), idx, size=size)
        x_adv, broken, target, passes = run_attack(name, fn, kwargs, apply_fn, params, xs, ys, ks, eps=eps, norm=norm,
                                                   early_exit=early_exit, clip_min=clip_min,
                                                   clip_max=clip_max)  # fmt: skip
        idx_np = np.asarray(idx)
        ok = (idx_np < x.shape[0]) & broken
        ok &= rec["robust"][np.minimum(idx_np, x.shape[0] - 1)]
        hit = idx_np[ok]
        out = out.at[hit].set(x_adv[np.flatnonzero(ok)].astype(jnp.float32))
        rec["robust"][hit] = False
        rec["broken_by"][hit] = name
        rec["target"][hit] = target[ok]
        table.append({"name": name, "newly_broken": int(hit.size), "robust": int(rec["robust"].sum()),
                      "attacked": int(rows.size), "passes": passes, "seconds": time.perf_counter() - t0})
        log(f"{name}: {hit.size} newly broken, {int(rec['robust'].sum())} robust")
    delta = np.asarray(out - x).reshape(x.shape[0], -1)
    rec["norm"] = (np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)).astype(np.float32)
    rec["margin"] = np.asarray(margin(_core.logits(apply_fn, params, out), y))
    return out, rec, table


@_core.attack(name="autoattack", smoke={"n_iter": 4, "n_queries": 12}, norms=("linf", "l2"), randomized=True, paper="Croce & Hein 2020, arXiv:2003.01690")
def autoattack(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    eps: float | Array,
    norm: str = "linf",
    version: str = "standard",
    early_exit: bool = False,
    square_window: str = "image",
    n_iter: int = 100,
    n_queries: int = 5000,
    return_info: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
):
    """AutoAttack on a batch: x_adv (x where nothing succeeded), or (x_adv, info) with `return_info`.

    Args:
      apply_fn, params, x, y: the classifier (logits, not probabilities) and the points.
      key: one PRNG key, or one per point (e.g. `fold_in(root, index)`): the result then
        does not depend on how points are batched.
      eps: the budget, required (no silent default), in pixels of the box.
      norm: "linf" or "l2".
      version: "standard", "plus" or "rand" (see the module docstring).
      early_exit: stop each attack on a point once it is fooled (same verdicts, fewer passes).
      square_window: "image" (default) or "batch" (the reference's shared windows).
      n_iter: APGD and FAB iterations (100); n_queries: Square's queries (5,000).
      return_info: also return the per-point record ("robust", "clean_correct",
        "broken_by", "target", "norm", "margin"), the per-attack table ("name",
        "newly_broken", "robust", "passes", "seconds") and the sanity "flags".

    Returns:
      x_adv (the dtype of x) or (x_adv, info).
    """
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, eps=eps, norm=norm,
                       norms=("linf", "l2"))  # fmt: skip
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    _core.require_key(key, "autoattack")
    k = _core.num_classes(apply_fn, params, x)
    if k < 4:
        raise ValueError(f"autoattack needs at least 4 classes (APGD-T's targeted DLR loss), the model has {k}")
    attacks = ensemble(version, k, n_iter=n_iter, n_queries=n_queries, square_window=square_window)
    out, rec, table = autoattack_batch(apply_fn, params, x, y, _core.example_keys(key, x), attacks, eps=eps,
                                       norm=norm, early_exit=early_exit, clip_min=clip_min,
                                       clip_max=clip_max)  # fmt: skip
    x_adv = out.astype(x.dtype)
    if not return_info:
        return x_adv
    flags = sanity_flags(apply_fn, params, x, y)
    flags.update(hard_checks(x, x_adv, float(eps), norm, clip_min, clip_max))
    flags["square_beats_white_box"] = square_gain(table, x.shape[0]) > 0.002
    return x_adv, {"record": rec, "attacks": table, "flags": flags}


def square_gain(table: list[dict], n: int) -> float:
    """Fraction of all points Square broke after the white-box attacks before it (the reference
    flags > 0.002: the gradient-based attacks are then likely fooled by the model)."""
    names = [t["name"] for t in table]
    if "square" not in names or names.index("square") == 0:
        return 0.0
    return table[names.index("square")]["newly_broken"] / max(n, 1)
