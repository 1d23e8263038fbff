"""``dparallel``: certainty-forcing self-distillation of a masked-diffusion LM (Chen et al., ICLR 2026; spec 13).

Data: the base model's own answers to the training prompts, decoded with its slow sampler (the domain prepares
them: :mod:`stillroom.domains.masked_diffusion.selfdata`). Per example (official ``llada_train.py``):

* a block ``k`` is drawn uniformly from the answer's blocks of ``B = masked_diffusion.block_size`` tokens; blocks
  before it are clean, blocks after it fully masked (context, not supervised);
* inside block ``k`` each token is masked with probability ``mask_ratio`` (mask ``M``); the second pass masks the
  complement ``not M``, so every token of the block is supervised exactly once across the two passes;
* per pass, ``CE`` = the mean cross-entropy over its supervised (masked, in-block) positions ``P``, and ``Lcert`` =
  the mean over ``C = {i in P: argmax logits_i = y_i}`` of ``H(softmax(logits_i / T_c))`` (``0 * logits.sum()``
  when ``C`` or ``P`` is empty, so the graph keeps every parameter);
* ``L = CE(M) + CE(not M) + beta (Lcert(M) + Lcert(not M))``.

The official code trains one example per device; here a micro-batch sums the per-example losses and counts one
target per example (the loop divides by the step's example count: the same mean over examples). The draws of an
example at a step come from ``(run seed, step, example uid)`` alone, so a resumed run draws the same masks and
the CE-only baseline (``beta = 0``, the domain's ``sft``) sees the same masks as dParallel.

The official draw is ``k ~ randint(0, R // B)`` over answers right-padded with EOS, its last index the padded
tail; the answers here have no padding, so ``k`` is drawn over the ``ceil(R / B)`` blocks the answer has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.loop import Player


# ------------------------------------------------------------------ masks (deterministic per seed, step, example)
def complementary_masks(length: int, answer_start: int, block_size: int, mask_ratio: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked_m [L], masked_c [L], active [L])`` bool for one sequence of ``length`` tokens.

    ``active``: the drawn block; ``masked_m``/``masked_c``: the two passes' ``[MASK]`` positions, each the active
    block's ``M`` (resp. ``not M``) plus every later answer position."""
    blocks = math.ceil((length - answer_start) / block_size)
    k = int(torch.randint(0, blocks, (1,), generator=generator))
    start, end = answer_start + k * block_size, min(answer_start + (k + 1) * block_size, length)
    active_l = torch.zeros(length, dtype=torch.bool)
    active_l[start:end] = True
    later_l = torch.zeros(length, dtype=torch.bool)
    later_l[end:] = True
    in_m_l = torch.zeros(length, dtype=torch.bool)
    in_m_l[start:end] = torch.rand(end - start, generator=generator) < mask_ratio
    return (in_m_l | later_l), ((active_l & ~in_m_l) | later_l), active_l


@dataclass
class PairBatch:
    """Two masked views of clean sequences ``tokens [B, L]``: inputs ``noisy_m``/``noisy_c [B, L]`` and their
    supervised positions ``sup_m``/``sup_c [B, L]`` (the active block's masked tokens); one target per example."""

    tokens: torch.Tensor
    noisy_m: torch.Tensor
    noisy_c: torch.Tensor
    sup_m: torch.Tensor
    sup_c: torch.Tensor
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.tokens, self.noisy_m, self.noisy_c, self.sup_m, self.sup_c)))


def pair_batch(batch: Any, mask_id: int, block_size: int, mask_ratio: float, seed: int, step: int) -> PairBatch:
    """The two masked views of a clean ``MdBatch`` (draws from ``(seed, step, uid)`` per example)."""
    rows = [complementary_masks(batch.tokens.shape[1], batch.answer_start, block_size, mask_ratio,
                                torch.Generator().manual_seed(derive_seed(seed, "dparallel", step, uid)))
            for uid in batch.uids]
    masked_m, masked_c, active = (torch.stack(parts).to(batch.tokens.device) for parts in zip(*rows))
    return PairBatch(batch.tokens, batch.tokens.masked_fill(masked_m, mask_id),
                     batch.tokens.masked_fill(masked_c, mask_id), masked_m & active, masked_c & active)


