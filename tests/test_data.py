"""Layout detection, labels, ids and order of the dataset reader."""

from __future__ import annotations

import pytest
from conftest import make_kaggle, write_jpeg

from catsdogs.dataset.layout import digest_all, fingerprint, open_dataset
from catsdogs.errors import DataError


def test_kaggle_layout(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=11, n_test=12)
    (root / "train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0junk")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    ds = open_dataset(root)
    assert ds.layout == "kaggle"
    assert len(ds.train) == 22 and len(ds.test) == 12
    # cats first, then dogs, numeric order (2 before 10)
    assert [r.relpath for r in ds.train[:3]] == ["train/cat.1.jpg", "train/cat.2.jpg", "train/cat.3.jpg"]
    assert ds.train[9].relpath == "train/cat.10.jpg" and ds.train[11].relpath == "train/dog.1.jpg"
    assert [r.label for r in ds.train] == [0] * 11 + [1] * 11
    assert [r.id for r in ds.train[:11]] == list(range(1, 12))
    assert [r.id for r in ds.test] == list(range(1, 13)) and all(r.label == -1 for r in ds.test)
    assert ds.ignored == [("train/Thumbs.db", "not an image file name (expected cat.N.jpg or dog.N.jpg)")]
    assert ds.root.is_absolute()


def test_order_is_deterministic_and_independent_of_creation_order(tmp_path):
    a, b = tmp_path / "a" / "train", tmp_path / "b" / "train"
    names = ["dog.3.jpg", "cat.20.jpg", "cat.3.jpg", "dog.1.jpg", "cat.100.jpg"]
    for i, n in enumerate(names):
        write_jpeg(a / n, i)
    for i, n in reversed(list(enumerate(names))):
        write_jpeg(b / n, i)
    ra = [r.relpath for r in open_dataset(a.parent).train]
    assert ra == [r.relpath for r in open_dataset(b.parent).train]
    assert ra == ["train/cat.3.jpg", "train/cat.20.jpg", "train/cat.100.jpg", "train/dog.1.jpg", "train/dog.3.jpg"]


def test_flat_kaggle_train_dir(tmp_path):
    write_jpeg(tmp_path / "cat.1.jpg", 1)
    write_jpeg(tmp_path / "DOG.2.JPG", 2)
    ds = open_dataset(tmp_path)
    assert [(r.relpath, r.label, r.id) for r in ds.train] == [("cat.1.jpg", 0, 1), ("DOG.2.JPG", 1, 2)]
    assert ds.test == []


def test_class_folders(tmp_path):
    write_jpeg(tmp_path / "Cat" / "a.jpg", 1)
    write_jpeg(tmp_path / "Cat" / "sub" / "b.png", 2)
    write_jpeg(tmp_path / "dogs" / "10.jpg", 3)
    write_jpeg(tmp_path / "dogs" / "9.jpg", 4)
    (tmp_path / "dogs" / "notes.txt").write_text("hi")
    write_jpeg(tmp_path / "test" / "x.jpg", 5)
    write_jpeg(tmp_path / "test" / "y.jpg", 6)
    ds = open_dataset(tmp_path)
    assert ds.layout == "folders"
    assert [(r.relpath, r.label) for r in ds.train] == [
        ("Cat/a.jpg", 0), ("Cat/sub/b.png", 0), ("dogs/9.jpg", 1), ("dogs/10.jpg", 1)]
    assert ds.test == []  # test ids are never invented from names (issue 9, item 1)
    assert {f for f, _ in ds.ignored} >= {"test/x.jpg", "test/y.jpg"}
    assert ("dogs/notes.txt", "not an image file name (unknown extension)") in ds.ignored


def test_class_folders_under_train(tmp_path):
    write_jpeg(tmp_path / "train" / "cat" / "1.jpg", 1)
    write_jpeg(tmp_path / "train" / "dog" / "1.jpg", 2)
    write_jpeg(tmp_path / "test1" / "7.jpg", 3)
    ds = open_dataset(tmp_path)
    assert ds.layout == "folders" and len(ds.train) == 2 and [r.id for r in ds.test] == [7]


def test_duplicate_test_ids(tmp_path):
    make_kaggle(tmp_path, n_per_class=1, n_test=2)
    write_jpeg(tmp_path / "test" / "2.png", 9)
    with pytest.raises(DataError, match="test id 2 appears twice.*2.jpg.*2.png"):
        open_dataset(tmp_path)


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        open_dataset(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training images found.*Kaggle layout"):
        open_dataset(tmp_path / "empty")


def test_fingerprint_tracks_content(tmp_path):
    root = make_kaggle(tmp_path, n_per_class=2, n_test=1)
    ds = open_dataset(root)
    fp = fingerprint(ds.records, digest_all(ds.records))
    assert fp == fingerprint(ds.records, digest_all(ds.records))
    write_jpeg(root / "train" / "cat.1.jpg", 999)
    assert fingerprint(ds.records, digest_all(ds.records)) != fp


def test_mini_dataset(mini):
    ds = open_dataset(mini)
    assert ds.layout == "kaggle" and len(ds.train) == 1000 and len(ds.test) == 300
    assert sum(r.label for r in ds.train) == 500
    assert [r.id for r in ds.test] == list(range(1, 301))
