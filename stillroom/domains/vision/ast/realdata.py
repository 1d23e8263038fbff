"""The real images AST distils: a classifier data set's training and held-out splits as tensors, standardised.

Standardising (one mean and std over the training pixels) puts every pixel near N(0, 1), the scale at which
``ast.lr_img`` is meaningful; synthetic images live in that space and :meth:`RealData.to_pixels` maps them back
for the image grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.domains.vision.data import build_image_splits


@dataclass(frozen=True)
class RealData:
    """``train_x`` ``[N, C, H, W]`` and ``test_x`` ``[M, C, H, W]`` (standardised), labels ``[N]`` / ``[M]`` int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: float
    std: float
    fingerprint: str

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images back to pixel values (clamped to [0, 1])."""
        return (x * self.std + self.mean).clamp(0, 1)


def real_data(sec: ClassifierConfig, *, standardize: bool, cache_dir: str | None = None, seed: int = 0) -> RealData:
    """The ``classifier.dataset`` splits as tensors, as the classifier domain builds them (its held-out split)."""
    splits = build_image_splits(sec.dataset, sec.heldout_fraction, sec, cache_dir=cache_dir, run_seed=seed)
    train_x = torch.stack([e.image for e in splits.train]).float()
    test_x = torch.stack([e.image for e in splits.heldout]).float()
    mean, std = (float(train_x.mean()), float(train_x.std())) if standardize else (0.0, 1.0)
    return RealData(
        name=splits.dataset.name, train_x=(train_x - mean) / std,
        train_y=torch.tensor([e.label for e in splits.train], dtype=torch.long), test_x=(test_x - mean) / std,
        test_y=torch.tensor([e.label for e in splits.heldout], dtype=torch.long),
        num_classes=splits.dataset.num_classes, mean=mean, std=std,
        fingerprint=_fingerprint(splits.dataset.name, train_x, splits.train, test_x, splits.heldout),
    )


def _fingerprint(name: str, train_x: torch.Tensor, train: list, test_x: torch.Tensor, test: list) -> str:
    """SHA-256 of the splits' pixels and labels (part of the expert cache key)."""
    h = hashlib.sha256(name.encode())
    for x, examples in ((train_x, train), (test_x, test)):
        h.update(x.numpy().tobytes())
        h.update(bytes(str([e.label for e in examples]), "ascii"))
    return h.hexdigest()
