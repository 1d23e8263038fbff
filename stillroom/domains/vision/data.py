"""Image data of the classifier domain: a data set -> examples -> the held-out split -> batches.

A data set is a function in :data:`DATASETS` returning ``(images [N, C, H, W] float32 in [0, 1],
labels [N] int64, class names)``. Each image becomes an :class:`ImageExample` with the stable
uid ``<dataset>:<index>``; the held-out split is decided by the hash of that uid
(:func:`stillroom.data.records.split_position`, as the language-model pipeline splits records), so
it is the same for every seed, and the same for a teacher trained here and the students after it.

:func:`collate_images` turns examples into an :class:`ImageBatch`, the batch contract the training
loop and :class:`~stillroom.train.loop.DistillObjective` read: a classifier has one target per
image, so ``target_ids``, ``loss_mask`` and ``target_weight`` are ``[B, 1]`` and ``num_targets`` is ``B``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from stillroom.data.records import split_position


@dataclass(frozen=True)
class ImageSet:
    """A whole data set: ``images`` ``[N, C, H, W]`` float32 in [0, 1], ``labels`` ``[N]`` int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the pixels and labels (part of a cached teacher's key)."""
        h = hashlib.sha256(self.name.encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


def _digits() -> ImageSet:
    """scikit-learn's 8x8 digits: 1797 images with 17 grey levels (0..16), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return ImageSet("digits", images.contiguous(), labels, [str(c) for c in d.target_names])


DATASETS: dict[str, Callable[[], ImageSet]] = {"digits": _digits}
"""The classifier domain's data sets by name (``classifier.dataset``); add a loader here and its name
to :data:`stillroom.config.domains.CLASSIFIER_DATASETS` and the ``dataset`` field's choices."""


def load_dataset(name: str) -> ImageSet:
    if name not in DATASETS:
        raise ValueError(f"unknown classifier data set {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]()


@dataclass
class ImageExample:
    """One image: ``image`` ``[C, H, W]`` float32, its class ``label`` and a stable ``uid``."""

    image: torch.Tensor
    label: int
    uid: str


@dataclass
class ImageBatch:
    """A micro-batch of images. ``inputs`` ``[B, C, H, W]`` float32; ``target_ids`` ``[B, 1]`` int64 (the
    labels); ``target_weight`` optional ``[B, 1]`` float (set by a method's ``weight_targets``)."""

    inputs: torch.Tensor
    target_ids: torch.Tensor
    uids: list[str]
    target_weight: torch.Tensor | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[B, 1]`` bool, all True: every image's label counts."""
        return torch.ones_like(self.target_ids, dtype=torch.bool)

    @property
    def num_targets(self) -> int:
        """One target per image: ``B``."""
        return int(self.target_ids.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        """``[B]`` int64."""
        return self.target_ids[:, 0]

    def to(self, device: torch.device | str) -> "ImageBatch":
        return ImageBatch(self.inputs.to(device), self.target_ids.to(device), self.uids,
                          None if self.target_weight is None else self.target_weight.to(device))


def collate_images(examples: list[ImageExample]) -> ImageBatch:
    """Stack ``examples`` into an :class:`ImageBatch` (``inputs [B, C, H, W]``, ``target_ids [B, 1]``)."""
    if not examples:
        raise ValueError("collate_images: empty list of examples")
    inputs = torch.stack([e.image for e in examples])
    targets = torch.tensor([[e.label] for e in examples], dtype=torch.long)
    return ImageBatch(inputs, targets, [e.uid for e in examples])


def batches(examples: list[ImageExample], batch_size: int) -> list[ImageBatch]:
    """``examples`` in order, in batches of at most ``batch_size``."""
    return [collate_images(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def uid_key(uid: str) -> str:
    """The hex SHA-256 of an example's uid (what :func:`split_position` reads)."""
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()


def is_heldout(uid: str, fraction: float) -> bool:
    """True when the image with ``uid`` falls in the held-out ``fraction`` (deterministic, seed-free)."""
    return split_position(uid_key(uid)) < fraction


@dataclass
class ImageSplits:
    """The splits of a classifier run, in the shape of :class:`~stillroom.data.pipeline.DataSplits`.

    The method's view and the plain view are the same images (``kd`` and ``sft`` do not re-encode
    data), so ``baseline_train is train`` and ``baseline_heldout is heldout``.
    """

    dataset: ImageSet
    train: list[ImageExample]
    heldout: list[ImageExample]
    group_size: int = 1
    stats: dict = field(default_factory=dict)

    @property
    def baseline_train(self) -> list[ImageExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[ImageExample]:
        return self.heldout


def build_image_splits(name: str, heldout_fraction: float) -> ImageSplits:
    """Load data set ``name`` and split it by the hash of each image's uid (see the module docstring)."""
    ds = load_dataset(name)
    train, heldout = [], []
    for i in range(len(ds.labels)):
        ex = ImageExample(ds.images[i], int(ds.labels[i]), f"{name}:{i}")
        (heldout if is_heldout(ex.uid, heldout_fraction) else train).append(ex)
    if not train or not heldout:
        raise ValueError(f"classifier.heldout_fraction={heldout_fraction} leaves {len(train)} training and "
                         f"{len(heldout)} held-out images of {name!r}; choose a fraction that leaves both")
    stats = {"dataset": name, "images": len(ds.labels), "train_images": len(train), "heldout_images": len(heldout),
             "classes": ds.num_classes, "image_shape": list(ds.in_shape)}
    return ImageSplits(ds, train, heldout, stats=stats)
