"""Tests for jaxadv.data: sources, cache, splits, errors, TFDS mock, synthetic data, augmentation."""

from __future__ import annotations

import functools
import importlib.util
import io
import tarfile
import time
import zipfile
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_utils import CLASS_NAMES, as_named_multiset, make_archive, make_tree
from jaxadv import data
from jaxadv.data import DataError

SORTED = tuple(sorted(CLASS_NAMES))


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "cifar")


@pytest.fixture
def load(tmp_path):
    """`data.load` with a per-test cache dir and no progress bar."""
    return functools.partial(data.load, cache_dir=tmp_path / "cache", val_size=0, progress=False)


def assert_matches(splits, arrays):
    """Loaded splits hold exactly the written images, each under its own class name."""
    assert splits.class_names == SORTED
    for split in ("train", "test"):
        ds = getattr(splits, split)
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
        assert ds.labels.dtype == np.int32
        assert as_named_multiset(ds.images, ds.labels, SORTED) == as_named_multiset(*arrays[split], CLASS_NAMES)


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def test_folder_source_class_ids_follow_sorted_names(tree, load):
    root, arrays = tree
    splits = load(root)
    assert_matches(splits, arrays)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 0, 6)
    assert splits.train.class_names == splits.test.class_names == SORTED
    assert str(root) in splits.source


@pytest.mark.parametrize(
    "name, wrap",
    [("d.tar.gz", None), ("d.tgz", "cifar10"), ("d.tar", None), ("d.zip", None), ("d.zip", "wrapped")],
)
def test_archive_sources(tmp_path, tree, load, name, wrap):
    root, arrays = tree
    archive = make_archive(root, tmp_path / name, wrap=wrap)
    assert_matches(load(archive), arrays)


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


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _toy(n_per_class=(20, 20, 20), seed=0):
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int32)
    labels = np.random.default_rng(seed).permutation(labels)
    images = np.arange(len(labels), dtype=np.uint32)[:, None, None, None].view(np.uint8)[..., :3]
    images = np.broadcast_to(images.reshape(-1, 1, 1, 3), (len(labels), 32, 32, 3)).copy()
    return data.Dataset(images, labels, ("a", "b", "c"))


def _ids(ds):
    """Identify examples by the index encoded in their pixels."""
    return ds.images[:, 0, 0, :].astype(np.uint32) @ np.array([1, 256, 65536], np.uint32)


def test_val_and_subsets_sizes_balance_disjointness_determinism():
    train, test = _toy(), _toy((10, 10, 10), seed=1)
    make = functools.partial(data.make_splits, train, test, source="toy", val_size=9, train_subset=12, test_subset=6)
    splits = make(seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 9, 6)
    for ds, per_class in ((splits.train, 4), (splits.val, 3), (splits.test, 2)):
        assert np.bincount(ds.labels, minlength=3).tolist() == [per_class] * 3
    assert not set(_ids(splits.val)) & set(_ids(splits.train))
    again, other = make(seed=3), make(seed=4)
    assert np.array_equal(_ids(again.val), _ids(splits.val)) and np.array_equal(_ids(again.train), _ids(splits.train))
    assert not np.array_equal(_ids(other.val), _ids(splits.val))
    # The validation split does not depend on the subset sizes.
    assert np.array_equal(_ids(data.make_splits(train, test, source="toy", val_size=9, seed=3).val), _ids(splits.val))


def test_val_size_zero_and_full_and_uneven():
    train, test = _toy(), _toy()
    splits = data.make_splits(train, test, source="toy", val_size=0)
    assert len(splits.val) == 0 and len(splits.train) == 60 and splits.val.images.shape == (0, 32, 32, 3)
    # 10 over 3 classes: 4/3/3 in some order.
    counts = np.bincount(data.make_splits(train, test, source="toy", val_size=10).val.labels, minlength=3)
    assert sorted(counts.tolist()) == [3, 3, 4]
    # A class that runs out is filled in by the others.
    lopsided = _toy((2, 30, 30))
    counts = np.bincount(data.make_splits(lopsided, test, source="toy", val_size=20).val.labels, minlength=3)
    assert counts.tolist()[0] == 2 and sum(counts) == 20 and abs(counts[1] - counts[2]) <= 1
    with pytest.raises(ValueError, match="val_size=61"):
        data.make_splits(train, test, source="toy", val_size=61)
    with pytest.raises(ValueError, match="train_subset=-1"):
        data.make_splits(train, test, source="toy", val_size=0, train_subset=-1)


