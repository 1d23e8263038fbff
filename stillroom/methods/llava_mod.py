"""LLaVA-MoD (Shu et al., ICLR 2025; spec 14.1): an MoE student, mimic distillation, preference distillation.

The student is a sparse mixture of experts upcycled from a dense one (``llava_mod.moe``,
:mod:`stillroom.models.moe`; built before step 0 by the LM domain). Two stages, one run each:

* ``stage: mimic``: the recipe's loss terms (LLaVA-MoD's ``kd_lm``: forward KL to the teacher on the response
  tokens + CE) through the domain's usual objective, plus ``aux_coef * L_aux``, the switch-style
  load-balancing term of the forward pass's routers. ``L_aux`` is a per-step term: each micro-batch adds it
  times its target count, so the loop's division by the step's count ``N`` leaves it once per step.
* ``stage: preference``: on ``{prompt, chosen, rejected}`` pairs (chosen = the teacher's answer, rejected =
  the student's own wrong answer: from a file, ``rejected: file``, e.g. written by
  :mod:`stillroom.methods.llava_mod_pairs`; or sampled on the way, ``rejected: sampled``,
  :mod:`stillroom.methods.llava_mod_sampled`), the DPO-family loss
  ``llava_mod.loss_type`` (:mod:`stillroom.losses.preference`) of the summed response log-probs of the
  student against a frozen reference: the teacher (LLaVA-MoD) or a frozen copy of the student as the stage
  starts (the ablation); plus the router term. The pair losses are summed per micro-batch and scaled by
  ``N / P`` (``P`` pairs in the step, counted with ``N`` before the forward passes), so the loop's
  ``sum / N`` is the mean pair loss of the step; it is what the log's ``loss`` shows. The student's and the
  reference's log-probs come from full ``[B, T, V]`` logits (no fused path in this stage).

With a dense student (``moe.upcycle: false`` and no routers), the router term is left out: the same recipe
trains the dense comparison student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from stillroom.data.errors import BadRecord, DataError
from stillroom.losses import LossResult
from stillroom.losses.preference import preference_loss, sequence_logps
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts
from stillroom.methods.llava_mod_sampled import SampledPairs
from stillroom.methods.redi import PairEncoder, check_pairs
from stillroom.models.moe import RouterTap, is_moe, load_balancing_loss
from stillroom.train.loop import DistillObjective, Player

AUX, PREF = "moe_aux", "preference"


class RoutedForward(torch.nn.Module):
    """``inner(batch)`` with the routers tapped: adds ``router_logits`` (a list of ``[T, E]``, one per layer;
    empty for a dense model) and applies the capacity limit while training."""

    def __init__(self, inner: torch.nn.Module, model: torch.nn.Module, capacity_factor: float | None):
        super().__init__()
        self.inner = inner
        self.tap = RouterTap(model, capacity_factor) if is_moe(model) else None

    def forward(self, batch: Any) -> dict:
        if self.tap is None:
            return {**self.inner(batch), "router_logits": []}
        with self.tap:
            out = self.inner(batch)
        return {**out, "router_logits": self.tap.logits}


def router_term(outputs: dict, top_k: int, coef: float, targets: int) -> tuple[torch.Tensor | None, float]:
    """``(coef * L_aux * targets, L_aux * targets)`` of one micro-batch, or ``(None, 0)`` without routers."""
    logits = outputs.get("router_logits") or []
    if not logits or coef == 0:
        return None, 0.0
    aux = load_balancing_loss(logits, top_k)
    return coef * aux * targets, float(aux.detach()) * targets


@dataclass
class MimicObjective:
    """The domain's objective (``inner``: loss terms against the teacher) plus the router term."""

    inner: DistillObjective
    forward: RoutedForward
    coef: float

    @property
    def state(self) -> torch.nn.Module:
        return self.inner.state

    def signal(self, batch: Any) -> Any:
        return self.inner.signal(batch)

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        result = self.inner.loss(outputs, batch, signal)
        top_k = self.forward.tap.top_k if self.forward.tap is not None else 1
        term, logged = router_term(outputs, top_k, self.coef, batch.num_targets)
        if term is None:
            return result
        return LossResult(result.total + term, result.count, {**result.parts, AUX: logged})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.inner.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()


class PolicyLogps(torch.nn.Module):
    """The student on a batch of pair rows: ``logps`` ``[B]`` (summed response log-probs, fp32)."""

    def __init__(self, model: torch.nn.Module, vocab: int):
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, batch: Any) -> dict:
        return {"logps": batch_logps(self.model, batch, self.vocab)}


def batch_logps(model: torch.nn.Module, batch: Any, vocab: int) -> torch.Tensor:
    """``[B]`` summed log-probs of each row's targets under ``model`` (pixel_values passed when the batch has
    images)."""
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    pixels = getattr(batch, "pixel_values", None)
    if pixels is not None:
        kwargs["pixel_values"] = pixels
    logits_btv = model(**kwargs).logits[..., :vocab]
    return sequence_logps(logits_btv, batch.target_ids, batch.loss_mask)


@torch.no_grad()
def reference_logps(reference: torch.nn.Module, batch: Any, vocab: int) -> torch.Tensor:
    """``[B]`` fp32 summed log-probs of the targets under a frozen ``reference`` (in eval mode), run on its own
    device: the ``signal`` of every objective against a reference policy (LLaVA-MoD's pairs, CoPG's groups)."""
    device = next(reference.parameters()).device
    return batch_logps(reference, batch.to(device), vocab).float()


