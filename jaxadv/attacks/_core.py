"""The attack contract: metadata, input checks, per-example keys and the one jit policy.

Every attack in jaxadv is a function

    attack(apply_fn, params, x, y, *, key=None, **hyperparameters) -> x_adv

with `x_adv` of `x`'s shape and dtype, inside the box [clip_min, clip_max]. Budgeted
attacks take `eps` (the only hyperparameter without a default); minimum-norm attacks
(DeepFool, later CW and FAB) take none and, with `return_info=True`, return
`(x_adv, MinNormInfo)` with per-example statistics. `@attack(...)` attaches an
`AttackMeta` record to the function (what the contract test, the CLI, the evaluation layer
and the harness read); `REGISTRY` in `jaxadv.attacks` maps names to these functions.

Jit policy, in one place: an attack's traced body is compiled by `kernel(fn, static)`,
which marks `apply_fn` and the attack's own shape-changing hyperparameters static and
everything else (params, eps, step sizes, the box) traced, so new params or a new eps
never recompile. Called inside a caller's jit (an adversarial-training step), the compiled
kernel simply inlines.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import validate
from jaxadv.types import Array, PRNGKey

NORMS = ("linf", "l2")


@dataclasses.dataclass(frozen=True)
class AttackMeta:
    """What callers need to know about an attack besides its signature.

    Attributes:
      name: registry name.
      norms: values its `norm` hyperparameter accepts (the first is the default).
      minimum_norm: True if it takes no `eps` and measures the smallest perturbation it
        finds; it then accepts `return_info=True`.
      randomized: True if it draws random numbers (then `key` is required).
      paper: the reference it follows.
      smoke: hyperparameters that make it cheap enough for the contract test on tiny
        inputs (fewer iterations or queries), as ((name, value), ...).
    """

    name: str
    norms: tuple[str, ...]
    minimum_norm: bool = False
    randomized: bool = False
    paper: str = ""
    smoke: tuple = ()

    def defaults(self, fn: Callable) -> dict:
        """The documented default of every keyword hyperparameter of `fn`."""
        sig = inspect.signature(fn)
        return {k: p.default for k, p in sig.parameters.items()
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and k not in ("key", "return_info")}


def attack(*, name: str, norms: tuple[str, ...] = NORMS, minimum_norm: bool = False, randomized: bool = False,
           paper: str = "", smoke: dict | None = None) -> Callable[[Callable], Callable]:
    """Decorator that attaches `AttackMeta` to a public attack function as `fn.meta`."""

    def wrap(fn: Callable) -> Callable:
        fn.meta = AttackMeta(name=name, norms=tuple(norms), minimum_norm=minimum_norm, randomized=randomized,
                             paper=paper, smoke=tuple(sorted((smoke or {}).items())))  # fmt: skip
        return fn

    return wrap


def meta(fn: Callable) -> AttackMeta:
    """`fn.meta`, or a plain budgeted L-inf attack for a user's undecorated function."""
    return getattr(fn, "meta", None) or AttackMeta(name=getattr(fn, "__name__", "attack"), norms=("linf",))


class MinNormInfo(NamedTuple):
    """Per-example statistics of a minimum-norm attack, for a batch of B examples.

    Attributes:
      iterations: int32[B] steps taken (the limit if the attack never succeeded).
      success: bool[B] whether the prediction at x_adv differs from the reference class.
      norm: f32[B] `||x_adv - x||` in the attack's norm.
    """

    iterations: Array
    success: Array
    norm: Array


def kernel(fn: Callable, static: tuple[str, ...] = ()) -> Callable:
    """The compiled form of an attack's traced body: `apply_fn` and `static` are static.

    This is the only place attacks are jitted. `jax.jit` caches the compiled program per
    static values and input shapes; a kernel called under an outer jit is inlined.
    """
    return jax.jit(fn, static_argnames=("apply_fn",) + tuple(static))


def _logits(apply_fn, params, x):
    return apply_fn(params, x.astype(jnp.float32)).astype(jnp.float32)


logits = kernel(_logits)  # f32[B,K] logits, compiled: host drivers never run the model op by op


def predict(apply_fn, params, x) -> np.ndarray:
    """int[B]: the predicted classes, on the host (the argmax in NumPy, not one more small
    compiled program per batch size)."""
    return np.asarray(logits(apply_fn, params, x)).argmax(-1)


