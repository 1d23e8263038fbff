"""DHO (Kang et al. 2025): dual-head semi-supervised distillation from a (vision-language) teacher.

A few labelled images, many unlabelled ones (the classifier domain's semi-supervised split,
:mod:`stillroom.domains.vision.semi_supervised`) and a teacher such as a CLIP zero-shot classifier. The student
has two linear heads on one backbone (:mod:`stillroom.domains.vision.dual_head`): the CE head learns the labels
of the labelled images, the KD head learns the teacher (``loss.terms``, DHO's ``forward_kl`` at ``tau = 2`` with
the ``tau^2`` factor) on labelled and unlabelled images. Every micro-batch holds ``b_l`` labelled and ``b_u``
unlabelled images (:class:`TwoStreamSampler`; ``dho.labelled_fraction``), and each image's loss is weighted so
that one step minimises, as the official code does with a labelled and an unlabelled batch,

    L = lambda * mean_labelled CE(z_ce, y) + (1 - lambda) * (mean_labelled KD(z_kd) + mean_unlabelled KD(z_kd))

(:func:`group_weights`: ``B / n_l`` for a labelled image, ``B / n_u`` for an unlabelled one, where ``B`` is the
micro-batch; with the loop dividing by the step's image count this gives those means exactly). The labels of
unlabelled images are ``-1`` and never reach a loss: the KD terms get no labels at all.

After the last step the mixture ``p = alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta)`` is chosen on the
labelled validation split (``dho.mixture: search``; :mod:`stillroom.methods.dho_mixture`) and stored in the
model, so the saved student, the report and ``load_model`` all predict with it. ``dho.json`` in the run folder
records the search and each head's held-out accuracy and calibration.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.dho import DhoConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.dual_head import DualHeadClassifier
from stillroom.domains.vision.forward import ClassifierTeacher
from stillroom.domains.vision.semi_supervised import UNLABELLED, SemiSupervisedSplits
from stillroom.domains.vision.subclasses import head_of
from stillroom.losses import LossMix, LossResult, StudentOutput
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods.dho_mixture import choose_mixture, write_report
from stillroom.teachers.signal import TeacherSignal
from stillroom.train.loop import Player


def group_weights(labelled_b: torch.Tensor) -> torch.Tensor:
    """``[B]`` float: ``B / n_l`` for labelled images, ``B / n_u`` for unlabelled ones (0 for an empty group), so
    ``sum(w * loss) / B`` is the mean over the labelled plus the mean over the unlabelled images."""
    size = labelled_b.numel()
    n_l = int(labelled_b.sum())
    n_u = size - n_l
    w_l = size / n_l if n_l else 0.0
    w_u = size / n_u if n_u else 0.0
    return torch.where(labelled_b, torch.full_like(labelled_b, w_l, dtype=torch.float32),
                       torch.full_like(labelled_b, w_u, dtype=torch.float32))


def labelled_ce_sum(z_ce_bc: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of the labelled images' labels (``labels_b == -1``: unlabelled, skipped)."""
    labelled = labels_b != UNLABELLED
    if not bool(labelled.any()):
        return z_ce_bc.sum() * 0.0
    return F.cross_entropy(z_ce_bc[labelled].float(), labels_b[labelled], reduction="sum")


