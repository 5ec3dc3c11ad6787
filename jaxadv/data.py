"""CIFAR-10-shaped data: load once into uint8 NumPy arrays, cache, split; augment on device.

Host side (NumPy, run once):

- `load(source)` reads CIFAR-10 from TFDS (`"tfds"`), from a folder tree
  `ROOT/{train,test}/<class>/*.{png,jpg,jpeg}`, or from a `.tar.gz`/`.tgz`/`.tar`/`.zip`
  archive of one (optionally wrapped in a single top-level directory). Images are decoded
  once (in worker processes when there are spare cores) and cached as an `.npz` keyed by a
  fingerprint of the source, so later loads take well under a second. It then holds out a
  seeded, class-balanced validation split and optional seeded, class-balanced subsets.
- `synthetic(...)` builds a small, learnable, CIFAR-shaped data set for tests and smoke runs.
- `write_image_tree(...)` writes arrays back out as a folder tree (for tests and for users
  who want to build a local copy).

Device side (JAX, inside the jitted step):

- `augment(key, x)`: per-example random crop after padding plus random horizontal flip.
- `to_float(x)`: uint8 -> float32 in [0, 1].

Every problem with the data itself raises `DataError` (a `ValueError`) whose message is one
line naming the problem and the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import logging
import multiprocessing
import os
import pathlib
import re
import sys
import tarfile
import tempfile
import zipfile
import zlib
from concurrent import futures
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image
from tqdm import tqdm

from jaxadv.types import Array, PRNGKey

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLIT_DIRS = ("train", "test")

# Bump when the cache layout or the decoding changes, so old cache files are not reused.
_CACHE_VERSION = 1
# Below this many images a process pool costs more to start (each spawned worker imports
# this module, hence JAX, and the parent's __main__) than it saves.
_PARALLEL_MIN_IMAGES = 4096
# With fewer usable CPUs, `num_workers=None` decodes in-process: on the 2-core dev box
# (shared with other jobs) a 2-process pool was slower than one process, see `_decode_stream`.
_AUTO_PARALLEL_MIN_CPUS = 4
_CHUNK_SIZE = 1000


class DataError(ValueError):
    """A problem with the input data (missing, malformed, inconsistent). Always one line."""

    def __init__(self, message: str):
        # Messages embed paths and third-party error text; keep them on one line so they
        # read well in logs and in `pytest.raises(match=...)`.
        super().__init__(" ".join(str(message).splitlines()))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split held in host memory.

    Attributes:
        images: uint8[N, H, W, 3], NHWC (H = W = 32 for CIFAR-10).
        labels: int32[N], class ids in [0, len(class_names)).
        class_names: class names; `class_names[i]` is the name of class id `i`.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8[N,H,W,3], got {self.images.dtype}{list(self.images.shape)}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32[{self.images.shape[0]}], got {self.labels.dtype}{list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, indices: np.ndarray) -> Dataset:
        """The examples at `indices`, in that order."""
        return Dataset(self.images[indices], self.labels[indices], self.class_names)


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test splits of one data set.

    Attributes:
        train: training examples (validation examples removed, subset applied).
        val: held-out validation examples taken from the original training split.
        test: test examples (subset applied).
        class_names: shared by all three splits.
        source: human-readable description of where the data came from.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: tuple[str, ...]
    source: str


# --------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------


def load(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    progress: bool = True,
    num_workers: int | None = None,
) -> Splits:
    """Load CIFAR-10 (or any data set in the same layout) as uint8 NumPy splits.

    Sources:

    - `"tfds"` or `"tfds:DATA_DIR"`: CIFAR-10 through `tfds.data_source`, which reads the
      prepared ArrayRecord files without TensorFlow. Preparing (download + convert) does
      need TensorFlow; without it an unprepared data set raises `DataError`. `DATA_DIR`
      defaults to `$TFDS_DATA_DIR` or TFDS's own default.
    - a directory `ROOT/train/<class>/*.{png,jpg,jpeg}` plus `ROOT/test/<class>/...`
      (extensions case-insensitive; hidden files and `__MACOSX/` are skipped).
    - an archive of such a directory: `.tar.gz`, `.tgz`, `.tar` or `.zip`, with `train/`
      and `test/` at the top or inside a single top-level directory.

    Class ids follow the sorted class folder names (for CIFAR-10 this is the official
    label order). The decoded arrays are cached in `cache_dir` as one `.npz` per source
    fingerprint (archive: sha256 of its bytes; folder: relative paths, sizes and mtimes of
    its images; TFDS: dataset version, data dir and split sizes). A cache file that fails
    its checksum or structure checks is rebuilt.

    Args:
        source: `"tfds"`, `"tfds:DATA_DIR"`, a directory, or an archive path.
        cache_dir: where decoded arrays are cached; default `$JAXADV_CACHE` or
            `~/.cache/jaxadv`.
        val_size: number of training examples held out, class-balanced, as the
            validation split (0 for none).
        train_subset: if set, keep this many class-balanced training examples (chosen
            after the validation split is removed).
        test_subset: if set, keep this many class-balanced test examples.
        seed: seeds the validation split and the subsets. Each draws from its own
            stream, so e.g. changing `train_subset` does not change the validation split.
        progress: show a tqdm progress bar on stderr while decoding.
        num_workers: decoding processes. None: one per usable CPU (max 8) on machines
            with at least 4 usable CPUs, else decode in this process. 0 or 1: decode in
            this process. Fewer than 4096 images are always decoded in-process. Worker
            processes are spawned, so a script that calls `load` at import time needs
            an `if __name__ == "__main__":` guard (or `num_workers=0`).

    Returns:
        `Splits` with uint8[N,32,32,3] images and int32[N] labels.

    Raises:
        DataError: the source is missing, of an unknown kind, empty, unreadable,
            inconsistent (class folders), or holds a corrupt or non-32x32 image.
        ValueError: `val_size` or a subset size is negative or larger than the split.
    """
    cache_dir = _default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
    source = os.fspath(source)
    if source == "tfds" or source.startswith("tfds:"):
        data_dir = source.partition(":")[2] or None
        train, test, description = _load_tfds(data_dir, cache_dir, progress)
    else:
        train, test, description = _load_path(source, cache_dir, progress, num_workers)
    return make_splits(
        train,
        test,
        source=description,
        val_size=val_size,
        train_subset=train_subset,
        test_subset=test_subset,
        seed=seed,
    )


def make_splits(
    train: Dataset,
    test: Dataset,
    *,
    source: str,
    val_size: int,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> Splits:
    """Hold out a class-balanced validation split from `train`, then take subsets.

    Args:
        train: the full training split.
        test: the full test split.
        source: description stored in the result.
        val_size: validation examples taken from `train` (0 allowed).
        train_subset: class-balanced size of the remaining training split, or None (all).
        test_subset: class-balanced size of the test split, or None (all).
        seed: seeds three independent NumPy streams (validation, train subset, test subset).

    Returns:
        The `Splits`; within each split examples keep their original relative order.
    """
    val_rng, train_rng, test_rng = np.random.default_rng(seed).spawn(3)
    val_idx = balanced_indices(train.labels, val_size, val_rng, what="val_size")
    rest = np.setdiff1d(np.arange(len(train)), val_idx, assume_unique=True)
    val, train = train.take(val_idx), train.take(rest)
    if train_subset is not None:
        train = train.take(balanced_indices(train.labels, train_subset, train_rng, what="train_subset"))
    if test_subset is not None:
        test = test.take(balanced_indices(test.labels, test_subset, test_rng, what="test_subset"))
    return Splits(train=train, val=val, test=test, class_names=train.class_names, source=source)


def balanced_indices(
    labels: np.ndarray, n: int, rng: np.random.Generator, *, what: str = "n", sort: bool = True
) -> np.ndarray:
    """Choose `n` indices spread as evenly over the classes as the data allows.

    Classes take turns in a random order, each contributing its next randomly chosen
    example, so every class gets `n // K` or `n // K + 1` examples unless it runs out,
    in which case the others fill in.

    Args:
        labels: int[N] class ids.
        n: how many indices to choose, 0 <= n <= N.
        rng: NumPy generator (the only randomness used).
        what: argument name for the error message.
        sort: return the indices sorted (the data's own order). If False, return them in
            the order chosen (class by class in turns), so that every prefix is balanced
            too: the splits are stored class by class, and a prefix of a sorted selection
            (e.g. "the first 500 test images") is one or two classes.

    Returns:
        int64[n] indices into `labels`.
    """
    if not 0 <= n <= len(labels):
        raise ValueError(f"{what}={n} must be between 0 and the split size {len(labels)}")
    perm = rng.permutation(len(labels))
    shuffled = labels[perm]
    # Rank of each example within its class, in shuffled order.
    order = np.argsort(shuffled, kind="stable")
    sorted_labels = shuffled[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts
    classes = np.unique(labels)
    class_turn = np.empty(int(classes.max(initial=0)) + 1, np.int64)
    class_turn[classes] = rng.permutation(len(classes))
    chosen = perm[np.lexsort((class_turn[shuffled], rank))[:n]]
    return np.sort(chosen) if sort else chosen


def _default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXADV_CACHE") or "~/.cache/jaxadv").expanduser()


# --------------------------------------------------------------------------------------
# Folder / archive sources
# --------------------------------------------------------------------------------------


def _source_kind(path: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"data source not found: {path}")
    if os.path.isdir(path):
        return "folder"
    lower = path.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    raise DataError(
        f"unknown data source kind: {path} (expected 'tfds', a directory, or a {'/'.join(ARCHIVE_SUFFIXES)} archive)"
    )


def _load_path(
    source: str, cache_dir: pathlib.Path, progress: bool, num_workers: int | None
) -> tuple[Dataset, Dataset, str]:
    path = os.path.abspath(os.path.expanduser(source))
    kind = _source_kind(path)
    if kind == "folder":
        files = _list_folder(path)
        digest = _hash_strings(f"{rel}\0{size}\0{mtime}" for rel, size, mtime in files)
        description = f"folder {path} (fingerprint {digest[:12]})"
    else:
        files = None
        digest = _hash_file(path)
        description = f"archive {path} (sha256 {digest[:12]})"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip(os.sep)))
    cache_file = cache_dir / f"{stem}-{kind}-v{_CACHE_VERSION}-{digest[:24]}.npz"

    cached = _read_cache(cache_file)
    if cached is not None:
        return (*cached, description)
    if kind == "folder":
        members = _iter_folder(path, [rel for rel, _, _ in files])
    else:
        members = _iter_archive(path, kind)
    names, images, errors = _decode_stream(
        members, total=len(files) if files else None, where=path, progress=progress, num_workers=num_workers
    )
    train, test = _assemble(names, images, errors, path)
    _write_cache(cache_file, train, test)
    return train, test, description


def _is_image_name(name: str) -> bool:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _normalize(name: str) -> str:
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _list_folder(root: str) -> list[tuple[str, int, int]]:
    """Sorted (posix relative path, size, mtime_ns) of every image file under `root`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            rel = pathlib.PurePath(os.path.relpath(full, root)).as_posix()
            if _is_image_name(rel):
                st = os.stat(full)
                found.append((rel, st.st_size, st.st_mtime_ns))
    return sorted(found)


def _iter_folder(root: str, names: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """Yield (relative path, bytes) for each listed file under `root`."""
    for name in names:
        try:
            yield name, pathlib.Path(root, name).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {name} in {root}: {type(e).__name__}: {e}") from e


def _iter_archive(path: str, kind: str) -> Iterator[tuple[str, bytes]]:
    """Yield (normalized member name, bytes) for every image member of a tar or zip archive."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and _is_image_name(info.filename):
                        yield _normalize(info.filename), zf.read(info)
        else:
            # "r:*" picks gzip or no compression from the content, not from the file name.
            with tarfile.open(path, "r:*") as tf:
                for info in tf:
                    if info.isfile() and _is_image_name(info.name):
                        yield _normalize(info.name), tf.extractfile(info).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read archive {path}: {type(e).__name__}: {e}") from e


def _parse_layout(names: Iterable[str], where: str) -> tuple[dict[str, list[tuple[str, int]]], tuple[str, ...]]:
    """Map image paths to splits and class ids.

    Args:
        names: posix paths of image files relative to the source root.
        where: the source path, for error messages.

    Returns:
        ({"train": [(name, class_id), ...], "test": [...]}, class_names), each list sorted
        by path.
    """
    names = sorted(set(names))
    if not names:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
    tops = {n.split("/", 1)[0] for n in names}
    prefix = ""
    if not tops & set(SPLIT_DIRS) and len(tops) == 1:
        # A single wrapping directory, as `tar czf data.tgz cifar10/` produces.
        prefix = tops.pop() + "/"
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLIT_DIRS}
    for name in names:
        parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
        if not parts or parts[0] not in by_split:
            continue  # images outside train/ and test/ are not part of the data set
        if len(parts) != 3:
            raise DataError(f"unexpected image location {name} in {where} (expected {prefix}<split>/<class>/<image>)")
        by_split[parts[0]].append((name, parts[1]))
    for split, items in by_split.items():
        if not items:
            raise DataError(f"missing {split}/ directory (no images under {prefix}{split}/<class>/) in {where}")
    train_classes = {c for _, c in by_split["train"]}
    test_classes = {c for _, c in by_split["test"]}
    if train_classes != test_classes:
        raise DataError(
            f"class folders differ between train/ and test/ in {where}: "
            f"only in train: {sorted(train_classes - test_classes)}, "
            f"only in test: {sorted(test_classes - train_classes)}"
        )
    class_names = tuple(sorted(train_classes))
    class_id = {c: i for i, c in enumerate(class_names)}
    return {s: [(n, class_id[c]) for n, c in items] for s, items in by_split.items()}, class_names


def _assemble(names: list[str], images: np.ndarray, errors: dict[str, str], where: str) -> tuple[Dataset, Dataset]:
    """Order decoded images by split, class and path; raise for the first bad image in them."""
    layout, class_names = _parse_layout(names, where)
    row = {name: i for i, name in enumerate(names)}  # a repeated tar member: the last copy wins
    splits = []
    for split in SPLIT_DIRS:
        for name, _ in layout[split]:
            if name in errors:
                raise DataError(f"bad image {name} in {where}: {errors[name]}")
        rows = np.array([row[name] for name, _ in layout[split]], np.int64)
        labels = np.array([c for _, c in layout[split]], np.int32)
        splits.append(Dataset(images[rows], labels, class_names))
    return splits[0], splits[1]


def decode_images(
    names: Sequence[str],
    blobs: Sequence[bytes],
    *,
    where: str = "",
    progress: bool = False,
    num_workers: int | None = None,
) -> np.ndarray:
    """Decode encoded 32x32 images (PNG, JPEG, ...) into one uint8 array.

    Args:
        names: a name per image, used in error messages.
        blobs: the encoded bytes of each image.
        where: where the images come from, used in error messages.
        progress: show a tqdm bar on stderr.
        num_workers: decoding processes; see `load`.

    Returns:
        uint8[N, 32, 32, 3]; other modes (grayscale, RGBA, palette) are converted to RGB.

    Raises:
        DataError: an image cannot be decoded or is not 32x32 (names the first such image).
    """
    _, images, errors = _decode_stream(
        zip(names, blobs), total=len(blobs), where=where, progress=progress, num_workers=num_workers
    )
    for name in names:
        if name in errors:
            raise DataError(f"bad image {name} in {where}: {errors[name]}")
    return images


def _decode_stream(
    members: Iterable[tuple[str, bytes]],
    *,
    total: int | None,
    where: str,
    progress: bool,
    num_workers: int | None,
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Decode (name, bytes) pairs as they are read, in worker processes once there are many.

    With workers, reading (a tar.gz is read sequentially, in Python) and decoding overlap:
    chunks go to the workers as soon as they are read. Choices, from measurements of a
    cold load of the 60k-JPEG archive on the 2-core dev box while other jobs were running:
    in-process 10.5-11.8 s, 2 threads 11.7 s, 2 spawned processes 13.5-16.8 s, 1 spawned
    process 14.0 s. Threads do not help because PIL holds the GIL for much of its
    per-image work (JPEG header parsing is Python); processes pay ~1 s CPU each to start
    (they import JAX) plus pickling, which only pays off with spare cores, hence the
    default of in-process decoding below 4 CPUs. `fork` would start faster but is unsafe
    once JAX has started its threads, so the pool uses `spawn`. If the pool breaks
    (typically: a script calls `load` at import time without an
    `if __name__ == "__main__":` guard), decoding falls back to this process.

    Returns:
        (names, uint8[N,32,32,3] images in the same order, {name: problem} for images that
        could not be decoded or are not 32x32; their rows are zeros). Problems are reported
        rather than raised so that only images that belong to the data set are errors.
    """
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(cpus, 8) if cpus >= _AUTO_PARALLEL_MIN_CPUS else 0
    names: list[str] = []
    results: list = []  # per chunk: (images, errors), or a Future of it
    submitted: dict[int, tuple[list[str], list[bytes]]] = {}  # kept to retry if the pool breaks
    pool = None
    bar = tqdm(
        total=total,
        desc=f"decoding {os.path.basename(where) or 'images'}",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    )
    try:
        for chunk in _batched(members, _CHUNK_SIZE):
            chunk_names, blobs = [n for n, _ in chunk], [b for _, b in chunk]
            names.extend(chunk_names)
            if pool is None and num_workers > 1 and len(names) >= _PARALLEL_MIN_IMAGES:
                pool = futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
            if pool is None:
                results.append(_decode_chunk(chunk_names, blobs))
                bar.update(len(blobs))
            else:
                future = pool.submit(_decode_chunk, chunk_names, blobs)
                future.add_done_callback(lambda _, n=len(blobs): bar.update(n))
                submitted[len(results)] = (chunk_names, blobs)
                results.append(future)
        try:
            results = [r.result() if isinstance(r, futures.Future) else r for r in results]
        except futures.process.BrokenProcessPool as e:
            logger.warning("decoding worker processes failed (%s); decoding in this process instead", e)
            results = [_decode_chunk(*submitted[i]) if i in submitted else r for i, r in enumerate(results)]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    images = np.concatenate([r[0] for r in results]) if results else np.empty((0, *IMAGE_SHAPE), np.uint8)
    errors = {name: problem for _, errs in results for name, problem in errs.items()}
    return names, images, errors


def _batched(iterable: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_chunk(names: Sequence[str], blobs: Sequence[bytes]) -> tuple[np.ndarray, dict[str, str]]:
    """Decode one chunk of images (in a worker process): (uint8[n,32,32,3], {name: problem})."""
    out = np.zeros((len(blobs), *IMAGE_SHAPE), np.uint8)
    errors = {}
    for i, (name, blob) in enumerate(zip(names, blobs)):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                if image.size != IMAGE_SHAPE[1::-1]:
                    errors[name] = f"size {image.size[0]}x{image.size[1]}, expected {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]}"
                    continue
                out[i] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
            errors[name] = f"cannot decode ({type(e).__name__}: {e})"
    return out, errors


# --------------------------------------------------------------------------------------
# TFDS source
# --------------------------------------------------------------------------------------


def _load_tfds(data_dir: str | None, cache_dir: pathlib.Path, progress: bool) -> tuple[Dataset, Dataset, str]:
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    # TFDS reads $TFDS_DATA_DIR at import; read it per call so a changed env var is honoured.
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    try:
        sources = tfds.data_source(
            "cifar10",
            split=list(SPLIT_DIRS),
            data_dir=data_dir,
            # Preparing needs TensorFlow; without it only read what is already prepared.
            download=has_tensorflow,
            builder_kwargs={"file_format": "array_record"},
        )
    except (KeyError, FileNotFoundError, ValueError) as e:
        if has_tensorflow:
            raise
        # TFDS raises KeyError("... `splits` is empty ... not been generated yet") here.
        where = data_dir or "the default TFDS data dir"
        raise DataError(
            f"tfds cifar10 is not prepared in {where} and preparing it needs TensorFlow: "
            f"pip install 'jaxadv[tfds-prepare]', or pass a local folder/archive as the source ({type(e).__name__})"
        ) from e
    info = sources[0].dataset_info
    sizes = [len(s) for s in sources]
    digest = _hash_strings([f"{info.full_name}", str(data_dir), *map(str, sizes)])
    cache_file = cache_dir / f"tfds-cifar10-v{_CACHE_VERSION}-{digest[:24]}.npz"
    description = f"tfds {info.full_name} ({data_dir or 'default data dir'})"
    cached = _read_cache(cache_file)
    if cached is not None:
        return (*cached, description)
    train, test = (_read_tfds_split(s, split, progress) for s, split in zip(sources, SPLIT_DIRS))
    _write_cache(cache_file, train, test)
    return train, test, description


def _read_tfds_split(source, split: str, progress: bool) -> Dataset:
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    # One record at a time: `__getitems__` would batch reads, but TFDS's mock data source
    # (tfds.testing.mock_data) does not implement it, and this runs once before caching.
    for i in tqdm(range(n), desc=f"reading tfds cifar10 {split}", unit="img", file=sys.stderr, disable=not progress):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return Dataset(images, labels, CIFAR10_CLASSES)


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_strings(strings: Iterable[str]) -> str:
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


def _write_cache(cache_file: pathlib.Path, train: Dataset, test: Dataset) -> None:
    """Write the decoded splits atomically: a reader sees the old file or the whole new one."""
    arrays = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
        "class_names": np.array(train.class_names, dtype=str),
    }
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, checksum=np.array(_arrays_checksum(arrays)), **arrays)
        os.replace(tmp, cache_file)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_cache(cache_file: pathlib.Path) -> tuple[Dataset, Dataset] | None:
    """The cached splits, or None if the file is missing or fails any check (then rebuilt)."""
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
            if d.images.shape[1:] != IMAGE_SHAPE or not np.all((d.labels >= 0) & (d.labels < len(class_names))):
                raise ValueError("unexpected shapes or labels")
    except Exception as e:  # zip/npy/CRC errors, missing keys, failed checks: all mean "rebuild"
        logger.warning("ignoring unreadable cache file %s (%s: %s); rebuilding it", cache_file, type(e).__name__, e)
        return None
    return train, test


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


def synthetic(
    n_train: int,
    n_test: int,
    *,
    num_classes: int = 10,
    seed: int = 0,
    image_size: int = 32,
    noise: float = 0.15,
    val_size: int = 100,
) -> Splits:
    """A learnable CIFAR-shaped data set of noisy, class-specific colour gratings.

    Class k is a smooth sinusoidal grating with its own spatial frequency, orientation,
    per-channel phase and colour. Each example scales the grating's contrast by a random
    factor in [0.6, 1.2], shifts its brightness by up to +-0.1 and adds Gaussian noise of
    standard deviation `noise` (in [0, 1] pixel units), then is quantized to uint8. With
    the defaults a nearest-class-mean classifier is nearly perfect, and a tiny CNN learns
    it well above chance in a few hundred steps, also under `augment` (a shifted grating
    keeps its frequency and colour).

    Args:
        n_train: training examples.
        n_test: test examples.
        num_classes: number of classes; labels are balanced within each split.
        seed: seeds NumPy; the same arguments give the same arrays.
        image_size: height and width.
        noise: standard deviation of the additive Gaussian noise.
        val_size: validation examples (drawn independently of train).

    Returns:
        `Splits` with uint8[N, image_size, image_size, 3] images and int32[N] labels.
    """
    rng = np.random.default_rng(seed)
    proto_rng, *split_rngs = rng.spawn(4)
    freq = proto_rng.uniform(1.0, 4.0, num_classes)
    angle = proto_rng.uniform(0.0, np.pi, num_classes)
    phase = proto_rng.uniform(0.0, 2 * np.pi, (num_classes, 3))
    colour = proto_rng.uniform(0.3, 1.0, (num_classes, 3))
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    wave = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) * freq[:, None, None]
    prototypes = 0.4 * colour[:, None, None, :] * np.sin(2 * np.pi * wave[..., None] + phase[:, None, None, :])

    def make(n: int, rng: np.random.Generator) -> Dataset:
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        contrast = rng.uniform(0.6, 1.2, (n, 1, 1, 1))
        brightness = rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
        x = 0.5 + contrast * prototypes[labels] + brightness
        x = x + noise * rng.standard_normal(x.shape)
        images = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
        return Dataset(images, labels, class_names)

    class_names = tuple(f"class_{k}" for k in range(num_classes))
    train, val, test = (make(n, r) for n, r in zip((n_train, val_size, n_test), split_rngs))
    source = f"synthetic(num_classes={num_classes}, seed={seed}, image_size={image_size}, noise={noise})"
    return Splits(train=train, val=val, test=test, class_names=class_names, source=source)


