"""Tests for jaxadv.data.sources: folder and archive readers, decoding pool, errors, TFDS mock."""

from __future__ import annotations

import functools
import importlib.util
import io
import tarfile
import time
import zipfile
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

from data_utils import (
    CLASS_NAMES,
    SORTED,
    assert_matches,
    assert_prefixes_balanced,
    make_archive,
    make_tree,
    one_line_error,
)
from jaxadv import data
from jaxadv.data import DataError, sources


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "cifar")


@pytest.fixture
def load(tmp_path):
    """`data.load` with a per-test cache dir and no progress bar."""
    return functools.partial(data.load, cache_dir=tmp_path / "cache", val_size=0, progress=False)


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(sources, "_decode_chunk", fail)
    monkeypatch.setattr(sources, "_iter_archive", fail)


# --------------------------------------------------------------------------------------
# Folder and archive sources
# --------------------------------------------------------------------------------------


def test_folder_source_class_ids_follow_sorted_names(tree, load):
    root, arrays = tree
    splits = load(root)
    assert_matches(splits, arrays)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 0, 6)
    assert splits.train.class_names == splits.test.class_names == SORTED
    assert str(root) in splits.source
    # Source order is class folder by class folder; the loaded order is shuffled.
    assert np.array_equal(splits.train.labels[np.argsort(splits.train.index)], np.repeat([0, 1, 2], 4))
    assert np.array_equal(splits.test.labels[np.argsort(splits.test.index)], np.repeat([0, 1, 2], 2))


@pytest.mark.parametrize(
    "name, wrap",
    [("d.tar.gz", None), ("d.tgz", "cifar10"), ("d.tar", None), ("d.zip", None), ("d.zip", "wrapped")],
)
def test_archive_sources(tmp_path, tree, load, name, wrap):
    root, arrays = tree
    archive = make_archive(root, tmp_path / name, wrap=wrap)
    splits = load(archive)
    assert_matches(splits, arrays)
    # Same source order as the folder, hence the same examples at the same positions.
    from_folder = load(root)
    for split in ("train", "test"):
        a, b = getattr(splits, split), getattr(from_folder, split)
        assert np.array_equal(a.index, b.index) and np.array_equal(a.images, b.images)


def test_upper_case_jpeg_extension_and_grayscale_converted(tmp_path, load):
    root, arrays = make_tree(tmp_path / "jpg", fmt="JPG")
    gray = root / "train" / "ant" / "gray.JPEG"
    Image.new("L", (32, 32), 77).save(gray, format="JPEG")
    splits = load(root)
    assert len(splits.train) == 13
    # JPEG is lossy: each loaded image must be nearest to an original of its own class.
    originals, original_labels = arrays["test"]
    distance = np.abs(
        splits.test.images[:, None].astype(np.float32) - originals[None].astype(np.float32)
    ).mean(axis=(2, 3, 4))
    assert np.all(distance.min(1) < 0.5 * np.median(distance))
    nearest_names = [CLASS_NAMES[original_labels[j]] for j in distance.argmin(1)]
    assert nearest_names == [SORTED[y] for y in splits.test.labels]
    assert np.any(np.all(splits.train.images == 77, axis=(1, 2, 3)))


def test_files_outside_train_test_and_hidden_files_are_ignored(tmp_path, tree, load):
    root, arrays = tree
    (root / "README.txt").write_text("not an image")
    (root / "previews").mkdir()
    Image.new("RGB", (64, 64)).save(root / "previews" / "grid.png")
    (root / "train" / "ant" / ".hidden.png").write_bytes(b"junk")
    zipped = tmp_path / "mac.zip"
    make_archive(root, zipped)
    with zipfile.ZipFile(zipped, "a") as zf:
        zf.writestr("__MACOSX/train/ant/._00000.png", b"resource fork")
    assert_matches(load(root), arrays)
    assert_matches(load(zipped), arrays)


def test_progress_bar_on_stderr(tree, tmp_path, capsys):
    data.load(tree[0], cache_dir=tmp_path / "c", val_size=0, progress=True)
    assert "decoding" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Decoding pool
# --------------------------------------------------------------------------------------


