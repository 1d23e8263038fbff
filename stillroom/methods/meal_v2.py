"""MEAL V2 (Shen & Savvides 2020): a classifier refined on its teachers' ensemble, with an output discriminator.

The student (usually a trained one: ``classifier.student_path``) learns only from the ensemble of
``classifier.teachers``: its similarity loss is ``loss.terms`` (MEAL V2's ``soft_ce`` at temperature 1
against ``p_T``, the mean of the teachers' probabilities; no hard labels) through the domain's
:class:`~stillroom.train.loop.DistillObjective`. ``meal_v2.discriminator`` adds an output
discriminator D (:class:`OutputDiscriminator`) on the ``[B, C]`` logits: student logits ``z_S``
labelled "student" (one-hot ``[1, 0]``), the teachers' mean logits ``z̄_T`` labelled "teacher"
(``[0, 1]``), binary cross-entropy with logits. Two modes, because the released code and the paper
disagree (spec section 2.2):

* ``official`` (the released code): ``L = L_sim + L_D``; D's parameters join the student's
  optimizer (at ``d_lr``) and both descend this one objective, so the student's gradient through
  D makes it *easier* to tell apart from the teacher (no gradient reversal);
* ``adversarial`` (the paper's reading): D is a second player minimising ``L_D`` on detached
  student logits with its own optimizer; the student minimises
  ``L_sim + lambda_adv * BCE(D(z_S), "teacher")`` (non-saturating), D's weights frozen in that term.

Losses are pure functions returning ``(sum, count)`` with ``count`` = images, so the loop's single
division by the step's image count gives the released code's means exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stillroom.config.methods import MealV2Config
from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.teachers.signal import TeacherSignal
from stillroom.train.loop import DistillObjective, Player, lr_factor

def teacher_targets(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target logits [B, C], mean teacher logits [B, C])`` fp32, no grad: an ensemble's own ``targets``
    (:class:`stillroom.domains.vision.ensemble.ClassifierEnsemble`), or a single teacher's logits twice."""
    with torch.no_grad():
        if hasattr(teacher, "targets"):
            return teacher.targets(images)
        logits = teacher(images).float()
        return logits, logits


STUDENT, TEACHER = 0, 1
"""Column of D's two outputs that is 1 in the one-hot target of each side (the released code's labels)."""


