"""Test helpers: tiny CIFAR-style folder trees and archives of them, built in tmp dirs."""

from __future__ import annotations

import pathlib
import tarfile
import zipfile

import numpy as np

from jaxadv import data

# Deliberately not in sorted order: class ids must follow the sorted folder names.
CLASS_NAMES = ("zebra", "ant", "moth")
SORTED = tuple(sorted(CLASS_NAMES))


def make_tree(root: pathlib.Path, *, per_class=(4, 2), fmt="png", seed=0, class_names=CLASS_NAMES):
    """Write `root/{train,test}/<class>/*.fmt` from synthetic images.

    Returns:
        (root, {"train": (images, labels), "test": (images, labels)}) where labels index
        `class_names` (the generation order, not the sorted order).
    """
    k = len(class_names)
    splits = data.synthetic(per_class[0] * k, per_class[1] * k, num_classes=k, seed=seed, val_size=0)
    arrays = {}
    for split, ds in (("train", splits.train), ("test", splits.test)):
        data.write_image_tree(root / split, ds.images, ds.labels, class_names, fmt=fmt)
        arrays[split] = (ds.images, ds.labels)
    return root, arrays


def make_archive(tree: pathlib.Path, out: pathlib.Path, *, wrap: str | None = None) -> pathlib.Path:
    """Pack the contents of `tree` into `out` (.tar.gz/.tgz/.tar/.zip), optionally under `wrap/`."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    arcname = lambda p: (f"{wrap}/" if wrap else "") + p.relative_to(tree).as_posix()  # noqa: E731
    name = out.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as zf:
            for p in files:
                zf.write(p, arcname(p))
    else:
        mode = "w:gz" if name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(out, mode) as tf:
            for p in files:
                tf.add(p, arcname(p))
    return out


def as_named_multiset(images: np.ndarray, labels: np.ndarray, class_names) -> list[tuple[str, bytes]]:
    """Order-free view of a split: sorted (class name, image bytes) pairs."""
    return sorted((class_names[int(y)], x.tobytes()) for x, y in zip(images, labels))


def assert_matches(splits, arrays):
    """Loaded splits hold exactly the written images, each under its own class name (in any order)."""
    assert splits.class_names == SORTED
    for split in ("train", "test"):
        ds = getattr(splits, split)
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
        assert ds.labels.dtype == np.int32
        assert as_named_multiset(ds.images, ds.labels, SORTED) == as_named_multiset(*arrays[split], CLASS_NAMES)


def one_line_error(excinfo, *fragments):
    """The raised error's message is one line and names every fragment."""
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message


def toy(n_per_class=(20, 20, 20), seed=0) -> data.Dataset:
    """A source split whose images encode their own position (read it back with `ids`)."""
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int32)
    labels = np.random.default_rng(seed).permutation(labels)
    images = np.arange(len(labels), dtype=np.uint32)[:, None, None, None].view(np.uint8)[..., :3]
    images = np.broadcast_to(images.reshape(-1, 1, 1, 3), (len(labels), 32, 32, 3)).copy()
    return data.Dataset(images, labels, tuple("abcdefghijklmnopqrstuvwxyz"[: len(n_per_class)]))


def ids(ds: data.Dataset) -> np.ndarray:
    """The source positions encoded in the pixels of `toy` examples."""
    return (ds.images[:, 0, 0, :].astype(np.uint32) @ np.array([1, 256, 65536], np.uint32)).astype(np.int64)


def assert_prefixes_balanced(labels: np.ndarray, num_classes: int, step: int = 10):
    """Every prefix of length step, 2 * step, ... has class counts within one of each other
    (among the classes that still have examples left after the prefix)."""
    total = np.bincount(labels, minlength=num_classes)
    for m in range(step, len(labels) + 1, step):
        counts = np.bincount(labels[:m], minlength=num_classes)
        open_classes = counts < total  # a class that ran out cannot keep up
        if open_classes.any():
            assert counts.max() - counts[open_classes].min() <= 1, (m, counts.tolist())