def write_image_tree(
    root: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    fmt: str = "png",
) -> pathlib.Path:
    """Write images as `root/<class name>/<index:05d>.<fmt>`, the per-split layout `load` reads.

    Call it once per split, e.g. with `root/"train"` and `root/"test"`.

    Args:
        root: output directory (created if needed).
        images: uint8[N, H, W, 3].
        labels: int[N] class ids into `class_names`.
        class_names: folder name per class id.
        fmt: "png" (lossless), "jpg" or "jpeg" (quality 95).

    Returns:
        `root` as a Path.
    """
    if fmt.lower() not in ("png", "jpg", "jpeg"):
        raise ValueError(f"fmt must be 'png', 'jpg' or 'jpeg', got {fmt!r}")
    root = pathlib.Path(root)
    options = {"quality": 95} if fmt.lower() != "png" else {}
    for i, (image, label) in enumerate(zip(np.asarray(images), np.asarray(labels))):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.{fmt}", **options)
    return root


# --------------------------------------------------------------------------------------
# Device side: augmentation and conversion
# --------------------------------------------------------------------------------------


def augment(key: PRNGKey, x: Array, *, pad: int = 4, pad_mode: str = "reflect", flip: bool = True) -> Array:
    """Random crop after padding, then random horizontal flip, independently per example.

    Jittable with `pad`, `pad_mode` and `flip` static, e.g.
    `jax.jit(augment, static_argnames=("pad", "pad_mode", "flip"))`; normally it is simply
    called inside the jitted train step. Works on uint8 (cheapest, before `to_float`) or
    float inputs.

    Args:
        key: PRNG key; the same key gives the same output.
        x: [B, H, W, C] images, any dtype.
        pad: pixels of padding per side; each example is cropped back to H x W at a
            uniform random offset in [0, 2 * pad] per axis. 0 disables cropping.
        pad_mode: "reflect" (no artificial borders; needs pad < H, W) or "constant" (zeros).
        flip: flip each example left-right with probability 1/2.

    Returns:
        Augmented images with the shape and dtype of `x`.
    """
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b, h, w, c = x.shape
    crop_key, flip_key = jax.random.split(key)
    if pad > 0:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
        x = crop(padded, offsets, (h, w))
    if flip:
        flipped = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(flipped[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def crop(x: Array, offsets: Array, size: tuple[int, int]) -> Array:
    """Crop a `size` window from each example at its own (row, col) offset.

    Args:
        x: [B, H, W, C] images.
        offsets: int[B, 2] top-left corner of each window.
        size: (height, width) of the windows.

    Returns:
        [B, size[0], size[1], C], same dtype as `x`.
    """
    c = x.shape[-1]
    zero = jnp.zeros((), offsets.dtype)
    return jax.vmap(lambda img, o: lax.dynamic_slice(img, (o[0], o[1], zero), (*size, c)))(x, offsets)


def to_float(x: Array) -> Array:
    """uint8 [..] -> float32 in [0, 1] (x / 255)."""
    return jnp.asarray(x).astype(jnp.float32) / 255.0
