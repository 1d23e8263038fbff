"""Self-distillation for further pre-training (Lee et al., ICLR 2023), image variant.

theta_0 (``mae.student_path``) is first further pre-trained on the target images with the MAE loss alone:
the teacher theta_T (``mae.teacher.path``, or ``mae.teacher.init_path = theta_0`` trained here and cached).
The student starts again from theta_0 and minimises

    L = L_MAE(student; random mask) + w * (1/B) sum_i || h_s(x_i) - sg(h_T(x_i)) ||^2

with ``h`` the final-layernormed [CLS] of the encoder on the whole, unmasked image: a second student
forward through the same weights with mask ratio 0 (:func:`~stillroom.domains.vision.mae.encode_pixels_unmasked`).
The regression is the released ``MSELoss(reduction='sum') / B``: :func:`cls_regression` returns the
squared distance summed over features and images with count ``B``.

``regularizer: l2sp`` is the ablation (spec 8.7 D): no teacher, ``w * ||theta_enc - theta_0,enc||^2`` over
the encoder's weights instead. It is a per-step term: each micro-batch adds it times its image count, so
the loop's division by the step's image count leaves it once per step (:func:`l2sp_penalty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stillroom.config.mae import SelfDistillFptConfig
from stillroom.domains.vision.mae import ENCODER_PREFIX, MaeForward, MaeObjective, encode_pixels_unmasked
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.loop import Player


def cls_regression(student_bd: torch.Tensor, teacher_bd: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over images and features of (s - t)^2, B)``: ``sum / B`` is ``MSELoss(reduction='sum')(s, t) / B``."""
    return ((student_bd.float() - teacher_bd.float()) ** 2).sum(), student_bd.shape[0]


def l2sp_penalty(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_k ||params[k] - anchors[k]||^2`` (a scalar; ``anchors``: theta_0's copies, no grad)."""
    return sum(((params[k].float() - anchors[k].float()) ** 2).sum() for k in anchors)


class FptForward(nn.Module):
    """The MAE forward plus ``cls`` ``[B, d]``: the student's final-layernormed [CLS] on the same (shifted)
    images, unmasked."""

    def __init__(self, mae: MaeForward):
        super().__init__()
        self.mae = mae
        self.model = mae.model
        self.clock = mae.clock

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mae.inputs(batch)

    def forward(self, batch: Any) -> dict[str, Any]:
        out = self.mae(batch)
        out["cls"] = encode_pixels_unmasked(self.model, out["pixels"]).last_hidden_state[:, 0]
        return out


@dataclass
class FptObjective(MaeObjective):
    """MAE loss + the [CLS] regression onto the teacher (``regression``) or L2-SP to theta_0 (``l2sp``)."""

    teacher: nn.Module | None = None
    settings: SelfDistillFptConfig | None = None

    def signal(self, batch: Any) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        pixels, _ = self.forward.inputs(batch)
        with torch.no_grad():
            return encode_pixels_unmasked(self.teacher, pixels).last_hidden_state[:, 0].float()

    def loss(self, outputs: dict, batch: Any, signal: torch.Tensor | None) -> LossResult:
        total, count = self.mae_part(outputs)
        parts = {"mae": float(total.detach())}
        w = self.settings.weight
        if self.settings.regularizer == "regression":
            term, _ = cls_regression(outputs["cls"], signal)
            parts["cls_regression"] = float(term.detach())
        else:
            anchors = {k.replace(".", "__"): v for k, v in self.state["theta0"].named_buffers()}
            params = {k.replace(".", "__"): p for k, p in self.forward.model.named_parameters() if k.startswith(
                ENCODER_PREFIX)}
            term = l2sp_penalty(params, anchors) * count
            parts["l2sp"] = float(term.detach())
        return LossResult(total=total + w * term, count=count, parts=parts)


class Anchors(nn.Module):
    """theta_0's encoder weights as buffers (checkpointed with the objective; names with ``__`` for ``.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for k, p in model.named_parameters():
            if k.startswith(ENCODER_PREFIX):
                self.register_buffer(k.replace(".", "__"), p.detach().clone())


def build_objective(model: nn.Module, teacher: nn.Module | None, s: SelfDistillFptConfig, *, seed: int,
                    shift: int) -> FptObjective:
    """The student's objective (``teacher`` is ``None`` for ``l2sp``)."""
    mae = MaeForward(model, seed=seed, shift=shift)
    if s.regularizer == "regression":
        return FptObjective(FptForward(mae), teacher=teacher, settings=s)
    return FptObjective(mae, extra={"theta0": Anchors(model)}, settings=s)


def _build(ctx: MethodContext) -> MethodPlan:
    cfg = ctx.cfg
    s = cfg.self_distill_fpt
    ctx.log(f"self_distill_fpt: MAE loss + {s.weight} x " + (
        "||h_s - h_T||^2 on the unmasked [CLS]" if s.regularizer == "regression" else "||theta - theta_0||^2 (L2-SP)"))
    objective = build_objective(ctx.model, ctx.teacher_model, s, seed=cfg.seed, shift=cfg.mae.shift)

    def players(student: Player) -> list[Player]:
        return [Player(student.name, student.model, objective)]

    return MethodPlan(players=players)


METHOD = Method("self_distill_fpt", build=_build, domains=("mae",))