# ---------------------------------------------------------------------------------------
# Input checks (host side, before tracing)
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _num_classes(apply_fn, treedef, leaf_specs, image_spec) -> int:
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_specs])
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *image_spec[0]), image_spec[1]))
    if len(out.shape) != 2:
        raise ValueError(f"apply_fn must return logits of shape [B, K], got {tuple(out.shape)}")
    return int(out.shape[-1])


def num_classes(apply_fn: Callable, params: Any, x: Any) -> int:
    """K, the number of logits `apply_fn(params, x)` returns (shape inference only, cached)."""
    leaves, treedef = jax.tree.flatten(params)
    specs = tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)
    # Attacks feed the model float32 whatever the input dtype (see each attack's body).
    return _num_classes(apply_fn, treedef, specs, (tuple(np.shape(x)[1:]), jnp.float32))


def check_inputs(apply_fn, params, x, y, *, clip_min, clip_max, eps=None, norm=None, norms=NORMS,
                 y_required=True) -> None:  # fmt: skip
    """One-line `ValueError`s for every malformed input an attack can be given.

    Checks the image batch (rank, dtype, range), the labels (rank, batch size, dtype and
    `0 <= y < K`, with K from the model's output shape), `eps` and `norm`. Values are
    inspected only when concrete, so the attacks stay callable under a caller's jit.
    """
    if norm is not None and norm not in norms:
        raise ValueError(f"norm must be one of {norms}, got {norm!r}")
    validate.check_images(x, value_range=(clip_min, clip_max))
    if eps is not None:
        validate.check_eps(eps)
    if y is None:
        if y_required:
            raise ValueError("y (int labels [B]) is required")
        return
    validate.check_labels(y, x)
    if validate.is_concrete(y):
        k = num_classes(apply_fn, params, x)
        y_max = int(np.max(np.asarray(jax.device_get(y))))
        if y_max >= k:
            raise ValueError(f"y holds label {y_max}, but the model has {k} classes (labels must be in [0, {k}))")


# ---------------------------------------------------------------------------------------
# Per-example randomness
# ---------------------------------------------------------------------------------------


def _as_typed(key) -> PRNGKey:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)  # a legacy uint32[2] (or [B,2]) key


def content_hash(x: Array) -> Array:
    """uint32[B]: a hash of each example's bits (position-weighted, so permutations differ)."""
    flat = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(x.shape[0], -1)
    mult = (jnp.arange(flat.shape[1], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x9E3779B1)
    return jnp.sum(flat * mult[None, :], axis=1, dtype=jnp.uint32)


def example_keys(key, x: Array) -> PRNGKey:
    """One PRNG key per example, never depending on how the batch was formed.

    Args:
      key: a single key, or a batch of B keys (e.g. `fold_in(root, dataset_index)`, what
        the evaluation layer passes). A single key is folded with a hash of each example's
        content, so splitting, reordering or padding a batch leaves every example's
        randomness unchanged.
      x: f[B,...] the examples.

    Returns:
      typed key array of shape [B].
    """
    key = _as_typed(key)
    if key.shape == (x.shape[0],):
        return key
    if key.shape != ():
        raise ValueError(f"key must be one PRNG key or one per example ({x.shape[0]}), got shape {key.shape}")
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, content_hash(x))


# XLA:CPU takes ~0.5 s to compile a threefry draw of an image's shape (2-core CPU, jax 0.10),
# for every batch size it sees; drawn in chunks of this many keys, one program serves them all.
RNG_ROWS = 32


@functools.partial(jax.jit, static_argnames=("shape", "dist"))
def _draw_rows(keys, shape, dist):
    draw = jax.random.uniform if dist == "uniform" else jax.random.normal
    return jax.vmap(lambda k: draw(k, shape, jnp.float32))(keys)


def random_rows(keys: PRNGKey, shape: tuple[int, ...], dist: str) -> Array:
    """f32[B, *shape]: for each of the B keys one draw of `shape`, uniform in [0, 1) or
    standard normal (`dist`): the values of `vmap(lambda k: draw(k, shape))(keys)`, computed
    RNG_ROWS keys at a time so that every batch size runs the same compiled program (under
    a caller's jit, where the keys are traced, in one draw)."""
    keys = _as_typed(keys)
    if not validate.is_concrete(keys):
        return _draw_rows(keys, tuple(shape), dist)
    n = keys.shape[0]
    data = np.asarray(jax.random.key_data(keys))
    impl = jax.random.key_impl(keys)
    data = np.concatenate([data, np.repeat(data[:1], -n % RNG_ROWS, axis=0)])
    parts = [_draw_rows(jax.random.wrap_key_data(jnp.asarray(data[i:i + RNG_ROWS]), impl=impl), tuple(shape), dist)
             for i in range(0, data.shape[0], RNG_ROWS)]  # fmt: skip
    return jnp.asarray(np.concatenate([np.asarray(p) for p in parts])[:n])


