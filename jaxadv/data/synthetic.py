"""Synthetic CIFAR-shaped data for tests and smoke runs, and writing arrays as a folder tree."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from jaxadv.data.splits import Dataset, Splits


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
        `Splits` with uint8[N, image_size, image_size, 3] images and int32[N] labels. Each
        split is its own source (`index = arange(N)`) and its labels are a seeded random
        permutation, balanced over the whole split but not in every prefix (ordering them
        so would change the arrays that seeded tests and smoke runs rely on).
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
