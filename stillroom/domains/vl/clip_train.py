"""Contrastive training of the ``clip`` domain: the forward, the InfoNCE loss and the cached text features.

One micro-batch of ``B`` image-caption pairs gives logits ``L = s * I T^T`` ``[B, B]`` (``I``, ``T``
L2-normalised image and text features, ``s`` the clamped learnable logit scale). Class-name captions repeat
within a batch ("a photo of the digit three." for several images), so the targets are soft: row ``i``'s
positives are every ``j`` whose caption equals ``i``'s, weighted equally (for distinct captions this is
CLIP's one-hot InfoNCE). The loss per image is the mean of the two directions,

    l_i = 1/2 * ( -sum_j P_ij log softmax_j(L_i.)  -  sum_j P_ij log softmax_j(L_.i) ),   P_ij = [c_i = c_j] / n_i

and :func:`info_nce` returns ``(sum_i l_i, B)``: the loop divides by the step's image count. Negatives are
the micro-batch's other captions, so ``train.micro_batch_size`` is the contrastive batch.

With a frozen text tower (``clip.text_tower: frozen``) each caption's pooled tower output never changes:
:class:`TextFeatureCache` computes it once per distinct caption (``[C, H_text]``, on the model's device) and
the forward reads rows of it, then applies the trainable projection: the same numbers as running the tower
(tested), at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stillroom.domains.vl.clip_model import ImageTextModel
from stillroom.losses import LossResult


def info_nce(image_bd: torch.Tensor, text_bd: torch.Tensor, scale: torch.Tensor,
             caption_ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum over images of l_i, sum of the image->text terms, sum of the text->image terms)`` (module docstring);
    ``image_bd``/``text_bd`` L2-normalised ``[B, D]``, ``caption_ids_b`` ``[B]`` (equal ids: equal captions)."""
    logits_bb = scale * image_bd.float() @ text_bd.float().T
    same_bb = (caption_ids_b[:, None] == caption_ids_b[None, :]).float()
    targets_bb = same_bb / same_bb.sum(1, keepdim=True)
    i2t = -(targets_bb * logits_bb.log_softmax(1)).sum(1)
    t2i = -(targets_bb * logits_bb.T.log_softmax(1)).sum(1)
    return 0.5 * (i2t + t2i).sum(), i2t.sum(), t2i.sum()


class TextFeatureCache(nn.Module):
    """Pooled text-tower outputs ``[C, H_text]`` of every caption of the table, computed once (frozen tower)."""

    def __init__(self, model: ImageTextModel, captions: list[str], batch_size: int, where: list[str] | None = None):
        super().__init__()
        rows = []
        was = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(captions), batch_size):
                chunk = captions[i: i + batch_size]
                rows.append(model.text_pooled(**model.tokenize(chunk, where and where[i: i + batch_size])))
        model.train(was)
        self.register_buffer("pooled_ch", torch.cat(rows).float(), persistent=False)

    def forward(self, caption_ids_b: torch.Tensor) -> torch.Tensor:
        return self.pooled_ch[caption_ids_b.to(self.pooled_ch.device)]


class ClipForward(nn.Module):
    """``batch -> {"image": [B, D], "text": [B, D], "scale": scalar}``; text from the cache when given."""

    def __init__(self, model: ImageTextModel, cache: TextFeatureCache | None = None):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        image_bd = self.model.image_features(batch.inputs)
        if self.cache is not None:
            text_bd = self.model.project_text(self.cache(batch.caption_ids))
        else:
            text_bd = self.model.text_features(batch.captions)
        return {"image": image_bd, "text": text_bd, "scale": self.model.logit_scale}


@dataclass
class ClipObjective:
    """The contrastive objective of one player (the :class:`~stillroom.train.loop.Objective` protocol)."""

    forward: ClipForward

    def __post_init__(self) -> None:
        self.state = nn.Module()  # nothing of its own to checkpoint
        self._scale = float("nan")

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        total, i2t, t2i = info_nce(outputs["image"], outputs["text"], outputs["scale"], batch.caption_ids)
        self._scale = float(outputs["scale"].detach())
        return LossResult(total=total, count=batch.num_targets,
                          parts={"i2t": float(i2t.detach()), "t2i": float(t2i.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {"logit_scale": self._scale}
