"""CIFAR-10-shaped data: load once into uint8 NumPy arrays, cache, split; augment on device.

Host side (NumPy, run once):

- `load(source)` (`sources`) reads CIFAR-10 from TFDS (`"tfds"`), from a folder tree
  `ROOT/{train,test}/<class>/*.{png,jpg,jpeg}`, or from a `.tar.gz`/`.tgz`/`.tar`/`.zip`
  archive of one. Images are decoded once (in worker processes when there are spare
  cores) and cached as an `.npz` keyed by a fingerprint of the source (`cache`), so later
  loads take well under a second.
- `make_splits` (`splits`) holds out a seeded, class-balanced validation split, takes
  optional seeded, class-balanced subsets, and puts every split in a seeded
  class-balanced order: any prefix of a split is a class-balanced sample. Each example
  carries `Dataset.index`, its position in its source split.
- `synthetic(...)` (`synthetic`) builds a small, learnable, CIFAR-shaped data set for tests
  and smoke runs; `write_image_tree(...)` writes arrays back out as a folder tree.

Device side (JAX, inside the jitted step; `augment`):

- `augment(key, x)`: per-example random crop after padding plus random horizontal flip.
- `to_float(x)`: uint8 -> float32 in [0, 1].

Every problem with the data itself raises `DataError` (a `ValueError`) whose message is one
line naming the problem and the path.
"""

from jaxadv.data.augment import augment, crop, to_float
from jaxadv.data.sources import (
    ARCHIVE_SUFFIXES,
    CIFAR10_CLASSES,
    IMAGE_EXTENSIONS,
    IMAGE_SHAPE,
    SPLIT_DIRS,
    DataError,
    decode_images,
    load,
)
from jaxadv.data.splits import Dataset, Splits, balanced_indices, balanced_order, make_splits
from jaxadv.data.synthetic import synthetic, write_image_tree

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SHAPE",
    "SPLIT_DIRS",
    "DataError",
    "Dataset",
    "Splits",
    "augment",
    "balanced_indices",
    "balanced_order",
    "crop",
    "decode_images",
    "load",
    "make_splits",
    "synthetic",
    "to_float",
    "write_image_tree",
]
