"""LELP (Loo et al. 2024): few-class distillation through pseudo-subclasses of the teacher's embedding.

With few classes the teacher's soft labels carry little dark knowledge; LELP splits each class into
``S = lelp.subclasses`` pseudo-subclasses from linear projections of the teacher's final embedding (the
construction, built once and cached: :mod:`stillroom.domains.vision.subclasses`) and distils the teacher's
subclass distribution ``p_T(c, s|x) = p_T(c|x) softmax_s(u_{c,s}(x) / beta)``:

* the student's head has ``S x C`` outputs (the method's ``outputs_per_class`` hook: the domain builds the
  student that wide, and evaluates, saves and reloads it as a ``C``-class model through the logsumexp of
  each class's outputs);
* the teacher signal of a batch is ``log p_T(c, s|x)`` ``[B, 1, S*C]`` (computed from the teacher's
  forward on the batch's images, so crops and flips are projected as they are);
* loss = ``loss.terms`` (``forward_kl`` / ``soft_ce``, at ``loss.loss_temperature``) between that signal and
  the student's ``S*C`` logits, plus ``lelp.alpha`` x cross-entropy of the labels on the aggregated class
  log-probabilities (:func:`aggregated_ce`; the paper's main runs: alpha = 0).

After training, ``lelp.json`` in the run folder records the construction (per-class PCA variances) and how
the subclasses relate to the images' fine labels (``classifier.class_groups``): the normalised mutual
information between the teacher's and the student's most probable subclass and the original class.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.methods import LelpConfig
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.subclasses import (
    SubclassBasis, basis_key, build_basis, capture_embedding, class_logits, embeddings_and_logits, head_of,
    load_basis, save_basis,
)
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.models.builtin import cache_root
from stillroom.teachers.signal import TeacherSignal
from stillroom.train.loop import DistillObjective, Player
from stillroom.files import write_atomic

REPORT_JSON = "lelp.json"


def aggregated_ce(logits_bk: torch.Tensor, labels_b: torch.Tensor, per_class: int) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of cross-entropy of ``labels_b`` ``[B]`` on the class log-probabilities of grouped
    logits ``[B, C*S]`` (logsumexp over each class's ``S`` outputs); count = B images."""
    return F.cross_entropy(class_logits(logits_bk.float(), per_class), labels_b, reduction="sum"), labels_b.numel()


def subclass_signal(teacher: nn.Module, basis: SubclassBasis, images: torch.Tensor, settings: LelpConfig,
                    ) -> torch.Tensor:
    """``log p_T(c, s|x)`` ``[B, C*S]`` fp32 of ``images`` ``[B, C_in, H, W]`` (teacher in eval mode, no grad)."""
    with torch.no_grad(), capture_embedding(teacher) as box:
        logits_bc = teacher(images).float()
        return basis.log_probs(box["e"].float(), logits_bc, beta=settings.beta, standardize=settings.standardize)


