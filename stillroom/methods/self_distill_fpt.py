"""Self-distillation for further pre-training (Lee et al., ICLR 2023): image (``mae``) and text (``mlm``) variants.

theta_0 (``mae.student_path`` / ``mlm.student_path``) is first further pre-trained on the target data with the
domain's self-supervised loss alone: the teacher theta_T (``<domain>.teacher.path``, or
``<domain>.teacher.init_path = theta_0`` trained here and cached). The student starts again from theta_0 and
minimises

    L = L_base(student; random mask) + w * (1/B) sum_i || h_s(x_i) - sg(h_T(x_i)) ||^2

with ``L_base`` the MAE loss (images) or BERT's MLM loss (text; the spec's "same recipe with RoBERTa, MLM
instead of MAE"), and ``h`` the final-layernormed [CLS] of the encoder on the whole, unmasked input: a
second student forward through the same weights. The regression is the released
``MSELoss(reduction='sum') / B``: :func:`cls_regression` returns the squared distance summed over features
and examples with count ``B``; both base losses count one target per example, so the loop's division by
the step's ``B`` gives exactly that.

``regularizer: l2sp`` is the ablation (spec 8.7 D): no teacher, ``w * ||theta_enc - theta_0,enc||^2`` over
the encoder's weights instead. It is a per-step term: each micro-batch adds it times its example count, so
the loop's division by the step's count leaves it once per step (:func:`l2sp_penalty`).

What differs between the domains is a :class:`FptParts`: the base objective, the unmasked-[CLS] encoder
call, what of the batch it reads, and the encoder's weight prefix. :func:`cls_regression` and
:func:`l2sp_penalty` are the one copy of each term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from stillroom.config.mae import SelfDistillFptConfig
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.loop import Player


def cls_regression(student_bd: torch.Tensor, teacher_bd: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over examples and features of (s - t)^2, B)``: ``sum / B`` is ``MSELoss(reduction='sum')(s, t) / B``."""
    return ((student_bd.float() - teacher_bd.float()) ** 2).sum(), student_bd.shape[0]


