"""Files and provenance: atomic writes (JSON, NumPy, text, bytes) and the environment block.

Every file jaxadv writes goes through `atomic_path`: the data is written to a temporary
file in the target directory and renamed over the target, so a reader (or a resumed run)
sees either the old file or the whole new one, never half of it. With many processes
(`jaxadv.distributed`) only process 0 writes; the others' writes go to scratch files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else delete it.

    The temporary name keeps the suffix of `path` (NumPy and matplotlib pick the format
    from it) and starts with a dot, so globbing for results never picks it up.
    """
    from jaxadv import distributed

    path = Path(path)
    if not distributed.is_primary():
        # Many processes compute the same result; process 0 alone writes it. The others
        # write to a scratch file that is thrown away, so callers need no branch.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        try:
            yield Path(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """Strict JSON: NaN -> None, +-inf -> "inf"/"-inf", tuples -> lists, NumPy scalars -> Python."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented strict JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one array as .npy atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(array))


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write named arrays as an uncompressed .npz atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------


def versions() -> dict:
    """Python and library versions that shape numerical results."""
    import flax
    import jax
    import optax
    import orbax.checkpoint as ocp

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "?"),
        "numpy": np.__version__,
    }


def git_commit(where: str | os.PathLike | None = None) -> str | None:
    """The short commit of the source tree at `where` (default: this package), with
    "-dirty" when tracked files differ from it; None outside a git checkout."""
    cwd = Path(where) if where else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=cwd).stdout.strip()  # fmt: skip
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=cwd).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def environment() -> dict:
    """Device, versions, XLA flags and git commit: recorded next to every result."""
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": git_commit(),
    }
