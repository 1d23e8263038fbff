"""Several classifier teachers acting as one (``classifier.teachers``; MEAL V2's ensemble).

Each member is loaded or trained and cached exactly as a single teacher is
(:func:`~stillroom.domains.vision.teacher.classifier_teacher`); members may differ in architecture
(an MLP beside a CNN) but must map the same images to the same classes. Their logits
``[K, B, C]`` combine into one dense signal by ``classifier.ensemble_reduce``:

* ``mean_prob`` (MEAL V2): ``p_T = (1/K) sum_k softmax(z_k)``, carried as ``log p_T`` ``[B, C]``
  (valid logits: ``softmax(log p_T) = p_T``). The averaging is the language side's ensemble rule
  (:class:`stillroom.teachers.ensemble.EnsembleTeacher`, mode ``average``: a running ``logaddexp``
  of ``log w_k + log_softmax(z_k)``), reused here rather than written twice;
* ``mean_logit`` (the ablation): ``z̄_T = (1/K) sum_k z_k``.

:class:`ClassifierEnsemble` is an ``nn.Module`` whose forward gives those combined logits, so the
report's teacher row, agreement, KL and images/s measure the ensemble as the student sees it.
``z̄_T`` is also what MEAL V2's discriminator sees as "teacher" (:meth:`ClassifierEnsemble.targets`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stillroom.config.domains import ClassifierConfig
from stillroom.domains.vision.data import ImageSplits
from stillroom.domains.vision.metrics import logits_of
from stillroom.domains.vision.models import Classifier
from stillroom.domains.vision.teacher import classifier_teacher
from stillroom.teachers.ensemble import EnsembleTeacher
from stillroom.teachers.signal import TeacherSignal
from stillroom.train.distributed import Topology

Log = Callable[[str], None]


class _FixedLogits:
    """An ensemble member whose signal is already computed: logits ``[B, C]`` as ``[B, 1, C]``."""

    def __init__(self, logits_bc: torch.Tensor):
        self.logits_bc = logits_bc

    def signal(self, _batch: object) -> TeacherSignal:
        return TeacherSignal(logits_btv=self.logits_bc[:, None, :])


def mean_prob_logits(logits_kbc: torch.Tensor) -> torch.Tensor:
    """``log((1/K) sum_k softmax(logits_kbc[k]))`` ``[B, C]`` fp32, by the language ensemble's averaging rule."""
    members = [_FixedLogits(z.float()) for z in logits_kbc]
    return EnsembleTeacher(members, mode="average", vocab_size=logits_kbc.shape[-1]).signal(None).logits_btv[:, 0]


def combine(logits_kbc: torch.Tensor, reduce: str) -> torch.Tensor:
    """Members' logits ``[K, B, C]`` -> the ensemble's logits ``[B, C]`` fp32 (``mean_prob``: log of the mean
    probabilities; ``mean_logit``: the mean logits)."""
    if reduce == "mean_prob":
        return mean_prob_logits(logits_kbc)
    if reduce == "mean_logit":
        return logits_kbc.float().mean(0)
    raise ValueError(f"classifier.ensemble_reduce={reduce!r}; valid: mean_prob, mean_logit")


class ClassifierEnsemble(nn.Module):
    """Frozen member classifiers; ``forward(images [B, C_in, H, W]) -> [B, C]`` combined by ``reduce``."""

    def __init__(self, members: list[Classifier], reduce: str = "mean_prob"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member (classifier.teachers)")
        shapes = {(tuple(m.in_shape), m.num_classes) for m in members}
        if len(shapes) > 1:
            raise ValueError(f"classifier.teachers map different images or classes: {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.reduce = reduce
        self.in_shape, self.num_classes = members[0].in_shape, members[0].num_classes

    def member_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]`` fp32 logits of every member."""
        return torch.stack([m(images).float() for m in self.members])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return combine(self.member_logits(images), self.reduce)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(combined logits [B, C], mean member logits [B, C])`` fp32 from one pass of the members: what a
        student's soft loss reads and what MEAL V2's discriminator sees as "teacher"."""
        logits_kbc = self.member_logits(images)
        return combine(logits_kbc, self.reduce), logits_kbc.mean(0)

    def describe(self) -> str:
        """e.g. ``ensemble of 2 (mean_prob): mlp [256] (..), cnn [8, 16] (..)``."""
        return f"ensemble of {len(self.members)} ({self.reduce}): " + ", ".join(m.describe() for m in self.members)


def classifier_teachers(sec: ClassifierConfig, data: ImageSplits, *, seed: int, cache_dir: str | None,
                        device: torch.device, topology: Topology, log: Log) -> tuple[nn.Module, str, list[str]]:
    """``(teacher, its origin, one note per member)``: ``sec.teacher`` alone, or the ensemble of ``sec.teachers``
    with each member's held-out accuracy in the notes."""
    if sec.teachers is None:
        model, origin = classifier_teacher(sec.teacher, data, heldout_fraction=sec.heldout_fraction, seed=seed,
                                           cache_dir=cache_dir, device=device, topology=topology, log=log)
        return model, origin, []
    members, notes = [], []
    images = torch.stack([e.image for e in data.heldout])
    labels = torch.tensor([e.label for e in data.heldout])
    for i, tc in enumerate(sec.teachers):
        model, origin = classifier_teacher(tc, data, heldout_fraction=sec.heldout_fraction, seed=seed,
                                           cache_dir=cache_dir, device=device, topology=topology, log=log)
        accuracy = float((logits_of(model, images, batch_size=sec.eval_batch_size, device=device).argmax(-1)
                          == labels).float().mean())
        notes.append(f"teachers[{i}]: held-out accuracy {100 * accuracy:.1f}%; {origin}")
        members.append(model)
    ensemble = ClassifierEnsemble(members, sec.ensemble_reduce).to(device).eval()
    return ensemble, ensemble.describe(), notes
