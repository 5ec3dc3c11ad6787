"""Tests for jaxadv.data.cache: hits, fingerprints, corruption, atomic writes, the file format."""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from data_utils import assert_matches, make_archive, make_tree
from jaxadv import data
from jaxadv.data import cache, sources


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


def count_decoding(monkeypatch):
    calls = []
    original = sources._decode_chunk
    monkeypatch.setattr(sources, "_decode_chunk", lambda *a: calls.append(1) or original(*a))
    return calls


def test_cache_hit_does_not_decode(tmp_path, tree, load, monkeypatch):
    root, arrays = tree
    archive = make_archive(root, tmp_path / "d.tgz")
    first = load(archive, val_size=3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    forbid_decoding(monkeypatch)
    second = load(archive, val_size=3)
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.val.labels, second.val.labels)
    assert np.array_equal(first.val.index, second.val.index)
    assert_matches(load(archive), arrays)


def test_changed_archive_or_folder_is_decoded_again(tmp_path, tree, load, monkeypatch):
    root, _ = tree
    archive = make_archive(root, tmp_path / "d.tar.gz")
    load(archive)
    load(root)
    calls = count_decoding(monkeypatch)
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
    calls = count_decoding(monkeypatch)
    assert_matches(load(root), arrays)
    assert calls and "rebuilding" in caplog.text
    forbid_decoding(monkeypatch)
    assert_matches(load(root), arrays)  # the rebuilt file is valid again


def test_default_cache_dir_from_env(tmp_path, tree, monkeypatch):
    monkeypatch.setenv("JAXADV_CACHE", str(tmp_path / "envcache"))
    data.load(tree[0], val_size=0, progress=False)
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1
    assert not list((tmp_path / "envcache").glob(".*"))  # no temp files left behind


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    splits = data.synthetic(6, 3, num_classes=3, val_size=0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    target = tmp_path / "c" / "x.npz"
    with pytest.raises(OSError, match="disk full"):
        cache.write_cache(target, splits.train, splits.test)
    assert not list((tmp_path / "c").iterdir())


def test_cache_file_format_is_the_single_module_format(tmp_path, tree, load):
    """Name, keys and source order of the file are those of the old `jaxadv/data.py` (version 1)."""
    root, _ = tree
    load(root, val_size=3, seed=5)  # the split, subset and order do not reach the cache
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    assert re.fullmatch(r"cifar-folder-v1-[0-9a-f]{24}\.npz", cache_file.name)
    with np.load(cache_file) as z:
        assert sorted(z.files) == sorted(
            ["checksum", "train_images", "train_labels", "test_images", "test_labels", "class_names"]
        )
        assert z["train_labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # source order: class by class
        assert z["class_names"].tolist() == ["ant", "moth", "zebra"]
    train, test = cache.read_cache(cache_file, data.IMAGE_SHAPE)
    assert np.array_equal(train.index, np.arange(12)) and np.array_equal(test.index, np.arange(6))


def _old_checksum(arrays):
    """The checksum as the single-module `jaxadv/data.py` computed it (format version 1)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data if a.dtype.kind != "U" else "\0".join(a.tolist()).encode())
    return h.hexdigest()


def test_cache_written_by_the_old_layout_is_used(tmp_path, tree, load, monkeypatch):
    """A file written the old way (same name, keys, checksum) is read without decoding."""
    root, _ = tree
    load(root)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
        "train_labels": np.repeat(np.arange(3, dtype=np.int32), 4),
        "test_images": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "test_labels": np.repeat(np.arange(3, dtype=np.int32), 2),
        "class_names": np.array(["ant", "moth", "zebra"], dtype=str),
    }
    with open(cache_file, "wb") as f:
        np.savez(f, checksum=np.array(_old_checksum(arrays)), **arrays)
    forbid_decoding(monkeypatch)
    splits = load(root, val_size=3, seed=1)
    for ds, split in ((splits.train, "train"), (splits.val, "train"), (splits.test, "test")):
        assert np.array_equal(ds.images, arrays[f"{split}_images"][ds.index])
        assert np.array_equal(ds.labels, arrays[f"{split}_labels"][ds.index])


def test_cache_path_and_default_dir(tmp_path, monkeypatch):
    assert cache.cache_path(tmp_path, "tfds", "cifar10", "ab" * 32).name == f"tfds-cifar10-v1-{'ab' * 12}.npz"
    monkeypatch.delenv("JAXADV_CACHE", raising=False)
    assert cache.default_cache_dir().parts[-2:] == (".cache", "jaxadv")
    monkeypatch.setenv("JAXADV_CACHE", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path
