"""``cfg_distill``: diversity-rewarded CFG distillation (Cideron et al., ICLR 2025; spec 9).

The student starts as a copy of the conditional teacher (``autoregressive.dataset: markov_modes``). Each step
draws one condition per batch row (uniform over the real conditions, the global RNG: checkpointed, so a resumed
run draws the same) and two continuations ``y1, y2`` per condition from the *student* without CFG (on-policy,
no gradient through the sampling). On those prefixes:

* the teacher's CFG distribution ``log p_cfg = log_softmax(gamma * l(c, y<t) + (1 - gamma) * l(null, y<t))``
  (two teacher passes) and the student's ``log q = log_softmax(l_theta(c, y<t))``;
* ``L_distill``: the closed-form KL per position (``forward``: ``KL(p_cfg || q)``, ``reverse``: ``KL(q ||
  p_cfg)``), summed over positions, averaged over the pair's two samples;
* with ``beta > 0`` the diversity reward ``r = 1 - cos(E(y1), E(y2))`` (``E``: L2-normalised bag-of-bigrams
  counts, frozen: :func:`~stillroom.domains.autoregressive.markov.bigram_embedding`) by REINFORCE with the
  batch-mean baseline ``b``: ``- beta * (r - b) * (log q(y1 | c) + log q(y2 | c))``.

Per pair ``L = L_distill - beta * (r - b) * (log q(y1) + log q(y2))``; the loss is ``(sum over pairs, B * L)``:
the loop divides by the batch's target count (``B`` rows of ``L`` tokens), i.e. per-token units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stillroom.methods.base import Method, MethodContext, MethodPlan

PAIR = 2
"""Continuations sampled per condition (the diversity reward compares the two)."""


# ------------------------------------------------------------------ losses (pure)
def cfg_log_probs(cond_logits_nlv: torch.Tensor, null_logits_nlv: torch.Tensor, gamma: float) -> torch.Tensor:
    """``[N, L, V]`` ``log_softmax(gamma * l(c) + (1 - gamma) * l(null))``: the CFG distribution at every position."""
    return torch.log_softmax(gamma * cond_logits_nlv + (1 - gamma) * null_logits_nlv, dim=-1)


def position_kl(student_logits_nlv: torch.Tensor, target_logp_nlv: torch.Tensor, direction: str) -> torch.Tensor:
    """``[N, L]`` closed-form KL per position: ``forward`` ``KL(p || q)``, ``reverse`` ``KL(q || p)`` (``p`` the
    detached target, ``q`` the student)."""
    logq = torch.log_softmax(student_logits_nlv.float(), dim=-1)
    logp = target_logp_nlv.detach().float()
    if direction == "forward":
        return (logp.exp() * (logp - logq)).sum(-1)
    if direction == "reverse":
        return (logq.exp() * (logq - logp)).sum(-1)
    raise ValueError(f"cfg_distill.kl_direction must be forward or reverse, got {direction!r}")


def sequence_log_prob(student_logits_nlv: torch.Tensor, tokens_nl: torch.Tensor) -> torch.Tensor:
    """``[N]`` ``log q(y | c) = sum_t log q(y_t | c, y<t)`` of the sampled tokens."""
    logq = torch.log_softmax(student_logits_nlv.float(), dim=-1)
    return logq.gather(-1, tokens_nl[..., None]).squeeze(-1).sum(-1)


def diversity_reward(tokens_nl: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[N / 2]`` ``r = 1 - cos(E(y1), E(y2))`` of consecutive rows ``(2i, 2i + 1)`` (bag-of-bigrams ``E``)."""
    from stillroom.domains.autoregressive.markov import bigram_embedding

    emb_pke = bigram_embedding(tokens_nl, vocab).reshape(-1, PAIR, vocab * vocab)
    return 1 - (emb_pke[:, 0] * emb_pke[:, 1]).sum(-1)


