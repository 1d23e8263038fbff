"""Objectives whose forward draws per-step randomness from a checkpointed step counter (masks, shifts).

A masked autoencoder (:mod:`stillroom.domains.vision.mae`) and a masked language model
(:mod:`stillroom.domains.text_encoder.mlm`) draw their masks from ``(seed, step, example uid)``. The step is
:class:`StepClock`, a buffer in the objective's state: it is checkpointed with the player, so a resumed run
draws the same masks, and :meth:`ClockedObjective.after_step` advances it. A subclass gives ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class StepClock(nn.Module):
    """The optimizer step the next batch belongs to (a buffer: checkpointed with the objective, so a resumed run
    draws the same masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))


@dataclass
class ClockedObjective:
    """A loop objective over ``forward`` (an ``nn.Module`` with a :class:`StepClock` at ``forward.clock``): no
    teacher signal, no metrics; ``state`` holds the clock and ``extra`` (more objective state a method adds:
    projectors, theta_0's anchors), named as they are here in checkpoints."""

    forward: Any
    extra: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._state = nn.ModuleDict({"clock": self.forward.clock, **self.extra})

    @property
    def state(self) -> nn.Module:
        return self._state

    def signal(self, batch: Any) -> Any:
        return None

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.forward.clock.step.fill_(step + 1)

    def metrics(self) -> dict[str, float]:
        return {}
