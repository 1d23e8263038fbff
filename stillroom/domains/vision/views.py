"""Crop views of training images: random-resized-crop boxes, horizontal flips, and applying them.

A *view* of an image is a box ``(top, left, height, width)`` in whole pixels of the input image
and a flip flag. :func:`sample_view` draws it as torchvision's ``RandomResizedCrop.get_params``
does (area fraction uniform in ``crop_scale``, log aspect ratio uniform in ``log(crop_ratio)``, ten
tries, then a centre crop clamped to the ratio range), written here on tensors (no torchvision),
followed by a flip with probability 1/2. Its random generator is seeded from
``(seed, image uid, view index)`` only, so a view is the same in every process, after a resume,
and in ``stillroom cache-teacher`` (which stores views ``0..R-1`` of each image).

Which view index a training batch uses: with ``classifier.augment`` and an online teacher, the
view index is the sampler's epoch (a fresh view of every image each epoch); with a soft-label store
it is one of the stored ``R`` views, ``(epoch + offset(seed, uid)) mod R`` (every view once per R
epochs). :class:`TrainingViews` applies them in the collate step of training batches only
(held-out evaluation sees whole images); the teacher is run on the batch the student gets, so the
online teacher sees the same view.

Pixel convention of :func:`apply_view`: pixel ``i`` covers ``[i, i + 1)``; the crop
``rows top..top+height-1``, ``cols left..left+width-1`` is resized to ``out_hw`` by bilinear
interpolation with half-pixel centres (``F.interpolate(mode="bilinear", align_corners=False)``
on the crop, without antialiasing: the same values, a parity test checks it), sampling clamped to
the crop's own border; then the output is mirrored left-right where ``flip``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.mixing import MixSettings, mix_for_sampler


@dataclass(frozen=True)
class ViewSettings:
    """How views are drawn (``classifier.augment``); ``enabled=False``: every view is the whole image."""

    enabled: bool = False
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    flip: bool = True
    mixing: MixSettings | None = None
    """:class:`~.mixing.MixSettings` of ``classifier.augment.mix`` (None: no mixing; not part of :meth:`as_dict`:
    a store refuses mixing)."""

    @classmethod
    def of(cls, section: Any) -> "ViewSettings":
        """From a ``classifier.augment`` config section."""
        return cls(bool(section.enabled), tuple(section.crop_scale), tuple(section.crop_ratio), bool(section.flip),
                   MixSettings.of(section))

    def as_dict(self) -> dict:
        """The settings as a store manifest records them (JSON types)."""
        return {"enabled": self.enabled, "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio),
                "flip": self.flip}


def view_generator(seed: int, uid: str, view_index: int) -> random.Random:
    """A generator seeded from ``(seed, uid, view_index)`` (SHA-256: the same in every process and Python version;
    Python's Mersenne Twister, not a torch generator: a view costs microseconds, which matters for tiny models)."""
    return random.Random(derive_seed("classifier-view", seed, uid, int(view_index)))


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             g: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params`` samples it, from ``g``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * g.uniform(scale[0], scale[1])
        aspect = math.exp(g.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = g.randint(0, height - h)
            left = g.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(settings: ViewSettings, seed: int, uid: str, view_index: int, hw: tuple[int, int],
                ) -> tuple[tuple[int, int, int, int], bool]:
    """``((top, left, h, w), flip)``: view ``view_index`` of image ``uid`` of size ``hw`` (deterministic)."""
    height, width = hw
    if not settings.enabled:
        return (0, 0, height, width), False
    g = view_generator(seed, uid, view_index)
    box = crop_box(height, width, settings.crop_scale, settings.crop_ratio, g)
    flip = settings.flip and g.random() < 0.5
    return box, flip


def sample_views(settings: ViewSettings, seed: int, uids: list[str], view_ids: list[int], hw: tuple[int, int],
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boxes [B, 4] int64 (top, left, h, w), flips [B] bool)`` of the given views, one per image."""
    drawn = [sample_view(settings, seed, uid, v, hw) for uid, v in zip(uids, view_ids)]
    boxes = torch.tensor([box for box, _ in drawn], dtype=torch.long).reshape(-1, 4)
    return boxes, torch.tensor([flip for _, flip in drawn], dtype=torch.bool)


def _axis_taps(start_b: torch.Tensor, size_b: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis: ``(lo [B, out], hi [B, out], weight of hi [B, out])`` as
    ``F.interpolate(align_corners=False)`` computes them for a crop ``start..start+size-1`` resized to ``out``:
    source ``s = (o + 0.5) * size / out - 0.5``, clamped at 0, ``hi = lo + 1`` except at the crop's last pixel."""
    size = size_b.to(torch.float32)[:, None]
    o = torch.arange(out, dtype=torch.float32)[None, :]
    src = ((o + 0.5) * (size / out) - 0.5).clamp(min=0.0)
    lo = src.floor().to(torch.long)
    lo = torch.minimum(lo, size_b[:, None] - 1)
    hi = torch.minimum(lo + 1, size_b[:, None] - 1)
    weight = (src - lo.to(torch.float32)).clamp(0.0, 1.0)
    return start_b[:, None] + lo, start_b[:, None] + hi, weight


def apply_view(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The views of ``images`` ``[B, C, H, W]``: crop ``boxes`` ``[B, 4]`` (top, left, h, w; whole pixels),
    bilinear resize to ``out_hw`` and mirror where ``flips`` ``[B]``; returns ``[B, C, h_out, w_out]`` in the
    images' dtype. All images at once by gathering rows, then columns (see the module docstring)."""
    if images.ndim != 4 or boxes.shape != (images.shape[0], 4) or flips.shape != (images.shape[0],):
        raise ValueError(f"apply_view: images {tuple(images.shape)} [B, C, H, W], boxes {tuple(boxes.shape)} "
                         f"[B, 4] and flips {tuple(flips.shape)} [B] disagree")
    bsz, ch, _, width = images.shape
    out_h, out_w = out_hw
    boxes = boxes.to(torch.long).cpu()
    y_lo, y_hi, wy = (t.to(images.device) for t in _axis_taps(boxes[:, 0], boxes[:, 2], out_h))
    x_lo, x_hi, wx = (t.to(images.device) for t in _axis_taps(boxes[:, 1], boxes[:, 3], out_w))
    x = images.float()

    def rows(index_bo: torch.Tensor) -> torch.Tensor:  # [B, C, out_h, W]
        return x.gather(2, index_bo[:, None, :, None].expand(bsz, ch, out_h, width))

    y = rows(y_lo) * (1 - wy)[:, None, :, None] + rows(y_hi) * wy[:, None, :, None]

    def cols(index_bo: torch.Tensor) -> torch.Tensor:  # [B, C, out_h, out_w]
        return y.gather(3, index_bo[:, None, None, :].expand(bsz, ch, out_h, out_w))

    out = cols(x_lo) * (1 - wx)[:, None, None, :] + cols(x_hi) * wx[:, None, None, :]
    out = torch.where(flips.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out.to(images.dtype)


def apply_view_plain(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                     out_hw: tuple[int, int]) -> torch.Tensor:
    """The reference of :func:`apply_view`: one ``F.interpolate`` per image (for parity tests)."""
    out = []
    for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = img[None, :, top : top + h, left : left + w].float()
        view = torch.nn.functional.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)[0]
        out.append(view.flip(-1) if flip else view)
    return torch.stack(out).to(images.dtype)


def epoch_view_index(seed: int, uid: str, epoch: int, views_per_image: int) -> int:
    """The stored view an image uses in ``epoch``: ``(epoch + offset(seed, uid)) mod R`` (each view once per R)."""
    return (epoch + derive_seed("classifier-view-offset", seed, uid)) % views_per_image


class ViewSource(Protocol):
    """Where a training batch's views come from: ``(view_ids [B], boxes [B, 4], flips [B])`` per image."""

    def views(self, uids: list[str], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass
class SampledViews:
    """Views drawn here: view index = the epoch (a fresh crop of every image each epoch)."""

    settings: ViewSettings
    seed: int
    hw: tuple[int, int]

    def views(self, uids: list[str], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view_ids = [epoch] * len(uids)
        boxes, flips = sample_views(self.settings, self.seed, uids, view_ids, self.hw)
        return torch.tensor(view_ids, dtype=torch.long), boxes, flips


class TrainingViews:
    """The collate step of training batches with views, and the sampler factory whose epoch it reads.

    ``collate(examples)`` stacks the images (``collate``: :func:`~.data.collate_images`), replaces
    ``inputs`` by their views (``[B, C, H, W]``, the same size) and sets ``batch.view_ids`` ``[B]``; with
    ``classifier.augment.mix`` it then mixes the batch (a :class:`~.mixing.MixedImageBatch`). The
    loop draws indices, then collates them, so the tracked sampler's ``epoch`` is the epoch of the batch
    being collated, after a resume too (the sampler's state is checkpointed)."""

    def __init__(self, source: ViewSource, collate: Callable[[list], Any]) -> None:
        self.source = source
        self.base_collate = collate
        self.sampler: Any = None

    def track(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        """``factory`` (a sampler factory of :class:`~stillroom.train.loop.TrainJob`), remembering what it builds."""
        def build(**kwargs):
            self.sampler = factory(**kwargs)
            if not hasattr(self.sampler, "epoch"):
                raise ValueError(f"crop views need the sampler's epoch, and {type(self.sampler).__name__} has none; "
                                 "set classifier.augment.enabled: false with this method")
            return self.sampler
        return build

    def collate(self, examples: list) -> Any:
        batch = self.base_collate(examples)
        epoch = int(self.sampler.epoch) if self.sampler is not None else 0
        view_ids, boxes, flips = self.source.views(batch.uids, epoch)
        batch.inputs = apply_view(batch.inputs, boxes, flips, tuple(batch.inputs.shape[-2:]))
        batch.view_ids = view_ids
        mixing = getattr(getattr(self.source, "settings", None), "mixing", None)
        if mixing is None or mixing.mix == "none":
            return batch
        return mix_for_sampler(mixing, self.source.seed, batch, self.sampler)
