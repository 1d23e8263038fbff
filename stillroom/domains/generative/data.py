"""Data of the generative domain: a toy with a known density or an image set -> examples -> batches.

Points (``rings``, ``moons``): ``train_points`` and ``heldout_points`` drawn from the toy
(:mod:`.toys`) with ``data_seed`` (classes balanced); the toy itself is kept, so the report can measure
samples against the exact density (mode precision and recall). Images (``digits``, ``mnist``): the
classifier domain's data sets and hash split (:func:`stillroom.domains.vision.data.build_image_splits`),
pixels mapped from [0, 1] to [-1, 1].

A :class:`GenBatch` has one target per sample (``num_targets = B``): what a generator, a critic and a
denoiser each count their loss over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stillroom.config.generative import IMAGE_DATASETS, GenerativeConfig


@dataclass
class GenExample:
    """One training sample: ``x`` (``[D]`` point or ``[C, H, W]`` image in [-1, 1]) and its class ``label``."""

    x: torch.Tensor
    label: int
    uid: str


@dataclass
class GenBatch:
    """``x [B, ...]`` samples and ``labels [B]`` int64; one target per sample."""

    x: torch.Tensor
    labels: torch.Tensor
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "GenBatch":
        return GenBatch(self.x.to(device), self.labels.to(device), self.target_weight)


def collate_samples(examples: list[GenExample]) -> GenBatch:
    return GenBatch(torch.stack([e.x for e in examples]), torch.tensor([e.label for e in examples],
                                                                      dtype=torch.long))


@dataclass
class GenSplits:
    """The splits of a generative run (the shape of :class:`~stillroom.data.pipeline.DataSplits`): ``train`` and
    ``heldout`` examples; ``toy``: the point distribution with its exact density (``None`` for images)."""

    name: str
    train: list[GenExample]
    heldout: list[GenExample]
    class_names: list[str]
    sample_shape: tuple[int, ...]
    toy: object | None = None
    about: list[str] = field(default_factory=list)
    images: object | None = None
    """Images: the classifier domain's :class:`~stillroom.domains.vision.data.ImageSplits` of the same split (what
    the report's feature classifier trains on)."""

    @property
    def baseline_train(self) -> list[GenExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[GenExample]:
        return self.heldout

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def heldout_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [N, ...], labels [N])`` of the held-out samples."""
        return torch.stack([e.x for e in self.heldout]), torch.tensor([e.label for e in self.heldout])

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(self.name.encode())
        for part in (self.train, self.heldout):
            h.update(torch.stack([e.x for e in part]).float().numpy().tobytes())
            h.update(torch.tensor([e.label for e in part]).numpy().tobytes())
        return h.hexdigest()

    def notes(self) -> list[str]:
        return [f"data: {self.name}, {len(self.train)} training / {len(self.heldout)} held-out samples, "
                f"{self.num_classes} classes, sample shape {list(self.sample_shape)}", *self.about]


def balanced_labels(n: int, classes: int) -> torch.Tensor:
    """``[n]`` labels ``0, 1, ..., classes - 1, 0, 1, ...`` (every class equally often, up to one)."""
    return torch.arange(n) % classes


def build_splits(sec: GenerativeConfig, *, cache_dir: str | None, run_seed: int) -> GenSplits:
    """The run's data as ``sec`` says (see the module docstring)."""
    if sec.dataset in IMAGE_DATASETS:
        return _image_splits(sec, cache_dir=cache_dir, run_seed=run_seed)
    return _point_splits(sec)


def point_toy(sec: GenerativeConfig):
    """The section's point toy (a :class:`~.toys.PointMixture`)."""
    from stillroom.domains.generative.toys import moons_mixture, ring_mixture

    if sec.dataset == "rings":
        return ring_mixture(classes=sec.classes, modes=sec.modes, std=sec.std)
    return moons_mixture(std=sec.std)


def _point_splits(sec: GenerativeConfig) -> GenSplits:
    toy = point_toy(sec)
    gen = torch.Generator().manual_seed(sec.data_seed)
    parts = {}
    for split, n in (("train", sec.train_points), ("heldout", sec.heldout_points)):
        labels = balanced_labels(n, toy.num_classes)
        x = toy.sample(labels, gen).float()
        parts[split] = [GenExample(x[i], int(labels[i]), f"{split}-{i}") for i in range(n)]
    about = [f"toy: {toy.name} with its exact density ({toy.num_classes} classes x {toy.means_kmd.shape[1]} "
             f"modes, std {toy.std:g}), drawn with data_seed {sec.data_seed}"]
    return GenSplits(sec.dataset, parts["train"], parts["heldout"], list(toy.class_names), (toy.dim,), toy, about)


def _image_splits(sec: GenerativeConfig, *, cache_dir: str | None, run_seed: int) -> GenSplits:
    from stillroom.config.domains import ClassifierConfig
    from stillroom.domains.vision.data import build_image_splits

    split_sec = ClassifierConfig(dataset=sec.dataset, heldout_fraction=sec.heldout_fraction)
    images = build_image_splits(sec.dataset, sec.heldout_fraction, split_sec, cache_dir=cache_dir, run_seed=run_seed)

    def convert(examples) -> list[GenExample]:
        return [GenExample(e.image * 2 - 1, int(e.label), str(e.uid)) for e in examples]

    ds = images.dataset
    return GenSplits(sec.dataset, convert(images.train), convert(images.heldout), list(ds.classes), ds.in_shape,
                     None, ["images scaled from [0, 1] to [-1, 1]"], images)