class PairStepScale:
    """``weight_targets``: records ``N / P`` for the step (``P`` pairs of all micro-batches and processes) and
    leaves the targets' weights at 1."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, micro: list, counts: StepCounts) -> list[torch.Tensor]:
        pairs = counts.all_reduce_sum(sum(check_pairs(b) for b in micro))
        self.scale = float(counts.targets) / float(pairs)
        return [b.loss_mask.to(torch.float32) for b in micro]


@dataclass
class PreferenceObjective:
    """The pair loss of the student against a frozen reference, plus the router term (module docstring)."""

    forward: RoutedForward
    state: torch.nn.Module
    reference: torch.nn.Module
    vocab: int
    loss_type: str
    beta: float
    coef: float
    step_scale: PairStepScale
    last: dict[str, float] = field(default_factory=dict)

    def signal(self, batch: Any) -> torch.Tensor:
        """``[B]`` reference log-probs (:func:`reference_logps`)."""
        return reference_logps(self.reference, batch, self.vocab)

    def loss(self, outputs: dict, batch: Any, signal: torch.Tensor) -> LossResult:
        check_pairs(batch)
        policy_b, ref_b = outputs["logps"], signal.to(outputs["logps"].device)
        pair_sum, pairs = preference_loss(self.loss_type, policy_b[0::2], policy_b[1::2], ref_b[0::2], ref_b[1::2],
                                          beta=self.beta)
        total = pair_sum * self.step_scale.scale
        parts = {PREF: float(total.detach())}
        top_k = self.forward.tap.top_k if self.forward.tap is not None else 1
        term, logged = router_term(outputs, top_k, self.coef, batch.num_targets)
        if term is not None:
            total, parts[AUX] = total + term, logged
        self._remember(policy_b.detach(), ref_b, pairs)
        return LossResult(total, pairs, parts)

    def _remember(self, policy_b: torch.Tensor, ref_b: torch.Tensor, pairs: int) -> None:
        reward_w = self.beta * (policy_b[0::2] - ref_b[0::2])
        reward_l = self.beta * (policy_b[1::2] - ref_b[1::2])
        self.last = {"llava_mod/reward_margin": float((reward_w - reward_l).mean()),
                     "llava_mod/reward_accuracy": float((reward_w > reward_l).float().mean()),
                     "llava_mod/logp_chosen": float(policy_b[0::2].mean()),
                     "llava_mod/logp_rejected": float(policy_b[1::2].mean()), "llava_mod/pairs": float(pairs)}

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


def reference_model(ctx: MethodContext) -> torch.nn.Module:
    """The frozen reference: the teacher, or a copy of the student as the stage starts."""
    lm = ctx.cfg.llava_mod
    if lm.reference == "teacher":
        if ctx.teacher_model is None:
            raise ValueError("llava_mod.reference=teacher needs the teacher in process (teacher.model)")
        ref = ctx.teacher_model
    else:
        ref = copy.deepcopy(ctx.model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def build(ctx: MethodContext) -> MethodPlan:
    """``method: llava_mod``: the stage's player (module docstring)."""
    lm = ctx.cfg.llava_mod
    moe = is_moe(ctx.model)
    ctx.log(f"llava_mod: stage {lm.stage}; student {'MoE' if moe else 'dense (no router term)'}"
            + (f", aux_coef={lm.aux_coef}, capacity_factor={lm.capacity_factor}" if moe else ""))
    if lm.stage == "mimic":
        return MethodPlan(players=lambda student: [_mimic_player(student, lm)])
    reference = reference_model(ctx)
    sampled = None
    if lm.rejected == "sampled":
        sampled = SampledPairs(ctx.model, ctx.teacher_model, ctx.tokenizer, lm, ctx.cfg.seed, ctx.tokenizer.pad_token_id)
    pairs = f"{len(ctx.data.train)} prompts, rejected answers sampled from the student" if sampled else \
        f"{len(ctx.data.train) // 2} training pairs"
    ctx.log(f"llava_mod: {lm.loss_type} pair loss, beta={lm.beta}, reference={lm.reference}; {pairs}")
    player = lambda student: [_preference_player(student, ctx, reference, sampled)]  # noqa: E731
    return MethodPlan(players=player, metrics=sampled.metrics if sampled else None)


def _mimic_player(student: Player, lm) -> Player:
    forward = RoutedForward(student.objective.forward, student.model, lm.capacity_factor)
    objective = MimicObjective(student.objective, forward, lm.aux_coef)
    return Player(student.name, student.model, objective, replace_batches=student.replace_batches,
                  weight_targets=student.weight_targets)


def _preference_player(student: Player, ctx: MethodContext, reference: torch.nn.Module,
                       sampled: SampledPairs | None) -> Player:
    lm = ctx.cfg.llava_mod
    forward = RoutedForward(PolicyLogps(student.model, ctx.vocab_size), student.model, lm.capacity_factor)
    scale = PairStepScale()
    objective = PreferenceObjective(forward, ctx.mix, reference, ctx.vocab_size, lm.loss_type, lm.beta,
                                    lm.aux_coef, scale)
    return Player(student.name, student.model, objective, replace_batches=sampled, weight_targets=scale)


class LlavaModPairs(PairEncoder):
    """REDI's ``{prompt, chosen, rejected}`` encoder, its bad-record messages naming ``llava_mod`` keys."""

    def encode(self, fields: dict, fmt, src, text, key: str):
        try:
            return super().encode(fields, fmt, src, text, key)
        except (BadRecord, DataError) as err:
            raise type(err)(str(err).replace("method=redi", "method=llava_mod stage=preference")
                            .replace("redi.rejected_field", "llava_mod.rejected_field")) from None


def _encoder(cfg):
    lm = cfg.llava_mod
    return LlavaModPairs(lm.rejected_field) if lm.stage == "preference" and lm.rejected == "file" else None


METHOD = Method("llava_mod", encoder=_encoder, build=build)