def test_parallel_decoding_matches_serial_and_reports_bad_files(tree, monkeypatch):
    files = sorted(p for p in tree[0].rglob("*.png"))
    names, blobs = [p.name for p in files], [p.read_bytes() for p in files]
    monkeypatch.setattr(sources, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(sources, "_CHUNK_SIZE", 5)
    serial = data.decode_images(names, blobs, num_workers=0)
    parallel = data.decode_images(names, blobs, num_workers=2)
    assert np.array_equal(serial, parallel)
    with pytest.raises(DataError, match="bad image broken.png in src: cannot decode"):
        data.decode_images(names + ["broken.png"], blobs + [b"\x89PNG junk"], where="src", num_workers=2)


def test_broken_worker_pool_falls_back_to_in_process_decoding(tree, monkeypatch, caplog):
    class BrokenPool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, *args):
            future = futures.Future()
            future.set_exception(futures.process.BrokenProcessPool("worker died"))
            return future

        def shutdown(self, **kwargs):
            pass

    files = sorted(p for p in tree[0].rglob("*.png"))
    names, blobs = [p.name for p in files], [p.read_bytes() for p in files]
    monkeypatch.setattr(sources, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(sources.futures, "ProcessPoolExecutor", BrokenPool)
    images = data.decode_images(names, blobs, num_workers=2)
    assert np.array_equal(images, data.decode_images(names, blobs, num_workers=0))
    assert "decoding in this process instead" in caplog.text


def test_auto_workers_decode_in_process_on_few_cpus(tree, monkeypatch):
    """`num_workers=None` with fewer than `_AUTO_PARALLEL_MIN_CPUS` usable CPUs starts no pool."""

    def no_pool(*args, **kwargs):
        raise AssertionError("started a process pool")

    files = sorted(p for p in tree[0].rglob("*.png"))
    names, blobs = [p.name for p in files], [p.read_bytes() for p in files]
    monkeypatch.setattr(sources, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(sources, "_AUTO_PARALLEL_MIN_CPUS", 10**6)
    monkeypatch.setattr(sources.futures, "ProcessPoolExecutor", no_pool)
    assert data.decode_images(names, blobs, num_workers=None).shape == (len(files), 32, 32, 3)


# --------------------------------------------------------------------------------------
# Errors: one line each, naming the problem and the path
# --------------------------------------------------------------------------------------


def _png_bytes(size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _tar_with(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def test_error_missing_path(tmp_path, load):
    with pytest.raises(DataError, match="data source not found") as e:
        load(tmp_path / "nope.tar.gz")
    one_line_error(e, tmp_path / "nope.tar.gz")


def test_error_unknown_kind(tmp_path, load):
    (tmp_path / "data.rar").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown data source kind") as e:
        load(tmp_path / "data.rar")
    one_line_error(e, tmp_path / "data.rar", "tfds")


def test_error_empty_folder_and_archive(tmp_path, load):
    (tmp_path / "empty" / "train" / "ant").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images") as e:
        load(tmp_path / "empty")
    one_line_error(e, tmp_path / "empty")
    archive = _tar_with(tmp_path / "empty.tar.gz", {"train/ant/notes.txt": b"hi"})
    with pytest.raises(DataError, match="no images") as e:
        load(archive)
    one_line_error(e, archive)


@pytest.mark.parametrize("name", ["bad.tar.gz", "bad.tar", "bad.zip"])
def test_error_corrupt_archive(tmp_path, load, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match="cannot read archive") as e:
        load(tmp_path / name)
    one_line_error(e, tmp_path / name)


def test_error_truncated_archive(tmp_path, tree, load):
    archive = make_archive(tree[0], tmp_path / "d.tar.gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read archive") as e:
        load(archive)
    one_line_error(e, archive)


def test_error_class_folders_differ(tmp_path, tree, load):
    root, _ = tree
    for p in (root / "test" / "moth").iterdir():
        p.unlink()
    (root / "test" / "moth").rmdir()
    with pytest.raises(DataError, match=r"class folders differ.*only in train: \['moth'\], only in test: \[\]") as e:
        load(root)
    one_line_error(e, root)


@pytest.mark.parametrize("split", ["train", "test"])
def test_error_missing_split_dir(tmp_path, load, split):
    members = {f"top/{s}/ant/0.png": _png_bytes() for s in ("train", "test") if s != split}
    archive = _tar_with(tmp_path / "d.tar.gz", members)
    with pytest.raises(DataError, match=f"missing {split}/ directory") as e:
        load(archive)
    one_line_error(e, archive)


def test_error_no_split_dirs_at_all(tmp_path, load):
    archive = _tar_with(tmp_path / "d.tar.gz", {"a/x.png": _png_bytes(), "b/y.png": _png_bytes()})
    with pytest.raises(DataError, match="missing train/ directory") as e:
        load(archive)
    one_line_error(e, archive)


def test_error_corrupt_image_names_member(tmp_path, load):
    members = {"cifar/train/ant/0.png": _png_bytes(), "cifar/test/ant/0.png": _png_bytes()}
    members["cifar/train/ant/bad.png"] = _png_bytes()[:40]  # truncated PNG
    archive = _tar_with(tmp_path / "d.tar.gz", members)
    with pytest.raises(DataError, match=r"bad image cifar/train/ant/bad.png in .*: cannot decode") as e:
        load(archive)
    one_line_error(e, archive)


def test_error_wrong_size_image_names_file(tmp_path, tree, load):
    root, _ = tree
    Image.new("RGB", (32, 31)).save(root / "test" / "ant" / "odd.png")
    with pytest.raises(DataError, match=r"bad image test/ant/odd.png in .*: size 32x31, expected 32x32") as e:
        load(root)
    one_line_error(e, root)


def test_error_nested_too_deep(tmp_path, tree, load):
    root, _ = tree
    (root / "train" / "ant" / "extra").mkdir()
    Image.new("RGB", (32, 32)).save(root / "train" / "ant" / "extra" / "x.png")
    with pytest.raises(DataError, match="unexpected image location train/ant/extra/x.png") as e:
        load(root)
    one_line_error(e, root)


def test_data_error_is_value_error_and_one_line():
    err = DataError("first\nsecond")
    assert isinstance(err, ValueError) and str(err) == "first second"


# --------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------


def test_tfds_source_with_mock_data(tmp_path, monkeypatch):
    """`tfds.testing.mock_data` patches `as_data_source`, so `tfds.data_source` works without TF.

    USE_CODE is needed: no cifar10 metadata ships with the TFDS testing package. The mocked
    ArrayRecord source supports `ds[i]` but not `ds.__getitems__` (TFDS binds its mock
    incorrectly), which is why `jaxadv.data.sources` reads records one at a time.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = data.load("tfds", cache_dir=tmp_path, val_size=2, progress=False)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 8)
        assert splits.class_names == data.CIFAR10_CLASSES
        for ds in (splits.train, splits.val, splits.test):
            assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
            assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() < 10
        assert sorted([*splits.train.index, *splits.val.index]) == list(range(8))
        assert sorted(splits.test.index) == list(range(8))
        assert splits.source.startswith("tfds cifar10/")
        forbid_decoding(monkeypatch)
        monkeypatch.setattr(sources, "_read_tfds_split", lambda *a: (_ for _ in ()).throw(AssertionError("no cache")))
        again = data.load("tfds", cache_dir=tmp_path, val_size=2, progress=False)
        assert np.array_equal(again.test.images, splits.test.images)
        assert np.array_equal(again.test.index, splits.test.index)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow installed: would prepare")
def test_tfds_unprepared_without_tensorflow_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match=r"not prepared .* pip install 'jaxadv\[tfds-prepare\]'") as e:
        data.load(f"tfds:{tmp_path}", cache_dir=tmp_path / "cache", progress=False)
    one_line_error(e, tmp_path)


# --------------------------------------------------------------------------------------
# Real data (slow)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_archive(real_archive, tmp_path):
    start = time.perf_counter()
    splits = data.load(real_archive, cache_dir=tmp_path, val_size=5000, progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = data.load(real_archive, cache_dir=tmp_path, val_size=5000, progress=False)
    warm = time.perf_counter() - start
    print(f"\nreal archive: cold load (decode + cache) {cold:.1f}s, cached load {warm:.1f}s")
    assert splits.class_names == data.CIFAR10_CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert np.bincount(splits.train.labels).tolist() == [4500] * 10
    assert np.bincount(splits.val.labels).tolist() == [500] * 10
    assert np.bincount(splits.test.labels).tolist() == [1000] * 10
    for ds in (splits.train, splits.val, splits.test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3) and ds.labels.dtype == np.int32
    # The README's per-channel test means for this JPEG copy.
    np.testing.assert_allclose(splits.test.images.mean((0, 1, 2)) / 255, [0.494, 0.485, 0.450], atol=2e-3)
    # Shuffled, class-balanced in every prefix, and traceable to the source split.
    for ds in (splits.train, splits.val, splits.test):
        assert_prefixes_balanced(ds.labels, 10, step=100)
    assert np.array_equal(np.sort(splits.test.index), np.arange(10000))
    assert np.array_equal(np.sort(np.concatenate([splits.train.index, splits.val.index])), np.arange(50000))
    assert np.array_equal(again.val.index, splits.val.index)
    # The validation set is the one chosen before splits were shuffled (same seed streams).
    val_rng = np.random.default_rng(0).spawn(3)[0]
    source_train_labels = np.empty(50000, np.int32)
    source_train_labels[splits.train.index] = splits.train.labels
    source_train_labels[splits.val.index] = splits.val.labels
    expected_val = data.balanced_indices(source_train_labels, 5000, val_rng, what="val_size")
    assert np.array_equal(np.sort(splits.val.index), expected_val)
