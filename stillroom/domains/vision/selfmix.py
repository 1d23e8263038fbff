"""SelfMix (FerKD, Shen 2023): CutMix of two crops of the *same* image, with mixed targets.

For a training row holding stored view ``r1`` of image ``uid`` at step ``step``, a generator seeded from
``(seed, step, uid)`` draws, in this order: the second view ``r2`` (uniform among ``candidates``, the
image's views that are not dropped, ``r1`` excluded where another exists), ``lambda ~ Beta(alpha, alpha)``
and the CutMix box (as the CutMix reference code: side ratio ``sqrt(1 - lambda)``, centre uniform over
the image, the box clipped at the border). The box of ``r2``'s crop is pasted into ``r1``'s crop and
lambda is *area-corrected*: ``lambda = 1 - box area / image area`` (what remains of ``r1``). The target is
``lambda t(r1) + (1 - lambda) t(r2)``. A Python generator seeded by SHA-256 (:func:`derive_seed`): the same
draws in every process and after a resume, whatever else ran before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from stillroom.data.seeds import derive_seed


@dataclass(frozen=True)
class MixDraw:
    """One row's SelfMix: the second view, the pasted box ``(top, left, h, w)`` and the area-corrected lambda."""

    second_view: int
    box: tuple[int, int, int, int]
    lam: float


def cutmix_box(lam: float, hw: tuple[int, int], g: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the pasted box for a drawn ``lam``: sides ``int(side * sqrt(1 - lam))``, centre
    uniform in ``0..side-1``, clipped at the border (so the box may be smaller than asked: hence the correction)."""
    height, width = hw
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = g.randrange(height), g.randrange(width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, left, bottom - top, right - left


def area_lambda(box: tuple[int, int, int, int], hw: tuple[int, int]) -> float:
    """``1 - box area / image area``: the fraction of the first crop that stays visible."""
    return 1.0 - box[2] * box[3] / float(hw[0] * hw[1])


def draw_mix(seed: int, step: int, uid: str, first_view: int, candidates: list[int], alpha: float,
             hw: tuple[int, int]) -> MixDraw:
    """The SelfMix of one row (see the module docstring); ``candidates``: the image's usable views."""
    g = random.Random(derive_seed("ferkd-selfmix", seed, step, uid))
    others = [v for v in candidates if v != first_view] or [first_view]
    second = others[g.randrange(len(others))]
    lam = g.betavariate(alpha, alpha)
    box = cutmix_box(lam, hw, g)
    return MixDraw(second, box, area_lambda(box, hw))


def paste_boxes(first_bchw: torch.Tensor, second_bchw: torch.Tensor, boxes: list[tuple[int, int, int, int]],
                ) -> torch.Tensor:
    """``first_bchw`` with, per row ``b``, the region ``boxes[b]`` replaced by ``second_bchw[b]``'s pixels there."""
    out = first_bchw.clone()
    for b, (top, left, h, w) in enumerate(boxes):
        out[b, :, top : top + h, left : left + w] = second_bchw[b, :, top : top + h, left : left + w]
    return out


def mix_targets(first_bc: torch.Tensor, second_bc: torch.Tensor, lam_b: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: ``lam t(r1) + (1 - lam) t(r2)`` per row (both rows probability vectors, so is the mix)."""
    lam = lam_b.to(first_bc.dtype)[:, None]
    return lam * first_bc + (1.0 - lam) * second_bc