def test_load_applies_val_and_subsets(tree, load):
    root, _ = tree
    splits = load(root, val_size=3, train_subset=6, test_subset=3, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    for ds in (splits.train, splits.val, splits.test):
        assert np.bincount(ds.labels, minlength=3).tolist() == [len(ds) // 3] * 3


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(data, "_decode_chunk", fail)
    monkeypatch.setattr(data, "_iter_archive", fail)


def _count_decoding(monkeypatch):
    calls = []
    original = data._decode_chunk
    monkeypatch.setattr(data, "_decode_chunk", lambda *a: calls.append(1) or original(*a))
    return calls


def test_cache_hit_does_not_decode(tmp_path, tree, load, monkeypatch):
    root, arrays = tree
    archive = make_archive(root, tmp_path / "d.tgz")
    first = load(archive, val_size=3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    _forbid_decoding(monkeypatch)
    second = load(archive, val_size=3)
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.val.labels, second.val.labels)
    assert_matches(load(archive), arrays)


def test_changed_archive_or_folder_is_decoded_again(tmp_path, tree, load, monkeypatch):
    root, _ = tree
    archive = make_archive(root, tmp_path / "d.tar.gz")
    load(archive)
    load(root)
    calls = _count_decoding(monkeypatch)
    load(archive)
    load(root)
    assert not calls
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(root / "test" / "ant" / "new.png")
    make_archive(root, archive)
    assert len(load(archive).test) == 7 and len(calls) == 1
    assert len(load(root).test) == 7 and len(calls) == 2
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # one per fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, tree, load, monkeypatch, damage, caplog):
    root, arrays = tree
    load(root)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    raw = bytearray(cache_file.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_byte":
        raw[len(raw) // 3] ^= 0x55  # inside the train images
    else:
        raw = bytearray(b"not a zip file")
    cache_file.write_bytes(raw)
    calls = _count_decoding(monkeypatch)
    assert_matches(load(root), arrays)
    assert calls and "rebuilding" in caplog.text
    _forbid_decoding(monkeypatch)
    assert_matches(load(root), arrays)  # the rebuilt file is valid again


def test_default_cache_dir_from_env(tmp_path, tree, monkeypatch):
    monkeypatch.setenv("JAXADV_CACHE", str(tmp_path / "envcache"))
    data.load(tree[0], val_size=0, progress=False)
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1
    assert not list(tmp_path.glob("envcache/.*.tmp"))  # no temp files left behind


def test_progress_bar_on_stderr(tree, tmp_path, capsys):
    data.load(tree[0], cache_dir=tmp_path / "c", val_size=0, progress=True)
    assert "decoding" in capsys.readouterr().err


def test_parallel_decoding_matches_serial_and_reports_bad_files(tree, monkeypatch):
    files = sorted(p for p in tree[0].rglob("*.png"))
    names, blobs = [p.name for p in files], [p.read_bytes() for p in files]
    monkeypatch.setattr(data, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(data, "_CHUNK_SIZE", 5)
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
    monkeypatch.setattr(data, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(data.futures, "ProcessPoolExecutor", BrokenPool)
    images = data.decode_images(names, blobs, num_workers=2)
    assert np.array_equal(images, data.decode_images(names, blobs, num_workers=0))
    assert "decoding in this process instead" in caplog.text


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
    incorrectly), which is why `jaxadv.data` reads records one at a time.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = data.load("tfds", cache_dir=tmp_path, val_size=2, progress=False)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 8)
        assert splits.class_names == data.CIFAR10_CLASSES
        for ds in (splits.train, splits.val, splits.test):
            assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
            assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() < 10
        assert splits.source.startswith("tfds cifar10/")
        _forbid_decoding(monkeypatch)
        monkeypatch.setattr(data, "_read_tfds_split", lambda *a: (_ for _ in ()).throw(AssertionError("no cache")))
        again = data.load("tfds", cache_dir=tmp_path, val_size=2, progress=False)
        assert np.array_equal(again.test.images, splits.test.images)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow installed: would prepare")
def test_tfds_unprepared_without_tensorflow_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match=r"not prepared .* pip install 'jaxadv\[tfds-prepare\]'") as e:
        data.load(f"tfds:{tmp_path}", cache_dir=tmp_path / "cache", progress=False)
    one_line_error(e, tmp_path)


# --------------------------------------------------------------------------------------
# Synthetic data and write_image_tree
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------

jit_augment = jax.jit(data.augment, static_argnames=("pad", "pad_mode", "flip"))


def _distinct_images(b, h=8, w=8, dtype=np.uint8, seed=0):
    """Images whose windows are all different, so a window identifies its offset."""
    x = np.random.default_rng(seed).permutation(b * h * w * 3) % 251
    return x.reshape(b, h, w, 3).astype(dtype)


def _window_offsets(out, x, pad, mode, flipped_ok):
    """Per example: the (row, col, flipped) of the padded window equal to the output, or fail."""
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    found = []
    for i in range(len(x)):
        windows = {
            (r, c, f): window[:, ::-1] if f else window
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            for window in [padded[i, r : r + h, c : c + w]]
            for f in ((False, True) if flipped_ok else (False,))
        }
        matches = [where for where, window in windows.items() if np.array_equal(out[i], window)]
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    return found


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_augment_preserves_shape_dtype_and_is_deterministic(getkey, dtype, pad_mode):
    x = jnp.asarray(_distinct_images(6, 32, 32, dtype))
    key = getkey()
    y = jit_augment(key, x, pad=4, pad_mode=pad_mode)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(y, jit_augment(key, x, pad=4, pad_mode=pad_mode))
    assert np.array_equal(y, data.augment(key, x, pad=4, pad_mode=pad_mode))  # jit == eager
    assert not np.array_equal(y, jit_augment(getkey(), x, pad=4, pad_mode=pad_mode))


def test_augment_flip_only_is_identity_or_mirror_per_example(getkey):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=0))
    same = np.all(y == x, axis=(1, 2, 3))
    mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert 10 < mirrored.sum() < 54  # about half
    assert np.array_equal(jit_augment(getkey(), jnp.asarray(x), pad=0, flip=False), x)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_augment_crop_is_a_window_of_the_padded_input(getkey, pad_mode):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=2, pad_mode=pad_mode, flip=False))
    offsets = {(r, c) for r, c, _ in _window_offsets(y, x, 2, pad_mode, flipped_ok=False)}
    assert len(offsets) > 10  # per-example offsets, spread over the 5x5 possibilities
    assert {r for r, _ in offsets} == {c for _, c in offsets} == set(range(5))  # incl. both extremes


