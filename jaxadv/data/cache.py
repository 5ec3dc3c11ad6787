"""The `.npz` cache of decoded splits, keyed by a fingerprint of the source.

One file per source fingerprint, `<stem>-<kind>-v<version>-<digest>.npz`, holding
`train_images`, `train_labels`, `test_images`, `test_labels`, `class_names` and a sha256
`checksum` over them. The arrays are stored in source order (split, class folder, path for
folders and archives; record order for TFDS). Shuffling, validation hold-out and subsets
happen after the cache (`splits.make_splits`), and a split's `index` is derived from the
source order, so the file format and `_CACHE_VERSION` are unchanged from the single-module
`jaxadv/data.py`: cached decodes from the old layout are read as they are, with nothing
to migrate or rebuild.

A file that fails any check (unreadable zip, CRC, checksum, shapes, labels) is logged and
rebuilt by the caller; writes are atomic (`jaxadv.io.atomic_path`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Iterable

import numpy as np

from jaxadv.data.splits import Dataset
from jaxadv.io import atomic_path

logger = logging.getLogger(__name__)

# Bump when the cache layout or the decoding changes, so old cache files are not reused.
_CACHE_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    """`$JAXADV_CACHE`, else `~/.cache/jaxadv` (read per call, so a changed variable counts)."""
    return pathlib.Path(os.environ.get("JAXADV_CACHE") or "~/.cache/jaxadv").expanduser()


def cache_path(cache_dir: pathlib.Path, stem: str, kind: str, digest: str) -> pathlib.Path:
    """The cache file of one source: `cache_dir/<stem>-<kind>-v<version>-<digest[:24]>.npz`."""
    return cache_dir / f"{stem}-{kind}-v{_CACHE_VERSION}-{digest[:24]}.npz"


def hash_file(path: str) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hash_strings(strings: Iterable[str]) -> str:
    """sha256 hex digest of newline-terminated strings."""
    h = hashlib.sha256()
    for s in strings:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


def _arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data if a.dtype.kind != "U" else "\0".join(a.tolist()).encode())
    return h.hexdigest()


def write_cache(cache_file: pathlib.Path, train: Dataset, test: Dataset) -> None:
    """Write the decoded splits (in source order) atomically.

    A reader sees the old file or the whole new one. `index` is not stored: a cached
    split is its own source, so it is `arange(N)` again on reading.
    """
    arrays = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
        "class_names": np.array(train.class_names, dtype=str),
    }
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
        np.savez(f, checksum=np.array(_arrays_checksum(arrays)), **arrays)


def read_cache(cache_file: pathlib.Path, image_shape: tuple[int, ...]) -> tuple[Dataset, Dataset] | None:
    """The cached (train, test) splits, or None if the file is missing or fails any check.

    Args:
        cache_file: path from `cache_path`.
        image_shape: the expected (H, W, C) of every image.

    Returns:
        (train, test) in source order with `index = arange(N)`, or None (then rebuild).
    """
    if not cache_file.exists():
        return None
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is unreadable.
        with open(cache_file, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "checksum"}
            checksum = str(z["checksum"])
        if checksum != _arrays_checksum(arrays):
            raise ValueError("checksum mismatch")
        class_names = tuple(arrays["class_names"].tolist())
        train = Dataset(arrays["train_images"], arrays["train_labels"], class_names)
        test = Dataset(arrays["test_images"], arrays["test_labels"], class_names)
        for d in (train, test):
            if d.images.shape[1:] != tuple(image_shape) or not np.all((d.labels >= 0) & (d.labels < len(class_names))):
                raise ValueError("unexpected shapes or labels")
    except Exception as e:  # zip/npy/CRC errors, missing keys, failed checks: all mean "rebuild"
        logger.warning("ignoring unreadable cache file %s (%s: %s); rebuilding it", cache_file, type(e).__name__, e)
        return None
    return train, test