def l2sp_penalty(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_k ||params[k] - anchors[k]||^2`` (a scalar; ``anchors``: theta_0's copies, no grad)."""
    return sum(((params[k].float() - anchors[k].float()) ** 2).sum() for k in anchors)


@dataclass(frozen=True)
class FptParts:
    """What a domain supplies: ``base(model, extra)`` its self-supervised objective (``.forward`` with ``.model``
    and ``.inputs(batch)``, ``.loss``, ``.state``; ``extra`` state modules to checkpoint with it);
    ``cls(model, inputs)`` ``[B, d]`` the unmasked final [CLS]; ``student_inputs(outputs)`` those inputs from
    the base forward's outputs; ``teacher_inputs(forward, batch)`` the same for the teacher; ``encoder_prefix``
    the encoder's weight names (L2-SP)."""

    base: Callable[[nn.Module, dict[str, nn.Module]], Any]
    cls: Callable[[nn.Module, Any], torch.Tensor]
    student_inputs: Callable[[dict], Any]
    teacher_inputs: Callable[[Any, Any], Any]
    encoder_prefix: str


def mae_parts(seed: int, shift: int) -> FptParts:
    """The image variant: MAE loss; ``h`` from :func:`~stillroom.domains.vision.mae.encode_pixels_unmasked` on the
    (shifted) pixels the MAE forward reconstructs."""
    from stillroom.domains.vision.mae import ENCODER_PREFIX, MaeForward, MaeObjective, encode_pixels_unmasked

    return FptParts(
        base=lambda model, extra: MaeObjective(MaeForward(model, seed=seed, shift=shift), extra=extra),
        cls=lambda model, pixels: encode_pixels_unmasked(model, pixels).last_hidden_state[:, 0],
        student_inputs=lambda out: out["pixels"], teacher_inputs=lambda fwd, batch: fwd.inputs(batch)[0],
        encoder_prefix=ENCODER_PREFIX)


def mlm_parts(seed: int, spec: Any) -> FptParts:
    """The text variant: BERT's MLM loss; ``h`` from :func:`~stillroom.domains.text_encoder.mlm.encode_cls` on the
    unmasked token ids."""
    from stillroom.domains.text_encoder.mlm import ENCODER_PREFIX, MlmForward, MlmObjective, encode_cls

    return FptParts(
        base=lambda model, extra: MlmObjective(MlmForward(model, spec, seed), extra=extra),
        cls=lambda model, ids_mask: encode_cls(model, *ids_mask),
        student_inputs=lambda out: (out["input_ids"], out["attention_mask"]),
        teacher_inputs=lambda fwd, batch: fwd.inputs(batch), encoder_prefix=ENCODER_PREFIX)


class FptForward(nn.Module):
    """The base forward plus ``cls`` ``[B, d]``: the student's final [CLS] on the same inputs, unmasked."""

    def __init__(self, base: nn.Module, parts: FptParts):
        super().__init__()
        self.base = base
        self.model = base.model
        self.parts = parts

    def inputs(self, batch: Any) -> Any:
        return self.base.inputs(batch)

    def forward(self, batch: Any) -> dict[str, Any]:
        out = self.base(batch)
        out["cls"] = self.parts.cls(self.model, self.parts.student_inputs(out))
        return out


class Anchors(nn.Module):
    """theta_0's encoder weights as buffers (checkpointed with the objective; names with ``__`` for ``.``)."""

    def __init__(self, model: nn.Module, prefix: str):
        super().__init__()
        for k, p in model.named_parameters():
            if k.startswith(prefix):
                self.register_buffer(k.replace(".", "__"), p.detach().clone())


class FptObjective:
    """The domain's base loss + the [CLS] regression onto the teacher (``regression``) or L2-SP to theta_0
    (``l2sp``); ``parts`` of the result: the base's (``mae`` / ``mlm``) and ``cls_regression`` or ``l2sp``."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, settings: SelfDistillFptConfig, parts: FptParts):
        self.settings, self.parts, self.teacher = settings, parts, teacher
        regression = settings.regularizer == "regression"
        self.base = parts.base(model, {} if regression else {"theta0": Anchors(model, parts.encoder_prefix)})
        self.forward = FptForward(self.base.forward, parts) if regression else self.base.forward

    @property
    def state(self) -> nn.Module:
        return self.base.state

    def signal(self, batch: Any) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.parts.cls(self.teacher, self.parts.teacher_inputs(self.base.forward, batch)).float()

    def loss(self, outputs: dict, batch: Any, signal: torch.Tensor | None) -> LossResult:
        base = self.base.loss(outputs, batch, None)
        total, count, parts = base.total, base.count, dict(base.parts)
        if self.settings.regularizer == "regression":
            term, _ = cls_regression(outputs["cls"], signal)
            parts["cls_regression"] = float(term.detach())
        else:
            anchors = {k: v for k, v in self.state["theta0"].named_buffers()}
            params = {k.replace(".", "__"): p for k, p in self.base.forward.model.named_parameters()
                      if k.startswith(self.parts.encoder_prefix)}
            term = l2sp_penalty(params, anchors) * count
            parts["l2sp"] = float(term.detach())
        return LossResult(total=total + self.settings.weight * term, count=count, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.base.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return {}


def build_objective(model: nn.Module, teacher: nn.Module | None, s: SelfDistillFptConfig, *, seed: int,
                    shift: int = 0, parts: FptParts | None = None) -> FptObjective:
    """The student's objective (``teacher`` is ``None`` for ``l2sp``); ``parts``: the domain's (default: the image
    variant's, :func:`mae_parts` with ``seed`` and ``shift``)."""
    return FptObjective(model, teacher if s.regularizer == "regression" else None, s, parts or mae_parts(seed, shift))


def _build(ctx: MethodContext) -> MethodPlan:
    cfg = ctx.cfg
    s = cfg.self_distill_fpt
    if cfg.domain == "mlm":
        from stillroom.domains.text_encoder.mlm import MaskSpec

        spec = MaskSpec.of(ctx.tokenizer, ctx.model.config.vocab_size, cfg.mlm.mask_prob)
        parts, base = mlm_parts(cfg.seed, spec), "MLM"
    else:
        parts, base = mae_parts(cfg.seed, cfg.mae.shift), "MAE"
    ctx.log(f"self_distill_fpt: {base} loss + {s.weight} x " + (
        "||h_s - h_T||^2 on the unmasked [CLS]" if s.regularizer == "regression" else "||theta - theta_0||^2 (L2-SP)"))
    objective = build_objective(ctx.model, ctx.teacher_model, s, seed=cfg.seed, parts=parts)

    def players(student: Player) -> list[Player]:
        return [Player(student.name, student.model, objective)]

    return MethodPlan(players=players)


METHOD = Method("self_distill_fpt", build=_build, domains=("mae", "mlm"))
