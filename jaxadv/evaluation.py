"""One evaluation layer: padded, masked batches sharded over all devices; accuracy on clean
images, under any attack, or on given inputs (the transfer protocol).

Every batch has the same shape (the last one is padded by repeating its last example and
masked out of the sums), so each model and attack compiles once. Batches are split over
all local devices (a 1-D "batch" mesh, params replicated), as in training. With several
processes (`jaxadv.distributed`) each process takes its slice of every global batch,
evaluates or attacks it on its own devices, and the per-example results are gathered, so
every process ends with the whole result. Attack keys are folded per example from its
dataset index, so a result does not depend on the batch size, the order of the examples,
the number of devices or of processes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import attacks, distributed, io, parallel
from jaxadv.losses import cross_entropy


def to_float(x):
    """uint8 [0, 255] -> float32 [0, 1]; float input -> float32. NumPy in, NumPy out; jax in, jax out."""
    xp = jnp if isinstance(x, jax.Array) else np
    if x.dtype == np.uint8:
        return xp.asarray(x, xp.float32) / xp.float32(255.0)
    return xp.asarray(x, xp.float32)


@functools.cache
def flip_tta(apply_fn: Callable) -> Callable:
    """Flip test-time augmentation: `apply(params, x)` = mean of the logits of x and of x
    mirrored left-right. A model of its own: attacks that should see the TTA classifier
    take this function (its gradient flows through both views)."""

    def apply(params, x):
        return 0.5 * (apply_fn(params, x) + apply_fn(params, x[:, :, ::-1, :]))

    apply.__name__ = f"flip_tta_{getattr(apply_fn, '__name__', 'model')}"
    return apply


def pad_batches(n: int, batch_size: int):
    """Yield (start, stop, pad) for fixed-size batches over n examples; the last is padded."""
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        yield start, stop, batch_size - (stop - start)


def pad_to(x: np.ndarray, pad: int) -> np.ndarray:
    """`x` with its last row repeated `pad` times."""
    if pad == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)


class Batch(NamedTuple):
    """This process's rows of one fixed-size batch, on device and sharded over its mesh."""

    x: jax.Array  # f32[B,H,W,C] in [0, 1]
    y: jax.Array  # i32[B]
    mask: jax.Array  # bool[B], False on padding
    index: np.ndarray  # int64[B] dataset indices (padding repeats the last one)
    start: int  # position of the global batch's first example in the evaluated arrays
    stop: int  # one past its last real example
    rows: slice = slice(None)  # this process's rows of the padded global batch


def batch_size_for(n: int, batch_size: int, mesh) -> int:
    """min(batch_size, n) rounded up to a multiple of the device count of all processes."""
    ndev = mesh.devices.size * distributed.process_count()
    return -(-min(batch_size, max(n, 1)) // ndev) * ndev


def batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, index: np.ndarray | None = None,
            mesh=None, skip: Callable[[int], bool] = lambda i: False) -> Iterator[tuple[int, Batch | None]]:  # fmt: skip
    """Yield `(i, Batch)` for every fixed-size batch (`(i, None)` where `skip(i)`).

    With several processes, each yields its own rows of every batch (see `Batch.rows`).

    Args:
      images: u8 or f32 [N,H,W,C] host array (or memory map).
      labels: int[N].
      batch_size: examples per batch (rounded up to a multiple of the device count).
      index: int[N] dataset indices of the examples (default arange(N)).
      mesh: this process's device mesh (default: all its devices).
      skip: batches for which nothing needs to be loaded (e.g. already stored); every
        process must skip the same ones.
    """
    mesh = mesh or parallel.local_mesh()
    n = len(labels)
    index = np.arange(n) if index is None else np.asarray(index)
    bs = batch_size_for(n, batch_size, mesh)
    rows = distributed.slice_rows(bs)
    sharding = parallel.batch_sharded(mesh)
    for i, (start, stop, pad) in enumerate(pad_batches(n, bs)):
        if skip(i):
            yield i, None
            continue
        x = to_float(pad_to(np.asarray(images[start:stop]), pad)[rows])
        y = pad_to(np.asarray(labels[start:stop]).astype(np.int32), pad)[rows]
        mask = (np.arange(bs) < (stop - start))[rows]
        x, y, mask = jax.device_put((x, y, mask), sharding)
        yield i, Batch(x, y, mask, pad_to(index[start:stop], pad)[rows], start, stop, rows)


