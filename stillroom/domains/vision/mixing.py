"""MixUp and CutMix of training micro-batches (``classifier.augment.mix``), applied after the crop views.

Each image ``b`` of a micro-batch is mixed with image ``perm[b]`` of the same micro-batch. One seeded draw per
micro-batch (a Python generator from ``(seed, epoch, position in the epoch, rank)`` of the sampler after it drew
the batch: unique per micro-batch and restored exactly on resume) decides, in this order: whether the batch is
mixed (probability ``mix_prob``), ``lambda ~ Beta(alpha, alpha)``, the permutation, and for CutMix the box
(FerKD SelfMix's :func:`~.selfmix.cutmix_box`, lambda then area-corrected by :func:`~.selfmix.area_lambda`). One
lambda per micro-batch (as the MixUp/CutMix reference code): every image of it has the same ``lam``.

* mixup: ``x = lam x_b + (1 - lam) x_perm[b]``;
* cutmix: ``x_b`` with the box replaced by ``x_perm[b]``'s pixels there (:func:`~.selfmix.paste_boxes`).

The batch becomes a :class:`MixedImageBatch` whose ``target_ids`` is a
:class:`~stillroom.losses.targets.MixedTargets` ``(y_b, y_perm[b], lam)``: the ``ce`` term learns
``lam CE(y_b) + (1 - lam) CE(y_perm[b])`` (count: one per image). The online teacher runs on ``inputs``, the mixed
images, so every KD term compares student and teacher on the same image (FunMatch's consistent teaching).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.selfmix import area_lambda, cutmix_box, paste_boxes
from stillroom.losses.targets import MixedTargets


@dataclass(frozen=True)
class MixSettings:
    """``mix``: none | mixup | cutmix; ``alpha``: of Beta(alpha, alpha); ``prob``: a micro-batch is mixed."""

    mix: str = "none"
    alpha: float = 1.0
    prob: float = 1.0

    @classmethod
    def of(cls, section: Any) -> "MixSettings":
        """From a ``classifier.augment`` section (``mix_alpha`` null: 0.2 for mixup, 1.0 for cutmix)."""
        mix = str(getattr(section, "mix", "none"))
        alpha = getattr(section, "mix_alpha", None)
        return cls(mix, float(alpha) if alpha is not None else (0.2 if mix == "mixup" else 1.0),
                   float(getattr(section, "mix_prob", 1.0)))


@dataclass(frozen=True)
class MixDraw:
    """One micro-batch's draw: ``perm`` (partner of each row), ``lam`` (area-corrected for CutMix), ``box``
    ``(top, left, h, w)`` pasted from the partner (CutMix; ``None`` for MixUp)."""

    perm: list[int]
    lam: float
    box: tuple[int, int, int, int] | None


def draw_batch_mix(settings: MixSettings, seed: int, epoch: int, position: int, rank: int, size: int,
                   hw: tuple[int, int]) -> MixDraw | None:
    """The draw of the micro-batch of ``size`` images at ``(epoch, position, rank)``; ``None``: left unmixed."""
    g = random.Random(derive_seed("classifier-mix", seed, int(epoch), int(position), int(rank)))
    if settings.mix == "none" or g.random() >= settings.prob:
        return None
    lam = g.betavariate(settings.alpha, settings.alpha)
    perm = list(range(size))
    g.shuffle(perm)
    if settings.mix == "mixup":
        return MixDraw(perm, lam, None)
    box = cutmix_box(lam, hw, g)
    return MixDraw(perm, area_lambda(box, hw), box)


def mix_inputs(images_bchw: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """``[B, C, H, W]``: the images mixed with their partners ``images[perm]`` as ``draw`` says."""
    partners = images_bchw[torch.tensor(draw.perm, dtype=torch.long, device=images_bchw.device)]
    if draw.box is None:
        return draw.lam * images_bchw + (1.0 - draw.lam) * partners
    return paste_boxes(images_bchw, partners, [draw.box] * images_bchw.shape[0])


@dataclass
class MixedImageBatch(ImageBatch):
    """An :class:`ImageBatch` of mixed images: ``target_ids`` is a :class:`MixedTargets` of ``[B, 1]`` tensors
    (own label, partner's label, ``lam``); ``loss_mask``, ``labels`` and ``num_targets`` read the own labels."""

    @property
    def own_labels_b1(self) -> torch.Tensor:
        return self.target_ids.first

    @property
    def loss_mask(self) -> torch.Tensor:
        return torch.ones_like(self.own_labels_b1, dtype=torch.bool)

    @property
    def num_targets(self) -> int:
        return int(self.own_labels_b1.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        return self.own_labels_b1[:, 0]

    def to(self, device: torch.device | str) -> "MixedImageBatch":
        return MixedImageBatch(self.inputs.to(device), self.target_ids.to(device), self.uids,
                               None if self.target_weight is None else self.target_weight.to(device), self.view_ids)


def mix_batch(batch: ImageBatch, draw: MixDraw | None) -> ImageBatch:
    """``batch`` mixed as ``draw`` says (a :class:`MixedImageBatch`), or ``batch`` itself when ``draw`` is None."""
    if draw is None:
        return batch
    labels_b1 = batch.target_ids
    perm = torch.tensor(draw.perm, dtype=torch.long, device=labels_b1.device)
    targets = MixedTargets(labels_b1, labels_b1[perm], torch.full(labels_b1.shape, draw.lam, dtype=torch.float32,
                                                                    device=labels_b1.device))
    return MixedImageBatch(mix_inputs(batch.inputs, draw), targets, batch.uids, batch.target_weight, batch.view_ids)


def mix_for_sampler(settings: MixSettings, seed: int, batch: ImageBatch, sampler: Any) -> ImageBatch:
    """``batch`` mixed with the draw of the sampler's current ``(epoch, position, rank)`` (0s without a sampler)."""
    where = [int(getattr(sampler, k, 0)) for k in ("epoch", "position", "rank")]
    draw = draw_batch_mix(settings, seed, *where, batch.inputs.shape[0], tuple(batch.inputs.shape[-2:]))
    return mix_batch(batch, draw)
