"""Image metrics of generated samples: Fréchet distance, k-NN precision/recall, class accuracy, sample grids."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from stillroom.config.domains import ClassifierArch, ClassifierTeacherConfig
from stillroom.domains.generative import image_metrics as im
from stillroom.domains.vision.data import build_image_splits


def gaussian(n: int = 2000, dim: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen)
    return torch.randn(n, dim, generator=gen) @ mix + torch.randn(dim, generator=gen)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_costs_its_square():
    a = gaussian()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    assert im.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance (the same samples, shifted): the distance is exactly ||shift||^2
    assert im.frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # b = 2a: C_b = 4 C_a, (C_a C_b)^1/2 = 2 C_a, so the distance is ||mu_a||^2 + tr(C_a)
    expected = float((a.double().mean(0) ** 2).sum() + np.trace(np.cov(a.double().numpy(), rowvar=False)))
    assert im.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    a, b = gaussian(seed=1), gaussian(seed=2)
    a64, b64 = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    cross = scipy.linalg.sqrtm(ca @ cb).real
    plain = ((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * cross)
    assert im.frechet_distance(a, b) == pytest.approx(plain, rel=1e-6)


def test_frechet_distance_refuses_bad_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        im.frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="widths differ"):
        im.frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_precision_recall_identical_disjoint_and_half():
    real = gaussian(n=300, dim=4, seed=3)
    assert im.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert im.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    half = torch.cat([real[:150], real[:150] + 100.0])  # half the fakes are real points, half far away
    precision, recall = im.precision_recall(real, half, k=3)
    assert precision == 0.5 and recall < 1.0
    with pytest.raises(ValueError, match="N > k=3"):
        im.precision_recall(real, real[:3], k=3)


def naive_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """The definition, point by point (no blocks)."""
    def radii(x):
        return torch.stack([torch.sort(((x - p) ** 2).sum(-1).sqrt()).values[k] for p in x])

    def inside(points, centres, r):
        return torch.stack([(((centres - p) ** 2).sum(-1).sqrt() <= r).any() for p in points]).float().mean()

    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


def test_blocked_precision_recall_equals_the_naive_definition(monkeypatch):
    monkeypatch.setattr(im, "DISTANCE_ROWS", 7)  # several blocks, the last one short
    real, fake = gaussian(n=60, dim=3, seed=4), 1.3 * gaussian(n=45, dim=3, seed=5) + 0.4
    got = im.precision_recall(real, fake, k=3)
    want = naive_precision_recall(real, fake, k=3)
    assert got == pytest.approx(want, abs=1e-9) and 0 < got[0] < 1 and 0 < got[1] < 1


def brightness_classifier() -> nn.Module:
    """Class 1 when the mean pixel (in [0, 1]) is above 0.5; the feature is that mean."""
    mean = nn.Linear(64, 1, bias=False)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        mean.weight.fill_(1 / 64)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    return nn.Sequential(nn.Flatten(), mean, head)


def test_features_are_the_heads_input_after_mapping_to_unit_range_and_accuracy_counts_intended_classes():
    classifier = brightness_classifier()
    images = torch.stack([torch.full((1, 8, 8), v) for v in (-1.0, 1.0, 0.6, -0.6, 3.0)])  # 3.0 overshoots
    feats, logits = im.classifier_features(classifier, images, batch_size=2)
    assert torch.allclose(feats[:, 0], torch.tensor([0.0, 1.0, 0.8, 0.2, 1.0]))
    assert logits.shape == (5, 2)
    labels = torch.tensor([0, 1, 0, 0, 1])  # the third is bright but meant to be class 0
    assert im.class_accuracy(classifier, images, labels) == pytest.approx(0.8)


def test_image_metrics_with_a_feature_classifier_trained_on_digits(tmp_path):
    splits = build_image_splits("digits", 0.2, cache_dir=str(tmp_path), run_seed=0)
    tc = ClassifierTeacherConfig(arch=ClassifierArch(kind="mlp", hidden=[64]), steps=120, lr=5e-3)
    classifier = im.feature_classifier(tc, splits, heldout_fraction=0.2, seed=0, cache_dir=str(tmp_path),
                                       device=torch.device("cpu"), log=lambda _m: None)
    to_pm1 = lambda ex: torch.stack([e.image for e in ex]) * 2 - 1  # noqa: E731
    real, train = to_pm1(splits.heldout), to_pm1(splits.train)
    train_labels = torch.tensor([e.label for e in splits.train])
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(train.shape, generator=gen) * 2 - 1
    good = im.image_metrics(classifier, train, train_labels, real)
    bad = im.image_metrics(classifier, noise, train_labels, real)
    assert good["class_accuracy"] > 0.85 and bad["class_accuracy"] < 0.4
    assert good["frechet_distance"] < 0.2 * bad["frechet_distance"]
    assert good["precision"] > 0.7 and good["recall"] > 0.7 and bad["precision"] < 0.1


def test_sample_grid_png(tmp_path):
    import matplotlib.image

    rows = {"teacher 50 steps": torch.rand(4, 1, 8, 8) * 2 - 1, "student": torch.rand(4, 1, 8, 8) * 2 - 1,
            "colour": torch.rand(4, 3, 8, 8) * 2 - 1}
    path = im.sample_grid_png(rows, tmp_path / "grids" / "samples.png", column_names=["0", "1", "2", "3"])
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["samples.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="same number of images"):
        im.sample_grid_png({"a": torch.zeros(4, 1, 8, 8), "b": torch.zeros(3, 1, 8, 8)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows"):
        im.sample_grid_png({}, tmp_path / "x.png")
