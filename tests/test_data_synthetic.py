"""Tests for jaxadv.data.synthetic: the synthetic data set and write_image_tree."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

from jaxadv import data


def test_synthetic_shapes_balance_determinism():
    s = data.synthetic(40, 20, num_classes=4, seed=1, val_size=8, image_size=16)
    assert s.train.images.shape == (40, 16, 16, 3) and s.train.images.dtype == np.uint8
    assert s.val.labels.shape == (8,) and s.test.labels.dtype == np.int32
    assert np.bincount(s.train.labels).tolist() == [10] * 4
    assert s.class_names == ("class_0", "class_1", "class_2", "class_3")
    make = functools.partial(data.synthetic, 40, 20, num_classes=4, val_size=8, image_size=16)
    again, other = make(seed=1), make(seed=2)
    assert np.array_equal(again.train.images, s.train.images) and np.array_equal(again.test.labels, s.test.labels)
    assert not np.array_equal(other.train.images, s.train.images)
    assert s.train.images.std() > 20  # not a constant image
    for ds in (s.train, s.val, s.test):
        assert ds.index.dtype == np.int64 and np.array_equal(ds.index, np.arange(len(ds)))  # each its own source


def test_synthetic_is_learnable_by_nearest_class_mean():
    s = data.synthetic(500, 500, seed=0)
    x_train = s.train.images.reshape(len(s.train), -1).astype(np.float32)
    means = np.stack([x_train[s.train.labels == k].mean(0) for k in range(10)])
    x_test = s.test.images.reshape(len(s.test), -1).astype(np.float32)
    distances = ((x_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == s.test.labels).mean()
    assert accuracy > 0.8, accuracy


def test_write_image_tree_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0, 1])
    root = data.write_image_tree(tmp_path / "t", images, labels, ("x", "y"))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "x/00000.png", "x/00003.png", "y/00001.png", "y/00002.png", "y/00004.png"
    ]
    assert np.array_equal(np.asarray(Image.open(root / "y" / "00002.png")), images[2])
    with pytest.raises(ValueError, match="fmt"):
        data.write_image_tree(tmp_path / "t", images, labels, ("x", "y"), fmt="bmp")