def discriminator_widths(num_classes: int) -> list[int]:
    """``[C, C//8, C//64, 2]`` (the released 1x1 convs: 1000 -> 125 -> 15 -> 2), hidden widths clamped to >= 1
    so that a 10-class D (10 -> 1 -> 1 -> 2) still exists."""
    return [num_classes, max(1, num_classes // 8), max(1, num_classes // 64), 2]


class OutputDiscriminator(nn.Module):
    """logits ``[B, C]`` -> two scores ``[B, 2]``: Linear + ReLU per layer, ReLU after the last one too (as
    released). Linear layers on ``[B, C]`` equal the released 1x1 convs on ``[B, C, 1, 1]``."""

    def __init__(self, num_classes: int):
        super().__init__()
        w = discriminator_widths(num_classes)
        layers: list[nn.Module] = []
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, logits_bc: torch.Tensor) -> torch.Tensor:
        return self.layers(logits_bc.float())


def _one_hot(n: int, column: int, like: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` targets with 1 in ``column``."""
    target = torch.zeros(n, 2, dtype=like.dtype, device=like.device)
    target[:, column] = 1.0
    return target


def discriminator_loss(d_student_b2: torch.Tensor, d_teacher_b2: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of D's BCE-with-logits: student rows -> "student", teacher rows -> "teacher".

    The released code takes the mean over the ``2B x 2`` elements of the concatenated batch; per image
    that is a quarter of its four elements, so ``sum / count`` (count = B images) is exactly that mean."""
    b = d_student_b2.shape[0]
    bce = F.binary_cross_entropy_with_logits
    total = (bce(d_student_b2, _one_hot(b, STUDENT, d_student_b2), reduction="sum")
             + bce(d_teacher_b2, _one_hot(b, TEACHER, d_teacher_b2), reduction="sum"))
    return total / 4.0, b


def fool_loss(d_student_b2: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of the non-saturating generator term ``BCE(D(z_S), "teacher")``, mean over the ``B x 2``
    elements as ``sum / count`` (count = B images)."""
    b = d_student_b2.shape[0]
    total = F.binary_cross_entropy_with_logits(d_student_b2, _one_hot(b, TEACHER, d_student_b2), reduction="sum")
    return total / 2.0, b


@dataclass
class MealSignal:
    """The teachers on one batch: ``teacher``: the combined target as a dense signal (``[B, 1, C]``, for the loss
    terms; ``None`` when no term reads it); ``mean_logits_bc``: the members' mean logits ``[B, C]`` (D's "teacher")."""

    teacher: TeacherSignal | None
    mean_logits_bc: torch.Tensor | None


@dataclass
class MealV2Objective:
    """The student's objective: ``base`` (``loss.terms`` against the ensemble) plus the discriminator term of
    ``mode`` (see the module docstring). In ``official`` mode D lives in ``state``: it is checkpointed with the
    student and optimized with it."""

    base: DistillObjective
    mode: str
    teacher_model: nn.Module
    discriminator: OutputDiscriminator | None = None
    lambda_adv: float = 1.0

    def __post_init__(self) -> None:
        self.forward = self.base.forward
        self._state = nn.ModuleDict({"mix": self.base.mix})
        if self.mode == "official":
            self._state["discriminator"] = self.discriminator

    @property
    def state(self) -> nn.Module:
        return self._state

    @torch.no_grad()
    def signal(self, batch: Any) -> MealSignal | None:
        if not self.base.mix.needs_teacher and self.mode == "off":
            return None
        target_bc, mean_bc = teacher_targets(self.teacher_model, batch.inputs)
        return MealSignal(TeacherSignal(logits_btv=target_bc[:, None, :]), mean_bc)

    def loss(self, outputs: dict, batch: Any, signal: MealSignal | None) -> LossResult:
        result = self.base.loss(outputs, batch, None if signal is None else signal.teacher)
        if self.mode == "off":
            return result
        z_s = outputs["logits"][:, 0, :]
        if self.mode == "official":
            d_sum, _ = discriminator_loss(self.discriminator(z_s), self.discriminator(signal.mean_logits_bc))
            name, term = "discriminator", d_sum
        else:  # adversarial: D's weights are frozen here; only the student moves to fool it
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            f_sum, _ = fool_loss(functional_call(self.discriminator, frozen, (z_s,)))
            name, term = "fool_discriminator", self.lambda_adv * f_sum
        return LossResult(total=result.total + term, count=result.count,
                          parts={**result.parts, name: float(term.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.base.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.base.metrics()


class _DiscriminatorForward(nn.Module):
    """D's forward on a batch: ``{"d_student": D(z_S) [B, 2], "d_teacher": D(z̄_T) [B, 2]}``, the student and the
    teachers run without grad (kept outside the module, so only D is what DDP would wrap)."""

    def __init__(self, discriminator: OutputDiscriminator, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.discriminator = discriminator
        self._others = (student, teacher)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        student, teacher = self._others
        with torch.no_grad():
            z_s = student(batch.inputs).float()
            _, mean_bc = teacher_targets(teacher, batch.inputs)
        return {"d_student": self.discriminator(z_s), "d_teacher": self.discriminator(mean_bc)}


@dataclass
class DiscriminatorObjective:
    """``adversarial`` mode's second player: D minimises :func:`discriminator_loss` on detached logits."""

    forward: _DiscriminatorForward
    state: nn.Module = field(default_factory=nn.Module)

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: None) -> LossResult:
        total, count = discriminator_loss(outputs["d_student"], outputs["d_teacher"])
        return LossResult(total=total, count=count, parts={"discriminator": float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class MealPlayer(Player):
    """A player whose optimizer follows ``meal_v2``: SGD with momentum (the released code) or AdamW, with
    ``d_params`` (the discriminator's) in their own group at ``meal_v2.d_lr``; the ``train`` schedule scales all."""

    settings: MealV2Config | None = None
    d_params: list[nn.Parameter] = field(default_factory=list)

    def build_optimizer(self, tc) -> None:
        d_ids = {id(p) for p in self.d_params}
        own = [p for p in self.trainable() if id(p) not in d_ids]
        groups = [{"params": [p for p in own if p.ndim >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in own if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if self.d_params:
            groups.append({"params": list(self.d_params), "lr": self.settings.d_lr, "weight_decay": 0.0})
        if self.settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=self.settings.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tc))


def _players(student: Player, ctx: MethodContext) -> list[Player]:
    """The student with :class:`MealV2Objective` (and D in official mode), plus D's player in adversarial mode."""
    s: MealV2Config = ctx.cfg.meal_v2
    d = None
    if s.discriminator != "off":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.cfg.seed, "meal_v2-discriminator"))
            d = OutputDiscriminator(ctx.vocab_size)
    objective = MealV2Objective(student.objective, s.discriminator, ctx.teacher_model, d, s.lambda_adv)
    players: list[Player] = [MealPlayer(
        student.name, student.model, objective, replace_batches=student.replace_batches,
        weight_targets=student.weight_targets, settings=s,
        d_params=list(d.parameters()) if s.discriminator == "official" else [])]
    if s.discriminator == "adversarial":
        forward = _DiscriminatorForward(d, student.model, ctx.teacher_model)
        players.append(MealPlayer("discriminator", d, DiscriminatorObjective(forward),
                                  updates_per_step=s.d_updates_per_step, settings=s, d_params=list(d.parameters())))
    return players


def _build(ctx: MethodContext) -> MethodPlan:
    return MethodPlan(players=lambda student: _players(student, ctx))


METHOD = Method("meal_v2", build=_build, domains=("classifier",))
