"""Crop views: torchvision-style boxes, determinism from (seed, uid, view), the gather fast path against one
``F.interpolate`` per image, flips, and the training collate reading the sampler's epoch."""

import random

import pytest
import torch

from stillroom.domains.vision.views import (
    SampledViews, TrainingViews, ViewSettings, apply_view, apply_view_plain, crop_box, epoch_view_index, sample_view,
    sample_views,
)

ON = ViewSettings(enabled=True, crop_scale=(0.35, 1.0), crop_ratio=(0.75, 4 / 3), flip=True)


def test_boxes_lie_inside_and_follow_scale_and_ratio():
    g = random.Random(0)
    areas, ratios = [], []
    for _ in range(400):
        top, left, h, w = crop_box(32, 32, (0.35, 1.0), (0.75, 4 / 3), g)
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32 and h >= 1 and w >= 1
        areas.append(h * w / 1024)
        ratios.append(w / h)
    # rounding to whole pixels widens the ranges slightly
    assert 0.3 < min(areas) < 0.45 and max(areas) > 0.9
    assert min(ratios) > 0.7 and max(ratios) < 1.4 and min(ratios) < 0.8 and max(ratios) > 1.25


def test_fallback_is_the_centre_crop_clamped_to_the_ratio():
    g = random.Random(0)
    # no crop of a 4x40 image has a ratio in [0.9, 1.1] and area >= 90%: the fallback keeps the height
    assert crop_box(4, 40, (0.9, 1.0), (0.9, 1.1), g) == (0, 18, 4, 4)


def test_views_are_deterministic_per_seed_uid_and_view_index():
    a = sample_view(ON, 0, "digits:7", 3, (32, 32))
    assert a == sample_view(ON, 0, "digits:7", 3, (32, 32))
    for seed, uid, view in [(1, "digits:7", 3), (0, "digits:8", 3), (0, "digits:7", 4)]:
        assert sample_view(ON, seed, uid, view, (32, 32)) != a
    boxes = {sample_view(ON, 0, "digits:7", v, (32, 32))[0] for v in range(20)}
    assert len(boxes) > 15


def test_disabled_views_are_the_whole_image():
    assert sample_view(ViewSettings(enabled=False), 0, "x", 5, (8, 6)) == ((0, 0, 8, 6), False)


@pytest.mark.parametrize("out_hw", [(8, 8), (12, 5), (3, 4)])
def test_gather_path_equals_interpolate_per_image(out_hw):
    torch.manual_seed(0)
    images = torch.rand(16, 3, 8, 8)
    boxes, flips = sample_views(ON, 0, [f"u{i}" for i in range(16)], [0] * 16, (8, 8))
    boxes[0] = torch.tensor([0, 0, 8, 8])
    boxes[1] = torch.tensor([7, 7, 1, 1])
    fast = apply_view(images, boxes, flips, out_hw)
    plain = apply_view_plain(images, boxes, flips, out_hw)
    assert fast.shape == (16, 3, *out_hw)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


def test_whole_image_view_is_identity_and_flip_mirrors():
    images = torch.rand(2, 1, 5, 7)
    boxes = torch.tensor([[0, 0, 5, 7], [0, 0, 5, 7]])
    out = apply_view(images, boxes, torch.tensor([False, True]), (5, 7))
    torch.testing.assert_close(out[0], images[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(out[1], images[1].flip(-1), rtol=0, atol=1e-7)


def test_a_crop_by_hand():
    # the 2x2 crop [[1, 2], [3, 4]] upsampled to 4x4 with half-pixel centres: rows (1, 1.25, 1.75, 2)
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1:3, 1:3] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = apply_view(image, torch.tensor([[1, 1, 2, 2]]), torch.tensor([False]), (4, 4))[0, 0]
    assert out[0].tolist() == pytest.approx([1.0, 1.25, 1.75, 2.0])
    assert out[:, 0].tolist() == pytest.approx([1.0, 1.5, 2.5, 3.0])


def test_apply_view_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        apply_view(torch.rand(2, 1, 4, 4), torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, dtype=torch.bool), (4, 4))


def test_epoch_view_index_visits_every_view_once_per_cycle():
    for uid in ("a", "b", "digits:3"):
        assert sorted(epoch_view_index(0, uid, e, 5) for e in range(5)) == list(range(5))
    assert {epoch_view_index(0, f"u{i}", 0, 8) for i in range(64)} == set(range(8))


class _Batch:
    def __init__(self, uids):
        self.uids = uids
        self.inputs = torch.rand(len(uids), 1, 8, 8)
        self.view_ids = None


class _Sampler:
    def __init__(self, **kwargs):
        self.epoch = 0


def test_training_collate_uses_the_tracked_samplers_epoch():
    source = SampledViews(ON, 0, (8, 8))
    base = {}

    def collate(uids):
        base["batch"] = _Batch(uids)
        base["inputs"] = base["batch"].inputs.clone()
        return base["batch"]

    views = TrainingViews(source, collate)
    sampler = views.track(_Sampler)(n=4)
    b0 = views.collate(["a", "b"])
    assert b0.view_ids.tolist() == [0, 0]
    boxes, flips = sample_views(ON, 0, ["a", "b"], [0, 0], (8, 8))
    torch.testing.assert_close(b0.inputs, apply_view(base["inputs"], boxes, flips, (8, 8)))
    sampler.epoch = 3
    assert views.collate(["a", "b"]).view_ids.tolist() == [3, 3]


def test_a_sampler_without_epoch_is_refused():
    views = TrainingViews(SampledViews(ON, 0, (8, 8)), lambda x: x)
    with pytest.raises(ValueError, match="epoch"):
        views.track(lambda **kw: object())(n=1)