def cfg_distill_loss(student_logits_nlv: torch.Tensor, target_logp_nlv: torch.Tensor, tokens_nl: torch.Tensor,
                     reward_p: torch.Tensor, beta: float, direction: str) -> tuple[torch.Tensor, dict[str, float]]:
    """``(sum over pairs of L_distill - beta * (r - b) * (log q(y1) + log q(y2)), parts)`` with rows ``(2i, 2i+1)``
    a pair, ``r`` its reward ``[P]`` and ``b`` the batch mean (see the module docstring)."""
    kl_p = position_kl(student_logits_nlv, target_logp_nlv, direction).sum(-1).reshape(-1, PAIR).mean(-1)
    advantage_p = (reward_p - reward_p.mean()).detach()
    logq_p = sequence_log_prob(student_logits_nlv, tokens_nl).reshape(-1, PAIR).sum(-1)
    reinforce = -(beta * advantage_p * logq_p).sum() if beta > 0 else kl_p.new_zeros(())
    total = kl_p.sum() + reinforce
    return total, {"kl": float(kl_p.sum().detach()), "reinforce": float(reinforce.detach())}


# ------------------------------------------------------------------ the forward and the objective
class CfgDistillForward(nn.Module):
    """``batch -> {"student_logits" [2B, L, V], "target_logp" [2B, L, V], "tokens" [2B, L]}``: on-policy pairs and
    both distributions on their prefixes (the batch gives only its size ``B``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, chains: Any, gamma: float):
        super().__init__()
        self.student, self.chains, self.gamma = student, chains, gamma
        self._teacher = [teacher]  # not a submodule: frozen, neither trained nor saved with the student

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        from stillroom.domains.autoregressive.markov_eval import cfg_logits, decode
        from stillroom.domains.autoregressive.teacher import codebook_logits

        chains, device = self.chains, batch.tokens.device
        cond_n = torch.randint(chains.conditions, (batch.tokens.shape[0],), device=device).repeat_interleave(PAIR)
        was_training = self.student.training
        self.student.eval()
        tokens_nl = decode(self.student, cond_n, chains.vocab, chains.length, chains.null_index)
        self.student.train(was_training)
        with torch.no_grad():
            target = cfg_logits(self._teacher[0], tokens_nl, cond_n, chains.vocab, chains.null_index, self.gamma)
        return {"student_logits": codebook_logits(self.student, tokens_nl, chains.vocab, cond_n),
                "target_logp": torch.log_softmax(target.float(), dim=-1), "tokens": tokens_nl}


class CfgDistillObjective:
    """:func:`cfg_distill_loss` on :class:`CfgDistillForward`'s outputs, counted per batch token (``B * L``)."""

    def __init__(self, forward: CfgDistillForward, beta: float, direction: str):
        self.forward, self.beta, self.direction, self.state = forward, beta, direction, nn.Module()
        self._last: dict[str, float] = {}

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any):
        from stillroom.losses import LossResult

        tokens_nl = outputs["tokens"]
        reward_p = diversity_reward(tokens_nl, self.forward.chains.vocab)
        total, parts = cfg_distill_loss(outputs["student_logits"], outputs["target_logp"], tokens_nl, reward_p,
                                        self.beta, self.direction)
        self._last = {"reward_mean": float(reward_p.mean())}
        return LossResult(total=total, count=batch.num_targets, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return dict(self._last)


def build(ctx: MethodContext) -> MethodPlan:
    from stillroom.train.loop import Player

    if ctx.teacher_model is None:
        raise ValueError("method=cfg_distill distils the teacher's CFG distribution, but the run has no teacher")
    s = ctx.cfg.cfg_distill
    forward = CfgDistillForward(ctx.model, ctx.teacher_model, ctx.data.toy, s.gamma)
    player = Player("student", ctx.model, CfgDistillObjective(forward, s.beta, s.kl_direction))
    return MethodPlan(players=lambda student: [player], metrics=player.objective.metrics)


METHOD = Method("cfg_distill", build=build, domains=("autoregressive",))