def kd_kl_per_image(z_s_bc: torch.Tensor, z_t_bc: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))`` per image ``[B]`` (the spec's ``kd_kl``; a reference
    for the loss terms the KD head uses, tested equal to ``forward_kl`` with ``scale_by_temperature_squared``)."""
    log_t = torch.log_softmax(z_t_bc.float() / tau, -1)
    log_s = torch.log_softmax(z_s_bc.float() / tau, -1)
    return tau ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)


class TwoStreamSampler:
    """Micro-batches of ``b_l`` labelled indices (``0 .. n_labelled-1``) then ``b_u`` unlabelled ones (after
    them), each stream an :class:`ExampleSampler` (its own epochs, seeded, split across processes)."""

    def __init__(self, n_labelled: int, n_unlabelled: int, batch_size: int, labelled_fraction: float, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        b_l, b_u = stream_sizes(batch_size, labelled_fraction, n_unlabelled)
        self.offset = n_labelled
        self.labelled = ExampleSampler(n_labelled, b_l, seed, shuffle, rank, world_size)
        self.unlabelled = ExampleSampler(n_unlabelled, b_u, derive_seed(seed, "dho-unlabelled"), shuffle, rank,
                                         world_size) if b_u else None

    @property
    def epoch(self) -> int:
        """Epochs of the unlabelled stream (the labelled one cycles faster); crop views read it."""
        return (self.unlabelled or self.labelled).epoch

    def next_indices(self) -> list[int]:
        extra = [] if self.unlabelled is None else [self.offset + i for i in self.unlabelled.next_indices()]
        return self.labelled.next_indices() + extra

    def state_dict(self) -> dict:
        return {"labelled": self.labelled.state_dict(),
                "unlabelled": None if self.unlabelled is None else self.unlabelled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.labelled.load_state_dict(state["labelled"])
        if self.unlabelled is not None:
            self.unlabelled.load_state_dict(state["unlabelled"])


def stream_sizes(batch_size: int, labelled_fraction: float, n_unlabelled: int) -> tuple[int, int]:
    """``(b_l, b_u)``: labelled and unlabelled images per micro-batch (at least one of each when both exist)."""
    if n_unlabelled == 0:
        return batch_size, 0
    b_l = min(batch_size - 1, max(1, round(batch_size * labelled_fraction)))
    return b_l, batch_size - b_l


def check_streams(cfg: Any, data: SemiSupervisedSplits, world_size: int) -> None:
    """Refuse, before step 0, a micro-batch that one of the two streams cannot fill."""
    b_l, b_u = stream_sizes(cfg.train.micro_batch_size, cfg.dho.labelled_fraction, len(data.unlabelled))
    for name, have, need in (("labelled", len(data.labelled), b_l), ("unlabelled", len(data.unlabelled), b_u)):
        if have < need * world_size:
            raise ValueError(f"method=dho: {have} {name} training images cannot fill the {need * world_size} {name} "
                             f"images of a micro-batch (train.micro_batch_size={cfg.train.micro_batch_size} x "
                             f"dho.labelled_fraction={cfg.dho.labelled_fraction}, {world_size} processes): lower "
                             "train.micro_batch_size or raise dho.semi_supervised.labels_per_class")
    if cfg.baseline and len(data.labelled) < cfg.train.micro_batch_size * world_size:
        raise ValueError(f"baseline: true trains the CE baseline on the {len(data.labelled)} labelled images alone, "
                         f"fewer than one micro-batch of train.micro_batch_size={cfg.train.micro_batch_size} x "
                         f"{world_size} processes: lower train.micro_batch_size, raise dho.semi_supervised."
                         "labels_per_class, or set baseline: false")


class MemoTeacher:
    """The teacher's signal with each training image's logits kept after its first forward (``dho.teacher_cache``):
    a frozen teacher in eval mode gives an image the same logits every epoch, so each image is run once. Batches of
    crop views (``view_ids`` set) always run the teacher (a view is new each epoch)."""

    def __init__(self, teacher: ClassifierTeacher):
        self.teacher = teacher
        self.memo: dict[str, torch.Tensor] = {}

    def signal(self, batch: Any) -> TeacherSignal:
        if batch.view_ids is not None:
            return self.teacher.signal(batch)
        missing = [i for i, uid in enumerate(batch.uids) if uid not in self.memo]
        if missing:
            rows = self.teacher.signal(dataclasses.replace(batch, inputs=batch.inputs[missing])).logits_btv[:, 0]
            self.memo.update({batch.uids[i]: row for i, row in zip(missing, rows)})
        logits_bc = torch.stack([self.memo[uid] for uid in batch.uids]).to(batch.inputs.device)
        return TeacherSignal(logits_btv=logits_bc[:, None, :])


@contextmanager
def features_of(layer: nn.Linear):
    """Within the block, every forward of ``layer`` stores its input (the shared features ``[B, D]``)."""
    box: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda _m, inputs: box.__setitem__("h", inputs[0]))
    try:
        yield box
    finally:
        handle.remove()


class DhoForward(nn.Module):
    """The player's forward: ``{"ce": z_ce [B, C], "kd": z_kd [B, C], "features": h [B, D]}`` (a single-head
    student gives its one head's logits as both)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dual = isinstance(model, DualHeadClassifier)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        layer = self.model.head_layer() if self.dual else head_of(self.model)
        with features_of(layer) as box:
            if self.dual:
                z_ce, z_kd = self.model.heads(batch.inputs)
            else:
                z_ce = z_kd = self.model(batch.inputs)
        return {"ce": z_ce, "kd": z_kd, "features": box["h"]}


