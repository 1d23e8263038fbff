"""A semi-supervised view of a classifier run's training images: few labelled, many unlabelled, a validation split.

Applied by the classifier domain after the teacher is built, for a method whose section carries
``semi_supervised`` (:class:`~stillroom.config.dho.SemiSupervisedConfig`; DHO). Per class, the training images
are ordered by a permutation seeded with ``semi_supervised.seed`` (or the run's seed); the first
``val_per_class`` become the labelled validation split (never trained on), the next ``labels_per_class`` the
labelled training images, and the next ``unlabelled_per_class`` (default: all the rest) the unlabelled ones.
An unlabelled example's label is replaced by :data:`UNLABELLED` (and its fine label dropped) here, before
any batch exists, so no loss can read it. ``train`` lists the labelled images first, then the unlabelled
ones; the CE baseline's view is the labelled images alone (what plain supervised training has).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from stillroom.config.dho import SemiSupervisedConfig
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageExample, ImageSplits

UNLABELLED = -1
"""The label every unlabelled training example carries (a loss that read it would fail, not learn)."""


@dataclass
class SemiSupervisedSplits(ImageSplits):
    """:class:`ImageSplits` whose ``train`` is ``labelled_count`` labelled images, then the unlabelled ones;
    ``validation``: the labelled validation images; ``unused``: training images the split left out."""

    labelled_count: int = 0
    validation: list[ImageExample] = field(default_factory=list)
    unused: list[ImageExample] = field(default_factory=list)

    @property
    def labelled(self) -> list[ImageExample]:
        return self.train[: self.labelled_count]

    @property
    def unlabelled(self) -> list[ImageExample]:
        return self.train[self.labelled_count :]

    @property
    def baseline_train(self) -> list[ImageExample]:
        """The CE baseline trains on the labelled images only (the unlabelled ones have no label)."""
        return self.labelled

    def notes(self) -> list[str]:
        return [*super().notes(),
                f"data: semi-supervised: {self.labelled_count} labelled / {len(self.unlabelled)} unlabelled training "
                f"images (labels removed before training), {len(self.validation)} labelled validation images set "
                f"apart, {len(self.unused)} training images unused; the baseline trains on the labelled ones"]


def semi_supervised_section(cfg: Any) -> SemiSupervisedConfig | None:
    """The run's ``semi_supervised`` settings: those of its method section, if it has them (else ``None``)."""
    return getattr(cfg.method_section, "semi_supervised", None)


def per_class_order(examples: list[ImageExample], num_classes: int, seed: int) -> list[list[int]]:
    """Per class, the positions in ``examples`` of that class's images in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([e.label for e in examples])
    order = []
    for c in range(num_classes):
        rows = (labels == c).nonzero().squeeze(1)
        order.append(rows[torch.randperm(len(rows), generator=generator)].tolist())
    return order


def split_semi_supervised(data: ImageSplits, settings: SemiSupervisedConfig, run_seed: int) -> SemiSupervisedSplits:
    """``data`` with its training images split as the module docstring says. Refused, naming the setting, when a
    class has fewer training images than its validation and labelled images need."""
    seed = settings.seed if settings.seed is not None else derive_seed(run_seed, "semi-supervised")
    need = settings.val_per_class + settings.labels_per_class
    val, labelled, unlabelled, unused = [], [], [], []
    for c, rows in enumerate(per_class_order(data.train, data.dataset.num_classes, seed)):
        if len(rows) < need:
            name = data.dataset.classes[c]
            raise ValueError(f"class {name!r} has {len(rows)} training images, fewer than dho.semi_supervised."
                             f"val_per_class + labels_per_class = {need}: lower them or use more training images")
        rest = rows[need:]
        cap = len(rest) if settings.unlabelled_per_class is None else settings.unlabelled_per_class
        val += rows[: settings.val_per_class]
        labelled += rows[settings.val_per_class : need]
        unlabelled += rest[:cap]
        unused += rest[cap:]
    pick = lambda rows: [data.train[i] for i in sorted(rows)]  # noqa: E731 - data-set order within each part
    hidden = [replace(e, label=UNLABELLED, fine_label=None) for e in pick(unlabelled)]
    stats = {**data.stats, "labelled_images": len(labelled), "unlabelled_images": len(hidden),
             "validation_images": len(val), "unused_images": len(unused)}
    return SemiSupervisedSplits(data.dataset, pick(labelled) + hidden, data.heldout, data.group_size, stats,
                                data.shifted, labelled_count=len(labelled), validation=pick(val),
                                unused=pick(unused))
