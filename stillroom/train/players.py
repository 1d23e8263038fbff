"""Players: the parameter groups a training step updates, each with its optimizer, loss and update ratio.

Most runs have one player, the student. Adversarial and score-distillation methods add a
second (a discriminator, a fake-score critic) with its own optimizer and an update ratio
(``updates_per_step``: a critic updated 5 times per generator update is a player with 5).
The loop (:mod:`stillroom.train.loop`) steps the players in their list order, every step,
and checkpoints each one's weights, objective state, optimizer and schedule.

A player's :class:`Objective` turns one micro-batch into a ``(sum, count)`` loss:
``signal(batch)`` (the teacher's, no grad, timed), ``forward(batch)`` (the module that
distributed data parallel wraps), then ``loss(outputs, batch, signal)``.
:class:`DistillObjective` is the one every current domain uses: the student's outputs
(logits, or the last hidden state and the output head for the fused path, plus hidden
states and attentions) against a teacher signal, through a
:class:`~stillroom.losses.LossMix`, on the positions ``batch.loss_mask`` marks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from stillroom.losses import LossMix, LossResult, StudentOutput


class TeacherSource(Protocol):
    def signal(self, batch: Any) -> Any: ...


class Objective(Protocol):
    forward: torch.nn.Module
    """Runs the player's model on a batch; what distributed data parallel wraps."""
    state: torch.nn.Module
    """Objective state checkpointed with the player; its trainable parameters are optimized too."""

    def signal(self, batch: Any) -> Any: ...
    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult: ...
    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None: ...
    def metrics(self) -> dict[str, float]: ...


@dataclass
class DistillObjective:
    """Student outputs against a teacher signal through ``mix`` (see the module docstring).

    ``forward(batch)`` returns ``{"logits": [B, T, V]}`` or, on the fused path,
    ``{"hidden": [B, T, D]}`` with ``head`` the output projection; plus ``hs_<i>`` hidden states
    and ``att_<i>`` attentions the mix asks for. ``teacher`` is ``None`` when no term needs one.
    """

    forward: torch.nn.Module
    mix: LossMix
    teacher: TeacherSource | None = None
    head: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.mix.needs_teacher and self.teacher is None:
            raise ValueError("the loss terms need a teacher, but no teacher source was built")

    @property
    def state(self) -> torch.nn.Module:
        return self.mix

    def signal(self, batch: Any) -> Any:
        return self.teacher.signal(batch) if self.mix.needs_teacher else None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        student = StudentOutput(
            logits_btv=outputs.get("logits"), hidden_btd=outputs.get("hidden"), head=self.head,
            hidden_states={i: outputs[f"hs_{i}"] for i in self.mix.student_hidden_layers},
            attentions={int(k[4:]): v for k, v in outputs.items() if k.startswith("att_")},
        )
        return self.mix(student, signal, batch.target_ids, batch.loss_mask, batch.target_weight)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.mix.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.mix.log_state()


@dataclass
class Player:
    """A parameter group with its optimizer, loss and update ratio.

    ``model``: the module whose weights the player trains and checkpoints (e.g. the student);
    ``objective``: its loss; ``updates_per_step``: optimizer updates per training step, each on
    freshly drawn micro-batches; ``replace_batches`` / ``weight_targets``: the method's batch
    slots (:class:`stillroom.methods.base.MethodPlan`) for this player.
    """

    name: str
    model: torch.nn.Module
    objective: Objective
    updates_per_step: int = 1
    replace_batches: Callable | None = None
    weight_targets: Callable | None = None
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(default=None, repr=False)

    def trainable(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + [p for p in self.objective.state.parameters() if p.requires_grad]

    def build_optimizer(self, tc) -> None:
        """AdamW over the trainable parameters (no weight decay on vectors) with the ``train`` schedule."""
        params = self.trainable()
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tc))


def lr_factor(step: int, tc) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based): linear warm-up, then cosine or
    linear decay to ``min_lr_ratio``, or constant."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.min_lr_ratio
    if tc.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
