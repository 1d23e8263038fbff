"""The classifier domain's side of CoDSA: per-class caps (an imbalanced split), balanced / per-class / minority
accuracy (by hand), and a transfer set written, read back, appended to the training images and refused when it
was made for another run."""

import json

import pytest
import torch

from stillroom.config.schema import RunConfig
from stillroom.datagen.codsa import TransferSet, write_transfer_set
from stillroom.domains.vision.codsa_set import (
    MANIFEST, SET_FILE, expected_manifest, read_transfer_set, teacher_fingerprint, with_transfer_set,
)
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.datasets import first_per_class
from stillroom.domains.vision.metrics import class_accuracies, classifier_metrics


def test_per_class_caps_down_sample_only_the_named_classes():
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0])
    idx = torch.arange(8)
    assert first_per_class(labels, idx, 2).tolist() == [0, 1, 2, 3, 5]
    assert first_per_class(labels, idx, {0: 1, 2: 5}).tolist() == [0, 1, 3, 5, 6]
    with pytest.raises(ValueError, match=r"names classes \[7\]"):
        first_per_class(labels, idx, {7: 1})


def test_imbalanced_digits_split_and_its_notes():
    cfg = RunConfig.model_validate({"domain": "classifier", "classifier": {"train_images_per_class": {3: 10, 8: 4}}})
    data = build_image_splits("digits", 0.2, cfg.classifier)
    counts = torch.bincount(torch.tensor([e.label for e in data.train]), minlength=10).tolist()
    assert counts[3] == 10 and counts[8] == 4 and min(c for i, c in enumerate(counts) if i not in (3, 8)) > 100
    assert data.stats["minority_classes"] == [3, 8]
    assert "the first all (class 3: 10, class 8: 4) training" in " ".join(data.notes())
    full = build_image_splits("digits", 0.2)
    assert [e.uid for e in data.heldout] == [e.uid for e in full.heldout]  # held-out images untouched


def test_class_accuracies_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 0, 1, 2])
    out = class_accuracies(pred, labels, 4, minority=[1, 3])
    assert out["per_class_accuracy"] == [0.75, 0.5, 1.0, None]  # class 3 has no held-out image
    assert out["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert out["minority_accuracy"] == pytest.approx(0.5)  # class 3 absent: the mean over those present
    logits = torch.nn.functional.one_hot(pred, 4).float() * 5
    m = classifier_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(5 / 7) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert "minority_accuracy" not in m


@pytest.fixture
def run_and_set(tmp_path):
    """A classifier run's config and data, a tiny teacher and a 6-image transfer set written for them."""
    cfg = RunConfig.model_validate({"domain": "classifier", "output_dir": str(tmp_path), "name": "r",
                                    "codsa": {"policy": "uniform", "volume": 6, "add_to_training": True}})
    data = build_image_splits("digits", 0.2, cfg.classifier)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images = torch.rand(6, 1, 8, 8)
    transfer = TransferSet(images, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 5]),
                           teacher(images).log_softmax(-1).detach(), [2, 2, 2] + [0] * 7, [1, 1, 1] + [0] * 7)
    manifest = {**expected_manifest(cfg, data, teacher), "allocation": transfer.allocation, "generator": "PCA"}
    write_transfer_set(cfg.codsa.folder(cfg), transfer, manifest)
    return cfg, data, teacher, transfer


def test_a_transfer_set_is_appended_to_the_training_images(run_and_set):
    cfg, data, teacher, transfer = run_and_set
    folder = cfg.codsa.folder(cfg)
    assert folder.name == "r-codsa" and not list(folder.glob(".tmp-*"))  # written by rename
    tensors, manifest = read_transfer_set(folder)
    assert torch.equal(tensors["images"], transfer.images) and manifest["images"] == 6
    logged = []
    augmented = with_transfer_set(data, cfg, teacher, logged.append)
    assert len(augmented.train) == len(data.train) + 6 and augmented.baseline_train == data.train
    assert [e.label for e in augmented.train[-6:]] == [0, 1, 1, 1, 2, 5]
    assert augmented.train[-1].uid == "codsa:5" and augmented.heldout is data.heldout
    assert "+ 6 synthetic training images (CoDSA, policy uniform" in augmented.notes()[-1] and logged


def test_a_set_made_for_another_run_is_refused(run_and_set):
    cfg, data, teacher, _ = run_and_set
    other = cfg.model_copy(update={"codsa": cfg.codsa.model_copy(update={"policy": "to_balance"})})
    with pytest.raises(ValueError, match="codsa.policy: set 'uniform', run 'to_balance'.*stillroom codsa-data"):
        with_transfer_set(data, other, teacher, print)
    retrained = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert teacher_fingerprint(retrained) != teacher_fingerprint(teacher)
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        with_transfer_set(data, cfg, retrained, print)
    folder = cfg.codsa.folder(cfg)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="does not match"):
        read_transfer_set(folder)
    (folder / SET_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="stillroom codsa-data RECIPE"):
        read_transfer_set(folder)