def test_augment_crop_and_flip_together(getkey):
    x = _distinct_images(64)
    y = np.asarray(jit_augment(getkey(), jnp.asarray(x), pad=2))
    found = _window_offsets(y, x, 2, "reflect", flipped_ok=True)
    assert 10 < sum(f for _, _, f in found) < 54


def test_crop_matches_numpy_reference():
    x = _distinct_images(5)
    offsets = np.array([[0, 0], [2, 1], [1, 2], [2, 2], [0, 1]], np.int32)
    out = np.asarray(data.crop(jnp.asarray(x), jnp.asarray(offsets), (6, 6)))
    expected = np.stack([x[i, r : r + 6, c : c + 6] for i, (r, c) in enumerate(offsets)])
    assert np.array_equal(out, expected)


def test_augment_rejects_bad_static_args(getkey):
    with pytest.raises(ValueError, match="pad_mode"):
        data.augment(getkey(), jnp.zeros((1, 8, 8, 3)), pad_mode="edge")
    with pytest.raises(ValueError, match="pad"):
        data.augment(getkey(), jnp.zeros((1, 8, 8, 3)), pad=-1)


def test_to_float():
    x = np.array([[0, 51, 255]], np.uint8)
    y = data.to_float(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), [[0.0, 0.2, 1.0]], rtol=1e-6)


# --------------------------------------------------------------------------------------
# Real data (slow)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_archive(real_archive, tmp_path):
    start = time.perf_counter()
    splits = data.load(real_archive, cache_dir=tmp_path, val_size=5000, progress=False)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    data.load(real_archive, cache_dir=tmp_path, val_size=5000, progress=False)
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
