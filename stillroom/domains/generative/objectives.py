"""The denoising objective: how a teacher, the ``sft`` baseline and a TSM student train, as a loop player.

One micro-batch: times ``t ~`` the convention's training distribution, fresh noise, ``x_t`` (the global torch
RNG draws them: it is checkpointed, so a resumed run draws the same), condition dropout, then the x0
regression :func:`~.engine.denoising_loss` against either the data (``target="data"``: a diffusion model of
the data) or the frozen teacher's prediction at the same ``(x_t, t, label)`` (``target="teacher"``: teacher
score matching, MSD's TSM pre-training of students that cannot start from the teacher's weights). With
``generative.contrast.weight > 0`` the student's objective adds the conditional contrastive term
(:func:`~.engine.condition_contrast`): the prediction must explain the sample best under its own class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stillroom.domains.generative.engine import condition_contrast, denoising_loss, drop_labels
from stillroom.domains.generative.models import Denoiser
from stillroom.losses import LossResult


class DenoiseForward(nn.Module):
    """``batch -> {"x0_hat", "x_t", "t", "labels", "x0"}``: the model's prediction at a fresh noisy point."""

    def __init__(self, model: Denoiser, cond_dropout: float = 0.0):
        super().__init__()
        self.model, self.cond_dropout = model, cond_dropout

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        conv = self.model.convention
        x0 = batch.x
        t = conv.training_times(x0.shape[0], device=x0.device)
        x_t = conv.renoise(x0, t, torch.randn_like(x0))
        labels = drop_labels(batch.labels, self.model.null_label, self.cond_dropout)
        return {"x0_hat": self.model(x_t, t, labels), "x_t": x_t, "t": t, "labels": labels, "x0": x0}


@dataclass
class DenoisingObjective:
    """The x0 regression onto the data or onto a frozen ``teacher`` (see the module docstring)."""

    forward: DenoiseForward
    teacher: Denoiser | None = None
    contrast: tuple[float, float] | None = None
    """``(weight, temperature)`` of :func:`~.engine.condition_contrast` added to the regression; None: off."""

    def __post_init__(self) -> None:
        self._state = nn.Module()

    @property
    def state(self) -> nn.Module:
        return self._state

    def signal(self, batch: Any) -> Any:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        target = outputs["x0"]
        name = "denoise"
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(outputs["x_t"], outputs["t"], outputs["labels"])
            name = "tsm"
        total, count = denoising_loss(outputs["x0_hat"], target, outputs["t"], self.forward.model.convention)
        parts = {name: float(total.detach())}
        if self.contrast is not None and self.contrast[0] > 0:
            weight, temperature = self.contrast
            term, _ = condition_contrast(self.forward.model, outputs["x_t"], outputs["t"], target, outputs["labels"],
                                         temperature)
            parts["contrast"] = float(term.detach())
            total = total + weight * term  # a per-sample sum: the loop divides both by the step's sample count
        return LossResult(total=total, count=count, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}
