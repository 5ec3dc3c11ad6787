"""In-memory splits: `Dataset`, `Splits`, and seeded class-balanced selection and ordering.

`make_splits` chooses the validation set and the subsets exactly as before the package
split (same seed, same NumPy streams, same sets of examples) and then puts every split in
a seeded class-balanced order, so any prefix of a split is a class-balanced sample. Each
example carries `index`, its position in its source split, so results computed on a
subset can be traced back to (and compared on) the same source images.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split held in host memory.

    Attributes:
        images: uint8[N, H, W, 3], NHWC (H = W = 32 for CIFAR-10).
        labels: int32[N], class ids in [0, len(class_names)).
        class_names: class names; `class_names[i]` is the name of class id `i`.
        index: int64[N], each example's position in its source split: the full training
            split for train and validation examples, the full test split for test
            examples. Defaults to `arange(N)` (the data is its own source).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    index: np.ndarray = None  # type: ignore[assignment]  # None -> arange(N), set in __post_init__

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8[N,H,W,3], got {self.images.dtype}{list(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.dtype != np.int32 or self.labels.shape != (n,):
            raise ValueError(f"labels must be int32[{n}], got {self.labels.dtype}{list(self.labels.shape)}")
        if self.index is None:
            object.__setattr__(self, "index", np.arange(n, dtype=np.int64))
        index = self.index
        if not isinstance(index, np.ndarray) or index.dtype != np.int64 or index.shape != (n,):
            got = f"{index.dtype}{list(index.shape)}" if isinstance(index, np.ndarray) else type(index).__name__
            raise ValueError(f"index must be int64[{n}] (positions in the source split), got {got}")
        if n and index.min() < 0:
            raise ValueError(f"index must hold positions in the source split (>= 0), got {index.min()}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, indices: np.ndarray) -> Dataset:
        """The examples at `indices` (positions in this split), in that order, with their `index`."""
        return Dataset(self.images[indices], self.labels[indices], self.class_names, self.index[indices])


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
    """Hold out a class-balanced validation split from `train`, take subsets, shuffle.

    The seed spawns six independent NumPy streams: three choose the examples (the
    validation set, the train subset, the test subset) and three order the splits. The
    first three are the streams used before the splits were shuffled, so the same seed
    still selects the same sets of examples; and changing e.g. `train_subset` changes
    neither the validation set nor its order.

    Every split is then in a seeded class-balanced order (`balanced_order`): any prefix
    of a split (`splits.test.images[:256]`, the first batches) is a seeded,
    class-balanced sample, with class counts within one of each other as far as the
    data allows.

    Args:
        train: the full training split.
        test: the full test split.
        source: description stored in the result.
        val_size: validation examples taken from `train` (0 allowed).
        train_subset: class-balanced size of the remaining training split, or None (all).
        test_subset: class-balanced size of the test split, or None (all).
        seed: seeds the selection and the order of all three splits.

    Returns:
        The `Splits`. Each example's `index` is its position in `train` (for the train
        and validation splits) or `test`, as given by their own `index` (`arange` for
        splits straight from a source).
    """
    val_rng, train_rng, test_rng, *order_rngs = np.random.default_rng(seed).spawn(6)
    val_idx = balanced_indices(train.labels, val_size, val_rng, what="val_size")
    rest = np.setdiff1d(np.arange(len(train)), val_idx, assume_unique=True)
    val, train = train.take(val_idx), train.take(rest)
    if train_subset is not None:
        train = train.take(balanced_indices(train.labels, train_subset, train_rng, what="train_subset"))
    if test_subset is not None:
        test = test.take(balanced_indices(test.labels, test_subset, test_rng, what="test_subset"))
    train, val, test = (ds.take(balanced_order(ds.labels, rng)) for ds, rng in zip((train, val, test), order_rngs))
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
            too.

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
    chosen = perm[np.lexsort((class_turn[shuffled], rank))[:n]].astype(np.int64, copy=False)
    return np.sort(chosen) if sort else chosen


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation of `labels` in which every prefix is class-balanced.

    The classes take turns in a random order (the same order in every round), each
    contributing its next randomly chosen example; a class that runs out drops out of
    the turns. So a prefix of length m holds `m // K` or `m // K + 1` examples of each
    class that still has examples left.

    Args:
        labels: int[N] class ids.
        rng: NumPy generator (the only randomness used).

    Returns:
        int64[N] permutation of `arange(N)`; `labels[order]` is the balanced sequence.
    """
    return balanced_indices(labels, len(labels), rng, sort=False)
