"""RobustBench-style AutoAttack evaluation of a dataset (`jaxadv autoattack`), resumable.

The reference's flow: clean accuracy, then each attack of the ensemble in order on the
points still robust, in batches; after every (attack, batch) the state (which points are
still robust, who broke each point, the adversarial examples, the per-attack table) is
saved atomically, so a killed run continues at the next batch. Example i's randomness is
`fold_in(fold_in(key(seed), index_i), attack)`, so the verdicts do not depend on the batch
size or on where a run was interrupted (Square with `square_window="batch"` excepted).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import io, parallel
from jaxadv.attacks import _core
from jaxadv.attacks.autoattack import ensemble, hard_checks, margin, run_attack, sanity_flags, square_gain


class State:
    """Everything a resumed run needs, in one .npz beside the result."""

    def __init__(self, n: int):
        self.robust = np.zeros(n, bool)
        self.clean_correct = np.zeros(n, bool)
        self.broken_by = np.full(n, -1, np.int32)  # index into the ensemble
        self.target = np.full(n, -1, np.int32)
        self.x_adv: np.ndarray | None = None  # only the broken rows are meaningful
        self.done: list[list[int]] = []  # [attack, batch] finished
        self.table: list[dict] = []
        self.clean_done = False

    def save(self, path: Path, fingerprint: dict) -> None:
        io.write_npz(path, robust=self.robust, clean_correct=self.clean_correct, broken_by=self.broken_by,
                     target=self.target, x_adv=self.x_adv if self.x_adv is not None else np.zeros(0, np.float32))
        io.write_json(path.with_suffix(".json"), {"fingerprint": fingerprint, "done": self.done, "table": self.table,
                                                  "clean_done": self.clean_done})  # fmt: skip

    @classmethod
    def load(cls, path: Path, fingerprint: dict, n: int) -> "State":
        s = cls(n)
        meta_path = path.with_suffix(".json")
        if not (path.exists() and meta_path.exists()):
            return s
        meta = io.read_json(meta_path)
        if meta["fingerprint"] != io.json_safe(fingerprint):
            return s
        with np.load(path, allow_pickle=False) as z:
            s.robust, s.clean_correct = z["robust"].copy(), z["clean_correct"].copy()
            s.broken_by, s.target = z["broken_by"].copy(), z["target"].copy()
            s.x_adv = z["x_adv"].copy() if z["x_adv"].size else None
        s.done, s.table, s.clean_done = meta["done"], meta["table"], meta["clean_done"]
        return s


def evaluate(apply_fn, params, images: np.ndarray, labels: np.ndarray, index: np.ndarray, *, eps: float,
             norm: str = "linf", version: str = "standard", early_exit: bool = False, square_window: str = "image",
             seed: int = 0, batch_size: int = 250, state_path: str | Path | None = None, fingerprint: dict | None = None,
             progress: bool = True, log: Callable[[str], None] = lambda s: None, n_iter: int = 100,
             n_queries: int = 5000) -> dict:  # fmt: skip
    """AutoAttack on a dataset. Returns the result dict (see `jaxadv autoattack --help`)."""
    from tqdm.auto import tqdm

    n = len(labels)
    x_all = np.asarray(images)
    k = _core.num_classes(apply_fn, params, np.zeros((1, *x_all.shape[1:]), np.float32))
    attacks = ensemble(version, k, n_iter=n_iter, n_queries=n_queries, square_window=square_window)
    fingerprint = {**(fingerprint or {}), "eps": eps, "norm": norm, "version": version, "early_exit": early_exit,
                   "square_window": square_window, "seed": seed, "batch_size": batch_size, "n": n,
                   "n_iter": n_iter, "n_queries": n_queries}  # fmt: skip
    state_path = Path(state_path) if state_path else None
    st = State.load(state_path, fingerprint, n) if state_path else State(n)
    root = jax.random.key(seed)
    keys_all = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, jnp.asarray(index, jnp.uint32))
    mesh = parallel.batch_mesh()
    params = jax.device_put(params, parallel.replicated(mesh))
    to_f = lambda a: np.asarray(a, np.float32) / np.float32(255) if a.dtype == np.uint8 else np.asarray(a, np.float32)  # noqa: E731
    if st.x_adv is None:
        st.x_adv = to_f(x_all)
    t_start = time.perf_counter()
    flags = sanity_flags(apply_fn, params, jnp.asarray(st.x_adv[: min(n, 250)]), jnp.asarray(labels[:250]))
    if not st.clean_done:
        for s0 in range(0, n, batch_size):
            xb = jnp.asarray(st.x_adv[s0:s0 + batch_size])
            st.clean_correct[s0:s0 + batch_size] = np.asarray(jnp.argmax(_core.logits(apply_fn, params, xb), -1)) == \
                labels[s0:s0 + batch_size]  # fmt: skip
        st.robust = st.clean_correct.copy()
        st.clean_done = True
        st.table = [{"name": name, "newly_broken": 0, "robust": None, "passes": {}, "seconds": 0.0}
                    for name, _, _ in attacks]  # fmt: skip
        if state_path:
            st.save(state_path, fingerprint)
    log(f"clean accuracy {100 * st.clean_correct.mean():.2f}% on {n} points")
    for a_i, (name, fn, kwargs) in enumerate(attacks):
        _run_one_attack(a_i, name, fn, kwargs, st, apply_fn, params, x_all, labels, keys_all, to_f,
                        eps=eps, norm=norm, early_exit=early_exit, batch_size=batch_size, mesh=mesh,
                        state_path=state_path, fingerprint=fingerprint, progress=progress, tqdm=tqdm, log=log)
    return _result(st, attacks, x_all, to_f, labels, index, flags, eps, norm, apply_fn, params,
                   time.perf_counter() - t_start)


def _run_one_attack(a_i, name, fn, kwargs, st, apply_fn, params, x_all, labels, keys_all, to_f, *, eps, norm,
                    early_exit, batch_size, mesh, state_path, fingerprint, progress, tqdm, log):  # fmt: skip
    """One attack on the points still robust, in batches formed from them in index order.

    The points robust when the attack started are stored with the state, so a resumed run
    forms the same batches and skips the finished ones.
    """
    t = st.table[a_i]
    if "rows" not in t:
        t["rows"] = np.flatnonzero(st.robust).tolist()
    todo_rows = np.asarray(t["rows"], np.int64)
    batches = [todo_rows[i:i + batch_size] for i in range(0, todo_rows.size, batch_size)]
    finished = {b for a, b in st.done if a == a_i}
    bar = tqdm(total=len(batches), desc=name, disable=not progress, leave=False)
    for b_i, rows in enumerate(batches):
        bar.update(1)
        if b_i in finished or rows.size == 0:
            continue
        t0 = time.perf_counter()
        size = _core.bucket(rows.size, max(rows.size, 8))
        pad = np.concatenate([rows, np.repeat(rows[-1:], size - rows.size)])
        xb = jax.device_put(to_f(x_all[pad]), parallel.batch_sharded(mesh)) if size % mesh.devices.size == 0 \
            else jnp.asarray(to_f(x_all[pad]))  # fmt: skip
        yb = jnp.asarray(labels[pad])
        kb = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_all[jnp.asarray(pad)], a_i)
        x_adv, broken, target, passes = run_attack(name, fn, kwargs, apply_fn, params, xb, yb, kb, eps=eps,
                                                   norm=norm, early_exit=early_exit, clip_min=0.0,
                                                   clip_max=1.0)  # fmt: skip
        ok = broken[: rows.size]
        hit = rows[ok]
        st.x_adv[hit] = np.asarray(x_adv)[: rows.size][ok]
        st.robust[hit] = False
        st.broken_by[hit] = a_i
        st.target[hit] = target[: rows.size][ok]
        t["newly_broken"] += int(hit.size)
        t["attacked"] = t.get("attacked", 0) + int(rows.size)
        t["passes"] = {k: t["passes"].get(k, 0) + v for k, v in passes.items()}
        t["seconds"] += time.perf_counter() - t0
        t["robust"] = int(st.robust.sum())
        st.done.append([a_i, b_i])
        if state_path:
            st.save(state_path, fingerprint)
    bar.close()
    st.table[a_i]["robust"] = int(st.robust.sum())
    log(f"robust accuracy after {name}: {100 * st.robust.mean():.2f}% ({st.table[a_i]['newly_broken']} newly broken, "
        f"{st.table[a_i]['seconds']:.0f} s)")


def _result(st, attacks, x_all, to_f, labels, index, flags, eps, norm, apply_fn, params, seconds) -> dict:
    n = len(labels)
    x0 = to_f(x_all)
    flags.update(hard_checks(x0, st.x_adv, eps, norm, 0.0, 1.0))
    table = [{"name": t["name"], "robust_accuracy_pct": 100.0 * t["robust"] / n if t["robust"] is not None else None,
              "newly_broken": t["newly_broken"], "attacked": t.get("attacked", 0), "seconds": t["seconds"],
              "forward_passes": t["passes"].get("forward", 0), "backward_passes": t["passes"].get("backward", 0)}
             for t in st.table]  # fmt: skip
    flags["square_beats_white_box"] = square_gain([{"name": t["name"], "newly_broken": t["newly_broken"]}
                                                   for t in table], n) > 0.002  # fmt: skip
    delta = (st.x_adv - x0).reshape(n, -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    marg = np.concatenate([np.asarray(margin(_core.logits(apply_fn, params, jnp.asarray(st.x_adv[i:i + 500])),
                                                 jnp.asarray(labels[i:i + 500]))) for i in range(0, n, 500)])
    names = [a[0] for a in attacks]
    return {
        "clean_accuracy_pct": 100.0 * float(st.clean_correct.mean()),
        "robust_accuracy_pct": 100.0 * float(st.robust.mean()),
        "n": n, "eps": eps, "norm": norm, "attacks": table, "flags": flags, "seconds": seconds,
        "points": {"index": np.asarray(index).tolist(), "clean_correct": st.clean_correct.tolist(),
                   "robust": st.robust.tolist(),
                   "broken_by": [names[i] if i >= 0 else None for i in st.broken_by],
                   "target": st.target.tolist(), "norm": size.tolist(), "margin": marg.tolist()},
    }  # fmt: skip


def markdown(result: dict, title: str) -> str:
    """The contribution table."""
    lines = [f"# {title}", "",
             f"{result['n']} points, {result['norm']} eps {result['eps']:.6g}: clean {result['clean_accuracy_pct']:.2f} %, "
             f"robust {result['robust_accuracy_pct']:.2f} % ({result['seconds'] / 60:.1f} min).", "",
             "| attack | robust accuracy after it % | points attacked | newly broken | forward / backward passes per "
             "attacked point | seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for t in result["attacks"]:
        acc = "–" if t["robust_accuracy_pct"] is None else f"{t['robust_accuracy_pct']:.2f}"
        m = max(t["attacked"], 1)
        lines.append(f"| {t['name']} | {acc} | {t['attacked']} | {t['newly_broken']} | "
                     f"{t['forward_passes'] / m:.0f} / {t['backward_passes'] / m:.0f} | {t['seconds']:.1f} |")
    f = result["flags"]
    lines += ["", "Flags: " + ", ".join(f"{k} {v}" for k, v in f.items())]
    return "\n".join(lines) + "\n"

