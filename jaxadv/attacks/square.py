"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, arXiv:1912.00049), L-inf and L2.

A score-based (gradient-free) attack: random square updates at the corners of the eps
ball (L-inf) or redistributing the L2 mass of windows (L2), accepted when the margin
loss drops. A port of the AutoAttack reference (`square.py`): the same initialization
(vertical stripes; L2's "meta pseudo-Gaussian" tiles), the p schedule (p_init halved at
iterations 10, 50, 200, 500, 1000, 2000, 4000, ...), window sides from
round(sqrt(p h w)) with Python's round-half-to-even, window corners in [0, h - s), the
acceptance rule (lower margin, or misclassified), and points leaving the batch once
fooled. Queries are counted exactly: one forward pass per point for the start, then one
per iteration the point is still active, for n_queries iterations (the reference's loop;
until 2026-11-29 jaxadv ran n_queries - 1, the Square paper's count).

`window` chooses how the squares are drawn:
  * "image" (default; the Square paper): every image draws its own window and signs, so a
    point's result does not depend on which other points share its batch;
  * "batch" (the AutoAttack reference): one window (and for L-inf one sign per channel)
    per iteration, shared by every image still attacked, so results depend on batching.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks import _core
from jaxadv.attacks._core import bcast
from jaxadv.types import ApplyFn, Array, Params, PRNGKey

WINDOWS = ("image", "batch")


def p_selection(p_init: float, it: int) -> float:
    """The fraction of pixels a square covers at iteration `it` (the reference's schedule)."""
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):  # fmt: skip
        if it <= bound:
            return p_init / div
    return p_init / 512


def window_side(p: float, h: int, w: int, norm: str) -> int:
    """Side of the square (the reference's integers: L2 sides are odd and at least 3)."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += s % 2 == 0
    return min(s, h, w)


def eta_rectangles(x: int, y: int) -> np.ndarray:
    """The reference's concentric-rectangle profile of an x-by-y block, unit Frobenius norm."""
    delta = np.zeros((x, y), np.float32)
    x_c, y_c = x // 2 + 1, y // 2 + 1
    r0, c0 = x_c - 1, y_c - 1
    for k in range(max(x_c, y_c)):
        delta[max(r0, 0):min(r0 + 2 * k + 1, x), max(c0, 0):min(c0 + 2 * k + 1, y)] += 1.0 / (k + 1) ** 2
        r0, c0 = r0 - 1, c0 - 1
    return delta / np.sqrt(np.sum(delta**2))


def eta(s: int) -> np.ndarray:
    """The L2 window pattern: +rectangles on the top half, -rectangles on the bottom, unit norm."""
    delta = np.zeros((s, s), np.float32)
    delta[: s // 2] = eta_rectangles(s // 2, s)
    delta[s // 2:] = -eta_rectangles(s - s // 2, s)
    return delta / np.sqrt(np.sum(delta**2))


def margin(logits: Array, y: Array) -> Array:
    """z_y - max_{j != y} z_j, f32[B]: the loss Square minimizes; <= 0 means fooled."""
    z = logits.astype(jnp.float32)
    zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=jnp.bool_), -jnp.inf, z), axis=-1)
    return zy - other


def _draws(keys, it, shape, window, s, norm):
    """Per-example (or batch-shared) random draws of one iteration: corners, signs, transpose."""
    h, w, c = shape

    def one(k):
        k = jax.random.fold_in(k, it)
        kv, kw, kv2, kw2, ks, kt = jax.random.split(k, 6)
        corner = lambda kk, n: jnp.floor(jax.random.uniform(kk) * jnp.asarray(n - s, jnp.float32)).astype(jnp.int32)  # noqa: E731
        signs = jnp.sign(2.0 * jax.random.uniform(ks, (c,)) - 1.0)
        return corner(kv, h), corner(kw, w), corner(kv2, h), corner(kw2, w), signs, jax.random.uniform(kt) > 0.5

    if window == "batch":
        shared = one(keys[0])
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (keys.shape[0], *jnp.shape(a))), shared)
    return jax.vmap(one)(keys)


def _window_mask(vh, vw, s, h, w):
    rows = (jnp.arange(h) >= vh) & (jnp.arange(h) < vh + s)
    cols = (jnp.arange(w) >= vw) & (jnp.arange(w) < vw + s)
    return (rows[:, None] & cols[None, :])[:, :, None]


