"""Data sources: folder trees, archives and TFDS, decoded once into uint8 NumPy splits.

`load(source)` reads CIFAR-10 from TFDS (`"tfds"`), from a folder tree
`ROOT/{train,test}/<class>/*.{png,jpg,jpeg}`, or from a `.tar.gz`/`.tgz`/`.tar`/`.zip`
archive of one (optionally wrapped in a single top-level directory). Images are decoded
once (in worker processes when there are spare cores) and cached (`cache`), then split,
subset and shuffled by `splits.make_splits`.

Every problem with the data itself raises `DataError` (a `ValueError`) whose message is one
line naming the problem and the path.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import multiprocessing
import os
import pathlib
import re
import sys
import tarfile
import zipfile
import zlib
from concurrent import futures
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxadv.data.cache import cache_path, default_cache_dir, hash_file, hash_strings, read_cache, write_cache
from jaxadv.data.splits import Dataset, Splits, make_splits

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

# Below this many images a process pool costs more to start (each spawned worker imports
# this package, hence JAX, and the parent's __main__) than it saves.
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

    The source order is by split, class folder and path (TFDS: record order). The
    returned splits are not in that order: `make_splits` puts each one in a seeded
    class-balanced order, so any prefix of a split is a seeded, class-balanced sample,
    and each example's `index` is its position in the full source split (train and
    validation: the training split; test: the test split).

    Args:
        source: `"tfds"`, `"tfds:DATA_DIR"`, a directory, or an archive path.
        cache_dir: where decoded arrays are cached; default `$JAXADV_CACHE` or
            `~/.cache/jaxadv`.
        val_size: number of training examples held out, class-balanced, as the
            validation split (0 for none).
        train_subset: if set, keep this many class-balanced training examples (chosen
            after the validation split is removed).
        test_subset: if set, keep this many class-balanced test examples.
        seed: seeds the validation split, the subsets and the order of each split. Each
            draws from its own stream, so e.g. changing `train_subset` changes neither
            the validation split nor its order.
        progress: show a tqdm progress bar on stderr while decoding.
        num_workers: decoding processes. None: one per usable CPU (max 8) on machines
            with at least 4 usable CPUs, else decode in this process. 0 or 1: decode in
            this process. Fewer than 4096 images are always decoded in-process. Worker
            processes are spawned, so a script that calls `load` at import time needs
            an `if __name__ == "__main__":` guard (or `num_workers=0`).

    Returns:
        `Splits` with uint8[N,32,32,3] images, int32[N] labels and int64[N] source
        indices, each split in a seeded class-balanced order.

    Raises:
        DataError: the source is missing, of an unknown kind, empty, unreadable,
            inconsistent (class folders), or holds a corrupt or non-32x32 image.
        ValueError: `val_size` or a subset size is negative or larger than the split.
    """
    cache_dir = default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir).expanduser()
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
        digest = hash_strings(f"{rel}\0{size}\0{mtime}" for rel, size, mtime in files)
        description = f"folder {path} (fingerprint {digest[:12]})"
    else:
        files = None
        digest = hash_file(path)
        description = f"archive {path} (sha256 {digest[:12]})"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip(os.sep)))
    cache_file = cache_path(cache_dir, stem, kind, digest)

    cached = read_cache(cache_file, IMAGE_SHAPE)
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
    write_cache(cache_file, train, test)
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
    digest = hash_strings([f"{info.full_name}", str(data_dir), *map(str, sizes)])
    cache_file = cache_path(cache_dir, "tfds", "cifar10", digest)
    description = f"tfds {info.full_name} ({data_dir or 'default data dir'})"
    cached = read_cache(cache_file, IMAGE_SHAPE)
    if cached is not None:
        return (*cached, description)
    train, test = (_read_tfds_split(s, split, progress) for s, split in zip(sources, SPLIT_DIRS))
    write_cache(cache_file, train, test)
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