@dataclass
class LelpObjective:
    """The student's objective: ``base.mix`` against the subclass signal, plus ``alpha`` x :func:`aggregated_ce`."""

    base: DistillObjective
    teacher: nn.Module
    basis: SubclassBasis
    settings: LelpConfig

    def __post_init__(self) -> None:
        self.forward = self.base.forward

    @property
    def state(self) -> nn.Module:
        return self.base.mix

    def signal(self, batch: Any) -> TeacherSignal:
        device = next(self.teacher.parameters()).device
        if self.basis.projector_dd.device != device:
            self.basis = self.basis.to(device)
        logp_bk = subclass_signal(self.teacher, self.basis, batch.inputs.to(device), self.settings)
        return TeacherSignal(logits_btv=logp_bk[:, None, :].to(batch.inputs.device))

    def loss(self, outputs: dict, batch: Any, signal: TeacherSignal) -> LossResult:
        result = self.base.loss(outputs, batch, signal)
        if not self.settings.alpha:
            return result
        ce_sum, _ = aggregated_ce(outputs["logits"][:, 0, :], batch.labels, self.settings.subclasses)
        term = self.settings.alpha * ce_sum
        return LossResult(total=result.total + term, count=result.count,
                          parts={**result.parts, "class_ce": float(term.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.base.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.base.metrics()


def _members(ctx: MethodContext, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return labels if ctx.cfg.lelp.pca_by == "label" else logits.argmax(-1)


def teacher_basis(ctx: MethodContext) -> SubclassBasis:
    """The construction on the training split: loaded from ``<cache_dir>/lelp/<key>.safetensors`` or built and
    cached there (key: the teacher's weights, the training images, S, pca_by and the rotation seed)."""
    s: LelpConfig = ctx.cfg.lelp
    seed = s.rotation_seed if s.rotation_seed is not None else derive_seed(ctx.cfg.seed, "lelp-rotation")
    settings = {"subclasses": s.subclasses, "pca_by": s.pca_by, "seed": seed}
    train = ctx.data.train
    key = basis_key(ctx.teacher_model, [e.uid for e in train], ctx.data.dataset.fingerprint(), settings)
    path = cache_root(ctx.cfg.cache_dir) / "lelp" / f"{key}.safetensors"
    if path.is_file():
        ctx.log(f"lelp: cached construction {path}")
        return load_basis(path)
    images = torch.stack([e.image for e in train])
    emb, logits = embeddings_and_logits(ctx.teacher_model, images, ctx.cfg.classifier.eval_batch_size)
    weight = head_of(ctx.teacher_model).weight.detach().cpu()
    basis = build_basis(emb, _members(ctx, torch.tensor([e.label for e in train]), logits), weight,
                        s.subclasses, seed)
    if ctx.topology.is_main:
        save_basis(basis, path, settings)
    ctx.log(f"lelp: built {s.subclasses} subclasses per class from {len(train)} training embeddings of width "
            f"{emb.shape[1]} into {path}")
    return basis


def subclass_report(ctx: MethodContext, basis: SubclassBasis) -> dict:
    """What ``lelp.json`` holds: the construction's variances and, on the held-out images, the NMI between the
    teacher's / the student's most probable (class, subclass) and the fine label, and their agreement."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    s: LelpConfig = ctx.cfg.lelp
    images = torch.stack([e.image for e in ctx.data.heldout])
    fine = [e.fine_label if e.fine_label is not None else e.label for e in ctx.data.heldout]
    device = next(ctx.teacher_model.parameters()).device
    teacher_k = torch.cat([subclass_signal(ctx.teacher_model, basis.to(device), images[i : i + 256].to(device), s)
                           .cpu() for i in range(0, len(images), 256)]).argmax(-1)
    student_k = embeddings_and_logits(ctx.model, images, 256)[1].argmax(-1)
    variances = basis.variances_cs
    return {"subclasses": s.subclasses, "beta": s.beta, "pca_by": s.pca_by, "standardize": s.standardize,
            "alpha": s.alpha, "heldout_images": len(fine),
            "pca_variance_per_class": variances.tolist(),
            "nmi_teacher_subclass_fine_label": float(nmi(fine, teacher_k.tolist())),
            "nmi_student_subclass_fine_label": float(nmi(fine, student_k.tolist())),
            "subclass_agreement_student_teacher": float((teacher_k == student_k).float().mean())}


def _write_report(ctx: MethodContext, basis: SubclassBasis, run_dir: Path) -> None:
    report = subclass_report(ctx, basis)
    write_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    ctx.log(f"lelp: subclass NMI with the fine labels: teacher {report['nmi_teacher_subclass_fine_label']:.3f}, "
            f"student {report['nmi_student_subclass_fine_label']:.3f} ({run_dir / REPORT_JSON})")


def _build(ctx: MethodContext) -> MethodPlan:
    basis = teacher_basis(ctx)

    def players(student: Player) -> list[Player]:
        objective = LelpObjective(student.objective, ctx.teacher_model, basis, ctx.cfg.lelp)
        return [dataclasses.replace(student, objective=objective)]

    return MethodPlan(players=players, report=lambda run_dir: _write_report(ctx, basis, run_dir))


METHOD = Method("lelp", build=_build, domains=("classifier",), outputs_per_class=lambda cfg: cfg.lelp.subclasses)
