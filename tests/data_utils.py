"""Test helpers: tiny CIFAR-style folder trees and archives of them, built in tmp dirs."""

from __future__ import annotations

import pathlib
import tarfile
import zipfile

import numpy as np

from jaxadv import data

# Deliberately not in sorted order: class ids must follow the sorted folder names.
CLASS_NAMES = ("zebra", "ant", "moth")


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
