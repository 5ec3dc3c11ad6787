"""A thin orbax wrapper: save/restore a step series of (pytree state, JSON metadata).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that looks finished. Everything orbax-specific
stays behind `save`, `restore`, `latest_step` and `read_meta` because its API moves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A missing, partial or incompatible checkpoint."""


_ITEMS = ("state", "meta")


def _manager(directory: str | os.PathLike, *, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=create,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=_ITEMS)


def save(directory: str | os.PathLike, step: int, state: Any, meta: dict, *, max_to_keep: int = 3) -> None:
    """Save `state` (a pytree of arrays) and `meta` (JSON-serializable) as `step`.

    Keeps the newest `max_to_keep` steps. Blocks until the checkpoint is on disk.
    """
    # Hand orbax host copies: it then runs no device programs of its own, which on a
    # multi-device host could interleave with the training step's collectives. With many
    # processes every one of them calls this (the state is replicated, so each holds the
    # whole value); orbax's multi-process path synchronizes them through the distributed
    # runtime and commits the step once, from process 0.
    state = jax.device_get(state)
    with _manager(directory, max_to_keep=max_to_keep) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in `directory`, or None if there is none."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory, create=False) as mngr:
        return mngr.latest_step()


def _require_step(directory, step):
    if not Path(directory).exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    found = latest_step(directory) if step is None else step
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {directory} (empty or only partial saves)")
    return found


def read_meta(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """Return (step, meta) of `step` (default: the latest) without loading arrays."""
    step = _require_step(directory, step)
    meta_file = Path(directory).absolute() / str(step) / "meta" / "metadata"
    try:
        with _manager(directory, create=False) as mngr:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types; the user needs one line
        raise CheckpointError(f"cannot read checkpoint metadata at {meta_file.parent}: {type(e).__name__}") from e
    return step, meta


def restore(directory: str | os.PathLike, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restore (step, state, meta); `template` is a pytree of arrays or ShapeDtypeStructs.

    Raises:
      CheckpointError: no checkpoint, a partial one, or one whose structure or shapes do
        not match `template` (e.g. written by a different model config).
    """
    step = _require_step(directory, step)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), template)
    try:
        with _manager(directory, create=False) as mngr:
            out = mngr.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory} step {step} is incompatible or corrupt: {msg}") from e
    want = jax.tree.structure(abstract)
    got = jax.tree.structure(out["state"])
    if want != got:
        raise CheckpointError(f"checkpoint {directory} step {step} has a different structure than expected")
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(out["state"])):
        if a.shape != b.shape:
            raise CheckpointError(
                f"checkpoint {directory} step {step} is incompatible: array shape {b.shape} != expected {a.shape}"
            )
    return step, out["state"], out["meta"]
