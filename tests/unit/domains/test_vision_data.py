"""The classifier domain's data: the hash split, examples and the batch contract the loop reads."""

import typing

import torch

from stillroom.config.domains import CLASSIFIER_DATASETS, ClassifierConfig
from stillroom.domains.vision.data import DATASETS, ImageBatch, batches, build_image_splits, collate_images, is_heldout


def test_datasets_match_the_config_choices():
    choices = typing.get_args(ClassifierConfig.model_fields["dataset"].annotation)
    assert set(DATASETS) == set(CLASSIFIER_DATASETS) == set(choices)


def test_digits_split_is_deterministic_disjoint_and_near_the_fraction():
    a = build_image_splits("digits", 0.2)
    b = build_image_splits("digits", 0.2)
    assert [e.uid for e in a.heldout] == [e.uid for e in b.heldout]
    train, held = {e.uid for e in a.train}, {e.uid for e in a.heldout}
    assert not train & held and len(train | held) == 1797
    assert 0.15 < len(held) / 1797 < 0.25
    assert all(is_heldout(u, 0.2) for u in held) and not any(is_heldout(u, 0.2) for u in train)
    # a larger fraction only adds images to the held-out split (the hash position is fixed per image)
    assert held <= {e.uid for e in build_image_splits("digits", 0.3).heldout}
    assert a.baseline_train is a.train and a.baseline_heldout is a.heldout and a.group_size == 1
    assert a.dataset.in_shape == (1, 8, 8) and a.dataset.num_classes == 10
    assert 0.0 <= float(a.dataset.images.min()) and float(a.dataset.images.max()) <= 1.0


def test_batch_contract():
    splits = build_image_splits("digits", 0.2)
    batch = collate_images(splits.train[:5])
    assert isinstance(batch, ImageBatch)
    assert batch.inputs.shape == (5, 1, 8, 8) and batch.inputs.dtype == torch.float32
    assert batch.target_ids.shape == (5, 1) and batch.target_ids.dtype == torch.long
    assert batch.loss_mask.shape == (5, 1) and bool(batch.loss_mask.all())
    assert batch.num_targets == 5 and batch.target_weight is None
    assert batch.labels.tolist() == [e.label for e in splits.train[:5]]
    assert batch.uids == [e.uid for e in splits.train[:5]]
    batch.target_weight = torch.full((5, 1), 0.5)
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs, batch.inputs) and torch.equal(moved.target_weight, batch.target_weight)
    assert [len(b.uids) for b in batches(splits.heldout[:10], 4)] == [4, 4, 2]