# ------------------------------------------------------------------ the loss (pure)
def pass_terms(logits_blv: torch.Tensor, targets_bl: torch.Tensor, sup_bl: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce [B], cert [B])`` of one pass: per example the mean CE over its supervised positions and the mean
    entropy of ``softmax(logits / temperature)`` over the supervised positions predicted correctly (argmax);
    an example with none contributes ``0 * its logits``."""
    ce_bl = F.cross_entropy(logits_blv.flatten(0, 1), targets_bl.flatten(), reduction="none").view(targets_bl.shape)
    p_blv = torch.softmax(logits_blv / temperature, dim=-1)
    h_bl = -(p_blv * torch.log(p_blv + 1e-12)).sum(-1)
    correct_bl = sup_bl & (logits_blv.argmax(-1) == targets_bl)
    keep_in_graph_b = 0.0 * logits_blv.sum(dim=(1, 2))
    ce_b = (ce_bl * sup_bl).sum(1) / sup_bl.sum(1).clamp_min(1) + keep_in_graph_b
    cert_b = (h_bl * correct_bl).sum(1) / correct_bl.sum(1).clamp_min(1) + keep_in_graph_b
    return ce_b, cert_b


def certainty_forcing_loss(logits_m_blv: torch.Tensor, logits_c_blv: torch.Tensor, targets_bl: torch.Tensor,
                           sup_m_bl: torch.Tensor, sup_c_bl: torch.Tensor, *, beta: float,
                           temperature: float) -> tuple[torch.Tensor, int, dict[str, float]]:
    """``(sum over examples of L, B, parts)`` with ``L = CE(M) + CE(not M) + beta (Lcert(M) + Lcert(not M))``;
    ``parts``: the summed ``ce`` and ``cert`` (both passes) for the log."""
    ce_m, cert_m = pass_terms(logits_m_blv, targets_bl, sup_m_bl, temperature)
    ce_c, cert_c = pass_terms(logits_c_blv, targets_bl, sup_c_bl, temperature)
    ce, cert = (ce_m + ce_c).sum(), (cert_m + cert_c).sum()
    return ce + beta * cert, int(targets_bl.shape[0]), {"ce": float(ce.detach()), "cert": float(cert.detach())}


# ------------------------------------------------------------------ the objective and the plan
class PairForward(nn.Module):
    """``PairBatch -> {"logits_m", "logits_c": [B, L, V]}``: the two passes (what distributed data parallel wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        return {"logits_m": self.model(input_ids=batch.noisy_m).logits.float(),
                "logits_c": self.model(input_ids=batch.noisy_c).logits.float()}


class CertaintyForcing:
    """The loop objective of :func:`certainty_forcing_loss` (no teacher: the data are the model's own answers)."""

    def __init__(self, model: nn.Module, beta: float, temperature: float):
        self.forward, self.state = PairForward(model), nn.Module()
        self.beta, self.temperature = beta, temperature

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: PairBatch, signal: Any) -> LossResult:
        total, count, parts = certainty_forcing_loss(outputs["logits_m"], outputs["logits_c"], batch.tokens,
                                                     batch.sup_m, batch.sup_c, beta=self.beta,
                                                     temperature=self.temperature)
        return LossResult(total=total, count=count, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def certainty_player(model: nn.Module, *, mask_id: int, block_size: int, seed: int, beta: float,
                     temperature: float = 0.5, mask_ratio: float = 0.5, name: str = "student") -> Player:
    """The student's player: clean batches become :class:`PairBatch` es in ``replace_batches`` (``beta = 0``:
    the CE-only self-distillation baseline on the same masks)."""
    def paired(micro: list, step: int) -> list[PairBatch]:
        return [pair_batch(b, mask_id, block_size, mask_ratio, seed, step) for b in micro]
    return Player(name, model, CertaintyForcing(model, beta, temperature), replace_batches=paired)


def _build(ctx: MethodContext) -> MethodPlan:
    sec, md = ctx.cfg.dparallel, ctx.cfg.masked_diffusion
    player = certainty_player(ctx.model, mask_id=md.task.values + 1, block_size=md.block_size, seed=ctx.cfg.seed,
                              beta=sec.beta, temperature=sec.certainty_temperature, mask_ratio=sec.mask_ratio)
    return MethodPlan(players=lambda student: [player])


METHOD = Method("dparallel", build=_build, domains=("masked_diffusion",))