def _proposal_linf(x0, x_best, keys, it, s, eps, lo, hi, *, window):
    h, w, c = x0.shape[1:]
    vh, vw, _, _, signs, _ = _draws(keys, it, (h, w, c), window, s, "linf")
    masks = jax.vmap(lambda a, b: _window_mask(a, b, s, h, w))(vh, vw)  # [B,h,w,1]
    x_new = jnp.where(masks, x_best + 2.0 * eps * signs[:, None, None, :], x_best)
    return jnp.clip(jnp.clip(x_new, x0 - eps, x0 + eps), lo, hi)


def eta_table(h: int, w: int) -> np.ndarray:
    """eta(s) for every odd side s <= min(h, w), zero-padded to [n, smax, smax]; row (s - 3) // 2 holds side s."""
    smax = min(h, w)
    sides = list(range(3, smax + 1, 2))
    table = np.zeros((max(len(sides), 1), smax, smax), np.float32)
    for i, s in enumerate(sides):
        table[i, :s, :s] = eta(s)
    return table


def _proposal_l2(x0, x_best, keys, it, s, eps, lo, hi, table, *, window):
    """The reference's L2 update with a traced side s: every window is a mask of the full image."""
    h, w, c = x0.shape[1:]
    smax = table.shape[-1]
    vh, vw, vh2, vw2, signs, transpose = _draws(keys, it, (h, w, c), window, s, "l2")
    base = table[(s - 3) // 2]

    def one(x0, xb, vh, vw, vh2, vw2, sg, tr):
        delta = xb - x0
        m1, m2 = _window_mask(vh, vw, s, h, w), _window_mask(vh2, vw2, s, h, w)
        canvas = jax.lax.dynamic_update_slice(jnp.zeros((h + smax, w + smax), jnp.float32),
                                              jnp.where(tr, base.T, base), (vh, vw))[:h, :w]  # fmt: skip
        win1 = jnp.where(m1, delta, 0.0)
        n_win1 = jnp.sqrt(jnp.sum(win1**2, axis=(0, 1)))  # [c]
        n_img = jnp.sqrt(jnp.sum(delta**2))
        n_wins = jnp.sqrt(jnp.sum(jnp.where(m1 | m2, delta, 0.0) ** 2, axis=(0, 1)))
        nd = canvas[:, :, None] * sg[None, None, :] + win1 / (1e-12 + n_win1)[None, None, :]
        scale = jnp.sqrt(jnp.maximum(eps**2 - n_img**2, 0.0) / c + n_wins**2)
        nd = nd / (1e-12 + jnp.sqrt(jnp.sum(nd**2, axis=(0, 1))))[None, None, :] * scale[None, None, :]
        delta = jnp.where(m1, nd, jnp.where(m2, 0.0, delta))  # W2 zeroed, then W1 written
        return jnp.clip(x0 + eps * delta / (jnp.sqrt(jnp.sum(delta**2)) + 1e-12), lo, hi)

    return jax.vmap(one)(x0, x_best, vh, vw, vh2, vw2, signs, transpose)


def _chunk(apply_fn, params, x0, y, x_best, m_best, queries, keys, its, sides, valid, eps, lo, hi, table, *, k, norm,
           window):  # fmt: skip
    """k iterations (a compiled loop, not unrolled: one iteration's program to compile) on the
    points still active: propose, query, accept if the margin drops or turns negative. A point
    fooled inside the chunk stops there, as in the reference."""

    def body(j, carry):
        x_best, m_best, queries = carry
        active = (m_best > 0) & valid[j]
        if norm == "linf":
            x_new = _proposal_linf(x0, x_best, keys, its[j], sides[j], eps, lo, hi, window=window)
        else:
            x_new = _proposal_l2(x0, x_best, keys, its[j], sides[j], eps, lo, hi, table, window=window)
        # A barrier: fused into the model's first layers, the proposal made each iteration ~11 %
        # slower than the forward pass alone (XLA:CPU, the study's CNN, 160 rows: 1.11x against 0.99x).
        m_new = margin(apply_fn(params, jax.lax.optimization_barrier(x_new)), y)
        accept = active & ((m_new < m_best) | (m_new <= 0))
        return (jnp.where(bcast(accept), x_new, x_best), jnp.where(accept, m_new, m_best),
                queries + active.astype(jnp.int32))  # fmt: skip

    return jax.lax.fori_loop(0, k, body, (x_best, m_best, queries))


def _init(apply_fn, params, x0, y, keys, eps, lo, hi, *, norm, window):
    """The start: vertical stripes of +-eps (L-inf) or tiled eta patterns on the eps sphere (L2)."""
    b, h, w, c = x0.shape
    if norm == "linf":
        stripes = jax.vmap(lambda k: jnp.sign(2.0 * jax.random.uniform(jax.random.fold_in(k, 1_000_000), (1, w, c)) - 1.0))(
            keys)  # fmt: skip
        x_best = jnp.clip(x0 + eps * stripes, lo, hi)
    else:
        x_best = jnp.clip(x0 + eps * _l2_tiles(keys, (h, w, c), window), lo, hi)
    return x_best, margin(apply_fn(params, x_best), y)


def _tile_layout(h: int, w: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The reference's tiling of the L2 start (side h // 5, non-overlapping, in row-major order):
    (side, tile index of each pixel or -1, row and column inside its tile)."""
    s = h // 5
    sp = (h - 5 * s) // 2
    tile = np.full((h, w), -1, np.int32)
    ti, tj = np.zeros((h, w), np.int32), np.zeros((h, w), np.int32)
    n = 0
    for vh in range(sp, sp + s * (h // s), s):
        for vw in range(sp, sp + s * (w // s), s):
            if vh + s > h or vw + s > w:
                continue
            tile[vh:vh + s, vw:vw + s] = n
            ti[vh:vh + s, vw:vw + s] = np.arange(s)[:, None]
            tj[vh:vh + s, vw:vw + s] = np.arange(s)[None, :]
            n += 1
    return s, tile, ti, tj


def _l2_tiles(keys, shape, window):
    """The L2 start's direction: every tile an eta pattern (transposed at random) with a random
    sign per channel, unit norm per image. All tiles are drawn at once (tile n, counted from 1,
    from fold_in(key, 1_000_000 + n), as the reference's loop draws them one by one)."""
    h, w, c = shape
    s, tile, ti, tj = _tile_layout(h, w)
    base = jnp.asarray(eta(s))
    ns = jnp.arange(1, int(tile.max()) + 2, dtype=jnp.uint32)
    draw = lambda k: jax.vmap(lambda n: jax.random.split(jax.random.fold_in(k, 1_000_000 + n), 2))(ns)  # noqa: E731
    drawn = jax.vmap(draw)(keys)  # [B, T, 2] keys
    src = drawn[:1] if window == "batch" else drawn  # "batch": the first image's transposes for all
    tr = jax.vmap(jax.vmap(lambda q: jax.random.uniform(q[1]) > 0.5))(src)  # [B', T]
    sg = jax.vmap(jax.vmap(lambda q: jnp.sign(2.0 * jax.random.uniform(q[0], (c,)) - 1.0)))(drawn)  # [B, T, c]
    pats = jnp.where(tr[:, :, None, None], base.T[None, None], base[None, None])  # [B', T, s, s]
    at = np.maximum(tile, 0)
    pix = pats[:, at, ti, tj]  # [B', h, w]
    delta = jnp.where(jnp.asarray(tile >= 0)[None, :, :, None], pix[..., None] * sg[:, at, :], 0.0)
    return delta / bcast(jnp.sqrt(jnp.sum(delta**2, axis=(1, 2, 3))) + 1e-12)


_init_kernel = _core.kernel(_init, static=("norm", "window"))
_chunk_kernel = _core.kernel(_chunk, static=("k", "norm", "window"))
CHUNK = 10  # iterations per compiled call: fewer host round trips; points still leave the batch every chunk


def run(apply_fn, params, x, y, keys, *, eps, norm, n_queries, p_init, window, clip_min, clip_max, counter=None):
    """One Square run: (best point, its margin, queries per point). Points leave once fooled."""
    lo, hi = jnp.float32(clip_min), jnp.float32(clip_max)
    eps = jnp.asarray(eps, jnp.float32)
    x0 = x.astype(jnp.float32)
    b, h, w, _ = x0.shape
    x_best, m_best = _init_kernel(apply_fn, params, x0, y, keys, eps, lo, hi, norm=norm, window=window)
    table = jnp.asarray(eta_table(h, w)) if norm == "l2" else jnp.zeros((1, 1, 1), jnp.float32)
    state = (x0, y, x_best, m_best, jnp.ones(b, jnp.int32), keys)
    n_it = n_queries  # the reference loops `for i_iter in range(n_queries)` after its start query
    for it0 in range(0, n_it, CHUNK):
        active = np.asarray(state[3]) > 0
        if not active.any():
            break
        its = [it0 + j for j in range(CHUNK)]
        sides = jnp.asarray([window_side(p_selection(p_init, i), h, w, norm) for i in its], jnp.int32)
        valid = jnp.asarray([i < n_it for i in its])
        size, idx = _core.active_index(active, b)
        sub = state if idx is None else _core.gather_rows(state, idx, size=size)
        out = _chunk_kernel(apply_fn, params, *sub[:5], sub[5], jnp.asarray(its, jnp.int32), sides, valid, eps, lo, hi,
                            table, k=CHUNK, norm=norm, window=window)  # fmt: skip
        if idx is None:
            state = (x0, y, *out, keys)
        else:
            state = (x0, y, *_core.scatter_rows(state[2:5], out, idx), keys)
    queries = np.asarray(state[4]).astype(np.int64)
    if counter is not None:
        counter["forward"] = counter.get("forward", 0) + int(queries.sum())
    return state[2], state[3], queries


@_core.attack(name="square", smoke={"n_queries": 30}, norms=("linf", "l2"), randomized=True,
              paper="Andriushchenko et al. 2020, arXiv:1912.00049")  # fmt: skip
def square(
    apply_fn: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    key: PRNGKey | None = None,
    eps: float | Array,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    n_restarts: int = 1,
    window: str = "image",
    return_info: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
):
    """Square Attack on the margin loss, untargeted (AutoAttack's settings by default).

    Args:
      apply_fn, params, x, y, key, eps, norm, clip_min, clip_max: as for every attack.
      n_queries: iterations per point per restart after the start (AutoAttack: 5000); a
        point never fooled costs n_queries + 1 forward passes, as in the reference, whose
        loop runs `range(n_queries)` after its start query.
      p_init: the initial fraction of pixels a square covers (0.8).
      n_restarts: runs, each on the points no earlier run fooled.
      window: "image" (one window per image; the default, batch-independent) or "batch"
        (one window per iteration for the whole batch, as the AutoAttack reference).
      return_info: also return {"fooled": bool[B], "queries": int[B], "passes": {...}}.

    Returns:
      x_adv (points not fooled: their best point; points misclassified at x: x), or
      (x_adv, info).
    """
    _core.check_inputs(apply_fn, params, x, y, clip_min=clip_min, clip_max=clip_max, eps=eps, norm=norm,
                       norms=("linf", "l2"))  # fmt: skip
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"n_queries must be an int >= 1, got {n_queries!r}")
    if norm == "l2" and min(x.shape[1:3]) < 5:
        raise ValueError(f"square with norm='l2' needs images of at least 5x5 pixels, got {tuple(x.shape[1:3])}")
    _core.require_key(key, "square")
    keys = _core.example_keys(key, x)
    counter = {"forward": 1 * x.shape[0]}
    x0 = x.astype(jnp.float32)
    fooled = _core.predict(apply_fn, params, x0) != np.asarray(y)
    out, queries = x0, np.zeros(x.shape[0], np.int64)
    for r in range(n_restarts):
        todo = ~fooled
        if not todo.any():
            break
        size, idx = _core.active_index(todo, x.shape[0])
        idx = jnp.arange(x.shape[0], dtype=jnp.int32) if idx is None else idx
        run_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
        sub = _core.gather_rows((x0, y, run_keys), idx, size=size)
        xb, mb, q = run(apply_fn, params, *sub, eps=eps, norm=norm, n_queries=n_queries, p_init=p_init, window=window,
                        clip_min=clip_min, clip_max=clip_max, counter=counter)  # fmt: skip
        rows_all = np.asarray(idx)
        real = (rows_all < x.shape[0]) & todo[np.minimum(rows_all, x.shape[0] - 1)]  # padding, or done before
        rows = rows_all[real]
        out = out.at[rows].set(xb[np.flatnonzero(real)])
        queries[rows] += q[real]
        fooled[rows] |= np.asarray(mb)[real] <= 0
    x_adv = out.astype(x.dtype)
    return (x_adv, {"fooled": fooled, "queries": queries, "passes": counter}) if return_info else x_adv

