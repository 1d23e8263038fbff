"""Mixed hard targets: two labels and a weight per position, for the ``ce`` term on mixed inputs.

MixUp / CutMix (:mod:`stillroom.domains.vision.mixing`) train on ``lam * x_a + (1 - lam) * x_b`` (or a pasted
box) and learn ``lam * CE(y_a) + (1 - lam) * CE(y_b)`` (Zhang et al. 2018; Yun et al. 2019). A batch passes
:class:`MixedTargets` where it would pass ``target_ids`` ``[B, T]``; the loss engine only flattens it
(``reshape(-1)``) and takes its counted rows (``[rows]``), which this class supports, so the engine is the
same for plain and mixed targets, and the ``ce`` kernel reads both labels (see ``stillroom.losses.terms``).
The count stays the number of counted positions (one per image): a mixed image is one target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixedTargets:
    """``first`` / ``second``: int64 labels, ``lam``: float weight of ``first``; all three of one shape
    (``[B, T]`` on a batch, ``[N]`` once the engine took its rows). ``-100`` in ``first`` ignores a position."""

    first: torch.Tensor
    second: torch.Tensor
    lam: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(self.first.shape), tuple(self.second.shape), tuple(self.lam.shape)}
        if len(shapes) != 1:
            raise ValueError(f"MixedTargets: first {tuple(self.first.shape)}, second {tuple(self.second.shape)} "
                             f"and lam {tuple(self.lam.shape)} must have one shape")

    @property
    def shape(self) -> torch.Size:
        return self.first.shape

    def reshape(self, *shape: int) -> "MixedTargets":
        return MixedTargets(self.first.reshape(*shape), self.second.reshape(*shape), self.lam.reshape(*shape))

    def __getitem__(self, index) -> "MixedTargets":
        return MixedTargets(self.first[index], self.second[index], self.lam[index])

    def to(self, device: torch.device | str) -> "MixedTargets":
        return MixedTargets(self.first.to(device), self.second.to(device), self.lam.to(device))


def mixed_nll(logp_nv: torch.Tensor, targets: MixedTargets) -> torch.Tensor:
    """``[N]``: ``lam * -log q(first) + (1 - lam) * -log q(second)`` from log-probabilities ``[N, V]``
    (0 where ``first`` is -100)."""
    nll = torch.nn.functional.nll_loss
    first = nll(logp_nv, targets.first.long(), ignore_index=-100, reduction="none")
    second = nll(logp_nv, targets.second.long().masked_fill(targets.first == -100, -100), ignore_index=-100,
                 reduction="none")
    lam = targets.lam.to(first.dtype)
    return lam * first + (1.0 - lam) * second