def eval_step(apply_fn, params, x, y, mask) -> dict:
    """Masked sums of loss and correct predictions of one batch, and its predictions."""
    logits = apply_fn(params, to_float(x))
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    example_loss = cross_entropy(logits, y)
    return {
        "loss": jnp.sum(example_loss * m),
        "correct": jnp.sum(jnp.where(pred == y, m, 0.0)),
        "count": jnp.sum(m),
        "pred": pred,
        "example_loss": example_loss,
    }


_eval_step_jit = jax.jit(eval_step, static_argnums=0)


def summarize(sums: list[dict]) -> dict:
    """Accuracy (%), mean loss and count from per-batch sums."""
    total = {k: sum(float(s[k]) for s in sums) for k in ("loss", "correct", "count")}
    count = total["count"]
    return {"accuracy_pct": 100.0 * total["correct"] / max(count, 1.0), "loss": total["loss"] / max(count, 1.0),
            "n": int(count)}  # fmt: skip


def evaluate(apply_fn, params, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 1000) -> dict:
    """Clean accuracy (%) and mean cross-entropy over a dataset: `{"accuracy_pct", "loss", "n"}`."""
    mesh = parallel.local_mesh()
    params = local_params(params, mesh)
    sums = [_eval_step_jit(apply_fn, params, b.x, b.y, b.mask)
            for _, b in batches(images, labels, batch_size=batch_size, mesh=mesh)]  # fmt: skip
    sums = jax.device_get([{k: s[k] for k in ("loss", "correct", "count")} for s in sums])
    return summarize([{k: v.sum() for k, v in distributed.gather(s).items()} for s in sums])


