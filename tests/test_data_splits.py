"""Tests for jaxadv.data.splits: Dataset, balanced selection, balanced order, make_splits, load's splits."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from data_utils import assert_prefixes_balanced, ids, make_tree, toy
from jaxadv import data
from jaxadv.data import cache


@pytest.fixture
def load(tmp_path):
    """`data.load` with a per-test cache dir and no progress bar."""
    return functools.partial(data.load, cache_dir=tmp_path / "cache", val_size=0, progress=False)


def old_selection(train_labels, test_labels, *, val_size, train_subset, test_subset, seed):
    """The (val, train, test) source positions that `make_splits` chose before splits were shuffled."""
    val_rng, train_rng, test_rng = np.random.default_rng(seed).spawn(3)
    val = data.balanced_indices(train_labels, val_size, val_rng)
    rest = np.setdiff1d(np.arange(len(train_labels)), val, assume_unique=True)
    train = rest if train_subset is None else rest[data.balanced_indices(train_labels[rest], train_subset, train_rng)]
    test = np.arange(len(test_labels))
    if test_subset is not None:
        test = data.balanced_indices(test_labels, test_subset, test_rng)
    return val, train, test


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def test_dataset_index_defaults_to_arange_and_take_carries_it():
    ds = toy((3, 3))
    assert ds.index.dtype == np.int64 and np.array_equal(ds.index, np.arange(6))
    sub = ds.take(np.array([4, 1, 2]))
    assert sub.index.tolist() == [4, 1, 2]
    assert sub.take(np.array([2, 0])).index.tolist() == [2, 4]
    assert np.array_equal(ids(sub.take(np.array([2, 0]))), [2, 4])
    assert len(ds.take(np.array([], np.int64))) == 0


@pytest.mark.parametrize(
    "index, match",
    [
        (np.arange(6, dtype=np.int32), r"index must be int64\[6\].*got int32\[6\]"),
        (np.arange(5, dtype=np.int64), r"index must be int64\[6\].*got int64\[5\]"),
        (np.zeros((6, 1), np.int64), r"index must be int64\[6\].*got int64\[6, 1\]"),
        (list(range(6)), r"index must be int64\[6\].*got list"),
        (np.array([0, 1, -2, 3, 4, 5], np.int64), r"index must hold positions .*got -2"),
    ],
)
def test_dataset_rejects_bad_index_in_one_line(index, match):
    ds = toy((3, 3))
    with pytest.raises(ValueError, match=match) as e:
        data.Dataset(ds.images, ds.labels, ds.class_names, index)
    assert "\n" not in str(e.value)


def test_dataset_rejects_bad_images_and_labels():
    ds = toy((3, 3))
    with pytest.raises(ValueError, match=r"images must be uint8\[N,H,W,3\]"):
        data.Dataset(ds.images.astype(np.float32), ds.labels, ds.class_names)
    with pytest.raises(ValueError, match=r"labels must be int32\[6\]"):
        data.Dataset(ds.images, ds.labels.astype(np.int64), ds.class_names)


# --------------------------------------------------------------------------------------
# balanced_indices / balanced_order
# --------------------------------------------------------------------------------------


def test_balanced_order_is_a_seeded_permutation_with_balanced_prefixes():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 30)).astype(np.int32)
    order = data.balanced_order(labels, np.random.default_rng(1))
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(300))
    assert_prefixes_balanced(labels[order], 10, step=1)
    assert np.array_equal(order, data.balanced_indices(labels, 300, np.random.default_rng(1), sort=False))
    assert np.array_equal(order, data.balanced_order(labels, np.random.default_rng(1)))
    assert not np.array_equal(order, data.balanced_order(labels, np.random.default_rng(2)))


def test_balanced_order_when_a_class_runs_out_and_when_empty():
    labels = np.repeat(np.arange(3), [2, 30, 31]).astype(np.int32)
    order = data.balanced_order(labels, np.random.default_rng(0))
    assert np.array_equal(np.sort(order), np.arange(63))
    assert_prefixes_balanced(labels[order], 3, step=1)
    assert sorted(labels[order[:6]].tolist()) == [0, 0, 1, 1, 2, 2]
    assert data.balanced_order(np.zeros(0, np.int32), np.random.default_rng(0)).shape == (0,)


# --------------------------------------------------------------------------------------
# make_splits
# --------------------------------------------------------------------------------------


def test_val_and_subsets_sizes_balance_disjointness_determinism():
    train, test = toy(), toy((10, 10, 10), seed=1)
    make = functools.partial(data.make_splits, train, test, source="toy", val_size=9, train_subset=12, test_subset=6)
    splits = make(seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 9, 6)
    for ds, per_class in ((splits.train, 4), (splits.val, 3), (splits.test, 2)):
        assert np.bincount(ds.labels, minlength=3).tolist() == [per_class] * 3
    assert not set(ids(splits.val)) & set(ids(splits.train))
    again, other = make(seed=3), make(seed=4)
    assert np.array_equal(ids(again.val), ids(splits.val)) and np.array_equal(ids(again.train), ids(splits.train))
    assert not np.array_equal(ids(other.val), ids(splits.val))
    # The validation split (its set and its order) does not depend on the subset sizes.
    assert np.array_equal(ids(data.make_splits(train, test, source="toy", val_size=9, seed=3).val), ids(splits.val))


def test_val_size_zero_and_full_and_uneven():
    train, test = toy(), toy()
    splits = data.make_splits(train, test, source="toy", val_size=0)
    assert len(splits.val) == 0 and len(splits.train) == 60 and splits.val.images.shape == (0, 32, 32, 3)
    assert splits.val.index.shape == (0,) and splits.val.index.dtype == np.int64
    # 10 over 3 classes: 4/3/3 in some order.
    counts = np.bincount(data.make_splits(train, test, source="toy", val_size=10).val.labels, minlength=3)
    assert sorted(counts.tolist()) == [3, 3, 4]
    # A class that runs out is filled in by the others.
    lopsided = toy((2, 30, 30))
    counts = np.bincount(data.make_splits(lopsided, test, source="toy", val_size=20).val.labels, minlength=3)
    assert counts.tolist()[0] == 2 and sum(counts) == 20 and abs(counts[1] - counts[2]) <= 1
    with pytest.raises(ValueError, match="val_size=61"):
        data.make_splits(train, test, source="toy", val_size=61)
    with pytest.raises(ValueError, match="train_subset=-1"):
        data.make_splits(train, test, source="toy", val_size=0, train_subset=-1)


def test_every_prefix_of_every_split_is_balanced():
    train, test = toy((60,) * 10), toy((30,) * 10, seed=1)
    for kwargs in (dict(val_size=100), dict(val_size=50, train_subset=200, test_subset=100)):
        splits = data.make_splits(train, test, source="toy", seed=0, **kwargs)
        for ds in (splits.train, splits.val, splits.test):
            assert_prefixes_balanced(ds.labels, 10, step=10)
            # Not class-sorted any more: the first ten examples cover all ten classes.
            assert sorted(ds.labels[:10].tolist()) == list(range(10))


@pytest.mark.parametrize("seed", [0, 3, 17])
@pytest.mark.parametrize("sizes", [(9, 12, 6), (10, None, None), (0, 7, 29)])
def test_selected_sets_are_those_chosen_before_shuffling(seed, sizes):
    val_size, train_subset, test_subset = sizes
    train, test = toy((25, 20, 15)), toy((10, 10, 10), seed=1)
    splits = data.make_splits(train, test, source="toy", val_size=val_size, train_subset=train_subset,
                              test_subset=test_subset, seed=seed)  # fmt: skip
    expected = old_selection(train.labels, test.labels, val_size=val_size, train_subset=train_subset,
                             test_subset=test_subset, seed=seed)  # fmt: skip
    for ds, want in zip((splits.val, splits.train, splits.test), expected):
        assert np.array_equal(np.sort(ds.index), want)


def test_selection_streams_are_the_first_three_of_six():
    """`spawn(6)`'s first three children are `spawn(3)`'s: the val/train/test selection streams."""
    for seed in (0, 1, 12345):
        six, three = np.random.default_rng(seed).spawn(6), np.random.default_rng(seed).spawn(3)
        for a, b in zip(six[:3], three):
            assert np.array_equal(a.integers(0, 2**62, 8), b.integers(0, 2**62, 8))


def test_selection_golden_from_the_single_module_version():
    """Source positions chosen by the class-ordered `make_splits` (git 13e7e22) for this toy."""
    splits = data.make_splits(toy(), toy((10, 10, 10), seed=1), source="toy", val_size=9, train_subset=12,
                              test_subset=6, seed=3)  # fmt: skip
    assert np.sort(splits.val.index).tolist() == [9, 16, 18, 25, 27, 43, 44, 47, 57]
    assert np.sort(splits.train.index).tolist() == [3, 6, 7, 14, 17, 22, 31, 33, 34, 35, 50, 58]
    assert np.sort(splits.test.index).tolist() == [11, 12, 14, 15, 16, 20]


def test_examples_are_the_source_examples_at_their_index():
    train, test = toy((20, 20, 20)), toy((10, 10, 10), seed=1)
    splits = data.make_splits(train, test, source="toy", val_size=9, train_subset=30, test_subset=12, seed=2)
    for ds, source in ((splits.train, train), (splits.val, train), (splits.test, test)):
        assert np.array_equal(ids(ds), ds.index)
        assert np.array_equal(ds.images, source.images[ds.index])
        assert np.array_equal(ds.labels, source.labels[ds.index])
    # Index is relative to the given splits' own index (here: a subset of a larger source).
    sub = train.take(np.arange(10, 60))
    nested = data.make_splits(sub, test, source="toy", val_size=6, seed=0)
    assert np.array_equal(ids(nested.val), nested.val.index) and nested.val.index.min() >= 10


def test_order_is_deterministic_per_seed_and_differs_across_seeds():
    train, test = toy(), toy((10, 10, 10), seed=1)
    make = functools.partial(data.make_splits, train, test, source="toy", val_size=0)
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    for split in ("train", "test"):
        assert np.array_equal(getattr(a, split).index, getattr(b, split).index)
        assert np.array_equal(getattr(a, split).images, getattr(b, split).images)
        # The full splits: same set of examples, in another order.
        assert np.array_equal(np.sort(getattr(a, split).index), np.sort(getattr(c, split).index))
        assert not np.array_equal(getattr(a, split).index, getattr(c, split).index)


# --------------------------------------------------------------------------------------
# load(): the same, from a folder source
# --------------------------------------------------------------------------------------


def test_load_applies_val_and_subsets(tmp_path, load):
    root, _ = make_tree(tmp_path / "cifar")
    splits = load(root, val_size=3, train_subset=6, test_subset=3, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    for ds in (splits.train, splits.val, splits.test):
        assert np.bincount(ds.labels, minlength=3).tolist() == [len(ds) // 3] * 3


def test_load_examples_are_the_source_examples_at_their_index(tmp_path, load):
    root, _ = make_tree(tmp_path / "cifar", per_class=(8, 6))
    full = load(root)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    source_train, source_test = cache.read_cache(cache_file, data.IMAGE_SHAPE)  # the source order
    for seed in (0, 1):
        splits = load(root, val_size=6, train_subset=9, test_subset=6, seed=seed)
        expected = old_selection(source_train.labels, source_test.labels, val_size=6, train_subset=9,
                                 test_subset=6, seed=seed)  # fmt: skip
        for ds, source, want in zip((splits.val, splits.train, splits.test),
                                    (source_train, source_train, source_test), expected):  # fmt: skip
            assert np.array_equal(ds.images, source.images[ds.index])
            assert np.array_equal(ds.labels, source.labels[ds.index])
            assert np.array_equal(np.sort(ds.index), want)
            assert_prefixes_balanced(ds.labels, 3, step=3)
    # Loading the full splits twice: the same examples under the same index.
    again = load(root, seed=7)
    for split in ("train", "test"):
        a, b = getattr(full, split), getattr(again, split)
        assert np.array_equal(a.images[np.argsort(a.index)], b.images[np.argsort(b.index)])