def require_key(key, name: str) -> None:
    if key is None:
        raise ValueError(f"{name} is randomized and needs a PRNG key: pass key=jax.random.key(...)")


# ---------------------------------------------------------------------------------------
# Compaction: host drivers step only the examples still active, in a few fixed sizes
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("size",))
def gather_rows(tree, idx, size):
    """Rows `idx` (int32[size], padded with an out-of-range index) of every leaf."""
    del size  # static: one compile per bucket size
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), tree)


@jax.jit
def scatter_rows(tree, sub, idx):
    """Write the rows of `sub` back at `idx`; padded (out-of-range) indices are dropped."""
    return jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), tree, sub)


def bucket(count: int, batch: int) -> int:
    """The compiled sub-batch size for `count` >= 1 active examples.

    `count` rounded up to a multiple of max(8, 2^(floor(log2 count) - 2)): multiples of 8
    up to 64, then four sizes per doubling (80, 96, 112, 128, 160, ...), so padding adds
    fewer than 8 rows below 64 and under 25 % above; or the whole batch if that is no larger.
    Each size compiles once (~1.3 s for the study's CNN on CPU): 12 sizes for a batch of
    128, 24 for 1024. Measured at batch 128 (2-core CPU, trained CNN, timed in turn):
    1.21x the speed of power-of-two sizes. Until 2026-11-29 any size above 3/4 of the batch
    ran the whole batch instead; that stepped up to a third more rows than needed (the
    reference-like AutoAttack flow stepped all 1,000 points of a batch with 703 robust),
    for less gathering than a step of the CNN costs.
    """
    step = max(8, 1 << max(count.bit_length() - 3, 0))
    size = -(-count // step) * step
    return min(size, batch)


def active_index(active: np.ndarray, batch: int) -> tuple[int, jax.Array | None]:
    """(compiled size, int32[size] row indices padded out of range) for the active rows,
    or (batch, None) when stepping the whole batch is as cheap."""
    count = int(active.sum())
    size = bucket(max(count, 1), batch)
    if size == batch:
        return batch, None
    return size, _padded(np.flatnonzero(active), size, batch)


def _padded(rows: np.ndarray, size: int, batch: int) -> jax.Array:
    """int32[size]: `rows`, then padding out of range (clipped on gather, dropped on scatter)."""
    idx = np.full(size, batch, np.int32)
    idx[: rows.size] = rows
    return jnp.asarray(idx)


# APGD and FAB run the rows they attack in micro-batches of this many rows per device, one
# after another, each to its end (each keeps its own compaction). XLA:CPU's forward+backward
# pass is fastest per image in small batches (2-core CPU, the study's CNN: ~1,500-1,800 img/s
# at batch 32 against ~1,000-1,200 at 256 and above), so on CPU the default is 32; on
# accelerators larger batches fill the device, so there the default is no split. Keys are
# per example, so the split changes no result (up to floating-point reassociation).
MICRO_BATCH: int | None = None  # None: 32 per device on CPU, no split elsewhere; 0: no split


def micro_batch() -> int:
    """Rows per micro-batch (0: no split); see MICRO_BATCH."""
    if MICRO_BATCH is None:
        return 32 * jax.device_count() if jax.default_backend() == "cpu" else 0
    return int(MICRO_BATCH)


def micro_batches(active: np.ndarray, batch: int) -> list[tuple[int, jax.Array | None]]:
    """`active_index` for each micro-batch of the active rows, in order: [(size, idx or None)].

    Full micro-batches of `micro_batch()` rows, then the rest in a bucket size (at most that
    many rows); one piece (as `active_index`) when there is no split or the rows fit in one."""
    rows = np.flatnonzero(active)
    m = micro_batch()
    if m <= 0 or rows.size <= m:
        return [active_index(active, batch)]
    pieces = []
    for start in range(0, rows.size, m):
        part = rows[start:start + m]
        size = min(bucket(part.size, batch), m)  # full pieces: exactly m rows (one compiled size)
        pieces.append((size, _padded(part, size, batch)))
    return pieces


def credit(out: Array, fooled: np.ndarray, broke_with: np.ndarray, idx: Array, ok: np.ndarray, adv: Array,
           todo: np.ndarray, label: int) -> Array:
    """Record one sub-batch's successes: the rows `idx` (padded) whose `ok` holds and that were
    still to do get `adv` in `out`, fooled True and broke_with `label` (the last two in place).

    Returns the new `out`; the write is one compiled scatter per sub-batch size."""
    b = fooled.size
    rows_all = np.asarray(idx)
    ok = ok & (rows_all < b) & todo[np.minimum(rows_all, b - 1)]  # padding, or done before
    fooled[rows_all[ok]] = True
    broke_with[rows_all[ok]] = label
    return scatter_rows(out, adv, jnp.asarray(np.where(ok, rows_all, b), jnp.int32))


# Early exit attacks APGD-T's and FAB-T's targets either in turn, as the reference does (each
# target on the points no earlier one broke), or all at once in one batch 9x as large (a point
# stops when one copy is fooled). Both keep every verdict. On XLA:CPU in turn is faster: larger
# batches run slower per image there (2-core CPU, PGD-trained CNN of the study, 240 points,
# 30 iterations: APGD-T 44.0 s at once -> 35.5 s in turn, FAB-T 63.4 -> 48.3 s, same points
# fooled). On accelerators the larger batch is the one that fills the device.
PARALLEL_TARGETS: bool | None = None  # None: at once on accelerators, in turn on CPU


def parallel_targets() -> bool:
    """Whether early exit attacks all targets in one batch (see PARALLEL_TARGETS)."""
    return jax.default_backend() != "cpu" if PARALLEL_TARGETS is None else bool(PARALLEL_TARGETS)


def group_active(done: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Rows still to step: not done, and (with `groups`) no row of the same group done.

    Groups tie together the copies of one point attacked towards several targets at once:
    the point is fooled as soon as one copy is. Group -1 marks padding (never active).
    """
    if groups is None:
        return ~done
    hit = np.zeros(int(groups.max(initial=-1)) + 2, bool)
    np.logical_or.at(hit, groups + 1, done)
    return ~hit[groups + 1] & (groups >= 0)


def replicate_targets(rows: np.ndarray, n_targets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each copy, target slot of each copy, group of each copy) for attacking every row
    towards `n_targets` targets in one batch, padded with group -1 to a bucket size."""
    m = rows.size * n_targets
    size = bucket(max(m, 1), 1 << 30)
    rep = np.repeat(rows, n_targets)
    slot = np.tile(np.arange(n_targets), rows.size)
    group = np.repeat(np.arange(rows.size), n_targets)
    pad = size - m
    return (np.concatenate([rep, np.repeat(rep[-1:], pad)]), np.concatenate([slot, np.zeros(pad, slot.dtype)]),
            np.concatenate([group, np.full(pad, -1)]))  # fmt: skip


def first_success(fooled: np.ndarray, slot: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """For each group, the index of its fooled copy with the lowest target slot (-1: none).

    The reference tries targets in turn and keeps the first that succeeds."""
    best = np.full(n_groups, -1)
    order = np.lexsort((slot, group))
    for i in order:
        if group[i] >= 0 and fooled[i] and best[group[i]] < 0:
            best[group[i]] = i
    return best


# ---------------------------------------------------------------------------------------
# Shared arithmetic
# ---------------------------------------------------------------------------------------


def bcast(v: Array) -> Array:
    """[B] -> [B,1,1,1], so per-example scalars multiply NHWC images explicitly."""
    return v.reshape(-1, *([1] * 3))


def per_example_norm(v: Array, norm: str) -> Array:
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def project(delta: Array, eps: Array, norm: str) -> Array:
    """Project each example's perturbation onto the `norm` ball of radius eps."""
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    scale = jnp.minimum(1.0, eps / jnp.maximum(per_example_norm(delta, "l2"), 1e-12))
    return delta * bcast(scale)


def summed_cross_entropy(logits: Array, y: Array) -> Array:
    """Softmax cross-entropy summed (not averaged) over the batch.

    Summing makes `jax.grad` w.r.t. the input batch equal to the per-example input
    gradients in one backward pass (no cross-batch coupling in eval mode); a mean would
    shrink every example's gradient by 1/B. The class count comes from `logits.shape[-1]`.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=-1).sum()
