"""How a classifier runs on a batch in training: the player's forward module and the teacher signal.

The loss library works on logits ``[B, T, V]`` with a ``[B, T]`` mask; a classifier has one
prediction per image, so its logits ``[B, C]`` travel as ``[B, 1, C]`` (``T = 1``) and the mask is
``[B, 1]`` of ones (:class:`~stillroom.domains.vision.data.ImageBatch`). There is no output head to
split off: the forward returns logits, so ``loss.fused`` does not apply.
"""

from __future__ import annotations

import torch

from stillroom.domains.vision.data import ImageBatch
from stillroom.teachers.signal import TeacherSignal


class ClassifierForward(torch.nn.Module):
    """The player's forward pass (what distributed data parallel wraps): ``{"logits": [B, 1, C]}``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: ImageBatch) -> dict[str, torch.Tensor]:
        return {"logits": self.model(batch.inputs)[:, None, :]}


class ClassifierTeacher:
    """An in-process classifier teacher: its fp32 logits ``[B, 1, C]`` as a dense :class:`TeacherSignal`
    (no grad, eval mode, on the batch's device)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def signal(self, batch: ImageBatch) -> TeacherSignal:
        logits = self.model(batch.inputs.to(next(self.model.parameters()).device)).float()
        return TeacherSignal(logits_btv=logits[:, None, :].to(batch.inputs.device))