def predict(apply_fn, params, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """Predicted class ids i32[N] for u8 or f32 images."""
    labels = np.zeros(len(images), np.int32)
    mesh = parallel.local_mesh()
    params = local_params(params, mesh)
    out = []
    for _, b in batches(images, labels, batch_size=batch_size, mesh=mesh):
        pred = np.asarray(_eval_step_jit(apply_fn, params, b.x, b.y, b.mask)["pred"])
        out.append(distributed.gather({"pred": pred})["pred"][: b.stop - b.start])
    return np.concatenate(out)


def local_params(params, mesh=None):
    """`params` replicated on this process's devices (from host arrays, or from the global
    arrays of a multi-process training)."""
    mesh = mesh or parallel.local_mesh()
    return jax.device_put(distributed.local(params), parallel.replicated(mesh))


# ---------------------------------------------------------------------------------------
# Under attack
# ---------------------------------------------------------------------------------------


class BatchStore:
    """Finished batches of one evaluation on disk, so an interrupted one resumes.

    Each batch is one `.npz` written atomically; `fingerprint` (what the results depend
    on) is stored beside them, and a store holding another fingerprint is cleared.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.dir = Path(directory)
        meta = self.dir / "fingerprint.json"
        want = io.json_safe(fingerprint)
        if distributed.is_primary() and meta.exists() and io.read_json(meta) != want:
            for f in self.dir.glob("batch_*.npz"):
                f.unlink()
        if not meta.exists() or io.read_json(meta) != want:
            io.write_json(meta, want)
        distributed.barrier("jaxadv-batch-store")  # nobody reads what process 0 is clearing

    def finished(self, total: int) -> Callable[[int], bool]:
        """`skip(i)` for `batches`: the batches already stored, as process 0 sees them, so
        that every process skips the same ones (with many processes, OUT must be on a
        filesystem they share, as for checkpoints)."""
        mask = np.array([self.has(i) for i in range(total)], bool)
        if distributed.process_count() > 1:
            from jax.experimental import multihost_utils

            mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
        return lambda i: bool(mask[i])

    def _path(self, i: int) -> Path:
        return self.dir / f"batch_{i:05d}.npz"

    def has(self, i: int) -> bool:
        return self._path(i).exists()

    def get(self, i: int) -> dict:
        with np.load(self._path(i)) as z:
            return {k: z[k] for k in z.files}

    def put(self, i: int, record: dict) -> None:
        io.write_npz(self._path(i), **record)


def _runner(attack) -> Callable | None:
    """`(apply_fn, params, x, y, keys) -> (x_adv, MinNormInfo | None)` for an attack given as a
    `Spec`, a registry name or a function following the attack contract."""
    if attack is None:
        return None
    if isinstance(attack, str):
        attack = attacks.Spec(attack)
    if isinstance(attack, attacks.Spec):
        return functools.partial(attack, return_info=True)
    if attacks.meta(attack).minimum_norm:
        return functools.partial(attack, return_info=True)
    return lambda apply_fn, params, x, y, key: (attack(apply_fn, params, x, y, key=key), None)


@jax.jit
def _fold_keys(key, index):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)


def _attack_batch(b: Batch, run, apply_fn, attack_apply, params, key, inputs, keep_adv: bool) -> dict:
    """Everything one batch contributes: sums, per-example results, and x_adv if kept."""
    info = clean_pred = None
    n = b.stop - b.start
    if inputs is not None:
        bs = len(b.index) * distributed.process_count()
        x = to_float(pad_to(np.asarray(inputs[b.start:b.stop]), bs - n)[b.rows])
        x = jax.device_put(x, b.x.sharding)
    elif run is not None:
        keys = _fold_keys(key, jnp.asarray(b.index, jnp.uint32))
        x, info = run(attack_apply, params, b.x, b.y, key=keys)
    else:
        x = b.x
    out = _eval_step_jit(apply_fn, params, x, b.y, b.mask)
    if info is not None:
        clean_pred = _eval_step_jit(apply_fn, params, b.x, b.y, b.mask)["pred"]
    rec = {k: np.asarray(out[k]) for k in ("loss", "correct", "count")}
    rec["index"] = b.index
    rec["pred"] = np.asarray(out["pred"])
    rec["example_loss"] = np.asarray(out["example_loss"])
    if info is not None:
        rec["clean_pred"] = np.asarray(clean_pred)
        for k, v in info._asdict().items():
            rec[k] = np.asarray(v)
    if keep_adv:
        rec["x_adv"] = np.asarray(x)
    rec = distributed.gather(rec)  # every process's rows, in order (identity for one process)
    return {k: v.sum() if k in ("loss", "correct", "count") and v.ndim else (v[:n] if v.ndim else v)
            for k, v in rec.items()}  # fmt: skip


def attack_eval(
    apply_fn,
    params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    attack: Any = None,
    attack_apply=None,
    key=None,
    index: np.ndarray | None = None,
    inputs: np.ndarray | None = None,
    batch_size: int = 500,
    keep_adv: bool = False,
    progress: bool = False,
    desc: str = "eval",
    store: BatchStore | None = None,
) -> tuple[dict, np.ndarray | None]:
    """Accuracy and loss of `apply_fn(params, .)` on attacked (or given) inputs.

    Args:
      apply_fn, params: the classifier that is evaluated.
      images: u8[N,H,W,C] (or f32 in [0, 1]) clean images.
      labels: i32[N] true labels.
      attack: None (clean, or `inputs`), an `attacks.Spec`, a registry name, or any
        function with the attack contract `(apply_fn, params, x, y, *, key) -> x_adv`.
        Minimum-norm attacks add their per-example statistics to the summary.
      attack_apply: the classifier the attack sees (default `apply_fn`), e.g. a BPDA
        version of a squeezed model for an adaptive attack.
      key: root PRNG key of randomized attacks (default `key(0)`); example i gets
        `fold_in(key, index[i])`.
      index: int[N] dataset indices of the examples (default arange(N)).
      inputs: precomputed f32[N,H,W,C] inputs to evaluate instead of attacking, e.g.
        adversarial examples crafted on another model (the transfer protocol).
      batch_size: examples per batch (rounded up to a multiple of the device count).
      keep_adv: also return the evaluated inputs, f32[N,H,W,C].
      progress: show a tqdm bar.
      desc: the bar's label.
      store: a `BatchStore`; finished batches are saved there and reused on a rerun.

    Returns:
      (summary, x_adv or None). summary has "accuracy_pct", "loss", "n" and "per_example"
      (index, correct), plus for minimum-norm attacks (see `_min_norm_stats`) their
      success rates, norms and iterations.
    """
    from tqdm.auto import tqdm

    run = _runner(attack)
    mesh = parallel.local_mesh()
    params = local_params(params, mesh)
    key = jax.random.key(0) if key is None else key
    attack_apply = attack_apply or apply_fn
    total = -(-len(labels) // batch_size_for(len(labels), batch_size, mesh))
    done = store.finished(total) if store is not None else (lambda i: False)
    recs = []
    it = batches(images, labels, batch_size=batch_size, index=index, mesh=mesh, skip=done)
    for i, b in tqdm(it, total=total, desc=desc, disable=not progress or not distributed.is_primary(), leave=False):
        if b is None:
            recs.append(store.get(i))
            continue
        rec = _attack_batch(b, run, apply_fn, attack_apply, params, key, inputs, keep_adv)
        if store is not None:
            store.put(i, rec)
        recs.append(rec)
    return _summary(recs, labels), (np.concatenate([r["x_adv"] for r in recs]) if keep_adv else None)


def _summary(recs: list[dict], labels: np.ndarray) -> dict:
    summary = summarize(recs)
    pred = np.concatenate([r["pred"] for r in recs])
    summary["per_example"] = {"index": np.concatenate([r["index"] for r in recs]), "pred": pred,
                              "correct": pred == np.asarray(labels),
                              "example_loss": np.concatenate([r["example_loss"] for r in recs])}  # fmt: skip
    if "norm" in recs[0]:
        cat = {k: np.concatenate([r[k] for r in recs]) for k in ("clean_pred", "iterations", "success", "norm")}
        summary.update(_min_norm_stats(cat, np.asarray(labels)))
        summary["per_example"].update(cat)
    return summary


def _min_norm_stats(r: dict, labels: np.ndarray) -> dict:
    """Statistics of a minimum-norm attack (DeepFool convention: the reference class is the
    clean prediction, so misclassified inputs are attacked too)."""
    correct, success, norms, iters = r["clean_pred"] == labels, r["success"], r["norm"], r["iterations"]
    nan = float("nan")
    return {
        # Label-aware peers (torchattacks) leave misclassified inputs unchanged; their
        # accuracy is the fraction correct at x0 and not fooled:
        "accuracy_label_aware_pct": 100.0 * float(np.mean(correct & ~success)),
        "success_rate_pct": 100.0 * float(success.mean()),
        "success_rate_correct_pct": 100.0 * float(success[correct].mean()) if correct.any() else nan,
        "n_correct": int(correct.sum()),
        "norm_mean": float(norms[success].mean()) if success.any() else nan,
        "norm_median": float(np.median(norms[success])) if success.any() else nan,
        "iterations_mean": float(iters.mean()),
        "iterations_max": int(iters.max()),
        "norms": norms[success].tolist(),  # of the successful attacks, like the mean/median
        # For accuracy against an L2 radius r: correct inputs whose minimal perturbation
        # (as the attack measures it) exceeds r, plus the correct ones it never fooled.
        "norms_correct": norms[success & correct].tolist(),
        "n_correct_unfooled": int((correct & ~success).sum()),
    }