@dataclass
class DhoObjective:
    """DHO's loss on one micro-batch (see the module docstring); ``mix``: the KD head's ``loss.terms``."""

    forward: DhoForward
    mix: LossMix
    teacher: ClassifierTeacher | MemoTeacher
    settings: DhoConfig
    finish: Any = None
    """Called after the last step (the mixture search)."""
    cosines: list[float] = field(default_factory=list)
    step: int = 0

    @property
    def state(self) -> nn.Module:
        return self.mix

    def signal(self, batch: Any) -> Any:
        return self.teacher.signal(batch)

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        lam = self.settings.ce_weight
        labels_b = batch.labels
        weights_b = group_weights(labels_b != UNLABELLED).to(outputs["kd"].device)
        w_l = float(weights_b[labels_b != UNLABELLED][0]) if bool((labels_b != UNLABELLED).any()) else 0.0
        ce = lam * w_l * labelled_ce_sum(outputs["ce"], labels_b)
        kd = self.mix(StudentOutput(logits_btv=outputs["kd"][:, None, :]), signal, None, batch.loss_mask,
                      ((1.0 - lam) * weights_b)[:, None]).total
        every = self.settings.gradient_cosine_every
        if every and self.step % every == 0 and torch.is_grad_enabled():
            self._measure_cosine(ce, kd, outputs["features"])
        return LossResult(total=ce + kd, count=batch.num_targets,
                          parts={"ce_head": float(ce.detach()), "kd_head": float(kd.detach())})

    def _measure_cosine(self, ce: torch.Tensor, kd: torch.Tensor, features_bd: torch.Tensor) -> None:
        """Cosine between d(CE term)/dh and d(KD term)/dh over the micro-batch's shared features ``[B, D]``."""
        if not (0.0 < self.settings.ce_weight < 1.0 and ce.requires_grad and kd.requires_grad):
            return  # one term has no weight: there is no conflict to measure
        g_ce = torch.autograd.grad(ce, features_bd, retain_graph=True)[0].flatten()
        g_kd = torch.autograd.grad(kd, features_bd, retain_graph=True)[0].flatten()
        self.cosines.append(float(F.cosine_similarity(g_ce, g_kd, dim=0)))

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.mix.after_step(per_target, step, total_steps)
        self.step = step + 1
        if step == total_steps - 1 and self.finish is not None:
            self.finish()

    def metrics(self) -> dict[str, float]:
        out = dict(self.mix.log_state())
        if self.cosines:
            out["dho/grad_cos"] = self.cosines[-1]
        return out


def _build(ctx: MethodContext) -> MethodPlan:
    cfg, data = ctx.cfg, ctx.data
    if not isinstance(data, SemiSupervisedSplits):
        raise ValueError("method=dho needs the classifier domain's semi-supervised split (dho.semi_supervised)")
    check_streams(cfg, data, ctx.topology.world_size)
    box: dict[str, Any] = {}

    def sampler(n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                group_size: int = 1) -> TwoStreamSampler:
        return TwoStreamSampler(data.labelled_count, n - data.labelled_count, batch_size,
                                cfg.dho.labelled_fraction, seed, shuffle, rank, world_size)

    def finish() -> None:
        if isinstance(ctx.model, DualHeadClassifier) and cfg.dho.mixture == "search":
            box["search"] = choose_mixture(ctx.model, data.validation, cfg.dho, cfg.classifier.eval_batch_size)
            ctx.log(f"dho: mixture alpha {box['search']['alpha']:g}, beta {box['search']['beta']:g} chosen on "
                    f"{len(data.validation)} validation images (accuracy {100 * box['search']['accuracy']:.1f}%)")

    def players(student: Player) -> list[Player]:
        teacher = ClassifierTeacher(ctx.teacher_model)
        objective = DhoObjective(DhoForward(ctx.model), student.objective.state,
                                 MemoTeacher(teacher) if cfg.dho.teacher_cache else teacher, cfg.dho, finish)
        box["objective"] = objective
        return [dataclasses.replace(student, objective=objective)]

    def report(run_dir) -> None:
        cosines = box["objective"].cosines if "objective" in box else []
        write_report(ctx, run_dir, box.get("search"), cosines)

    return MethodPlan(sampler=sampler, players=players, report=report)


METHOD = Method("dho", build=_build, domains=("classifier",))
