"""Semi-autoregressive decoding of a masked-diffusion LM: blocks left to right, positions of a block in any order.

The answer starts fully masked. Blocks of ``block_size`` answer positions are decoded in order; while the current
block has masked positions, one forward pass of the whole sequence (one *step*) predicts every position, and a rule
picks which masked positions of the block take their prediction (greedy: the argmax, ``[MASK]`` itself excluded):

* the slow sampler (:func:`slow_rule`): the ``k`` masked positions of lowest predictive entropy (``k`` tokens per
  step; ``R / k`` steps for an answer of ``R`` tokens when ``k`` divides the block);
* the entropy-threshold decoder (:func:`threshold_rule`, dParallel's): every masked position of the block whose
  entropy is below the threshold, and at least the lowest-entropy one. At threshold 0 it is the slow sampler with
  ``k = 1``.

Entropy is that of the softmax in float64, ``-sum p log(p + 1e-12)`` (the official ``generate.py``), over the
vocabulary without ``[MASK]`` (never a target, so it carries no mass once trained; excluded so it is never chosen). Steps are counted per example (the forward passes in which it still had masked positions in the
current block), as the official decoder counts NFE at batch size 1; rows that are done are not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from stillroom.domains.masked_diffusion.task import MdTask
from stillroom.models.masked_diffusion import special_ids, token_logits

Rule = Callable[[torch.Tensor], torch.Tensor]
"""``entropy [B, b]`` (``inf`` where not masked) -> ``[B, b]`` bool: the positions to unmask this step."""


@dataclass
class Decoded:
    """``answers [N, R]`` and ``steps [N]`` (forward passes per example)."""

    answers: torch.Tensor
    steps: torch.Tensor

    def tokens_per_step(self) -> float:
        """Answer tokens per forward pass: ``R / mean steps``."""
        return float(self.answers.shape[1] / self.steps.double().mean())


def entropy(logits_bnv: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` float64 entropy (nats) of ``softmax(logits [B, n, V])`` (``-inf`` logits carry no mass)."""
    p = torch.softmax(logits_bnv.double(), dim=-1)
    return -(p * torch.log(p + 1e-12)).sum(-1)


def slow_rule(k: int) -> Rule:
    """The ``k`` lowest-entropy masked positions (all of them when fewer are masked)."""
    def rule(entropy_bn: torch.Tensor) -> torch.Tensor:
        take = min(k, entropy_bn.shape[1])
        idx_bk = torch.topk(entropy_bn, take, dim=1, largest=False).indices
        chosen_bn = torch.zeros_like(entropy_bn, dtype=torch.bool).scatter_(1, idx_bk, True)
        return chosen_bn & torch.isfinite(entropy_bn)
    return rule


def threshold_rule(threshold: float) -> Rule:
    """Every masked position with entropy strictly below ``threshold``, and the lowest-entropy one."""
    def rule(entropy_bn: torch.Tensor) -> torch.Tensor:
        lowest_bn = torch.zeros_like(entropy_bn, dtype=torch.bool)
        lowest_bn[torch.arange(len(entropy_bn)), entropy_bn.argmin(dim=1)] = True
        return ((entropy_bn < threshold) | lowest_bn) & torch.isfinite(entropy_bn)
    return rule


@torch.no_grad()
def decode(model: nn.Module, task: MdTask, prompts_nr: torch.Tensor, block_size: int, rule: Rule, *,
           batch_size: int = 256, device: torch.device | str = "cpu") -> Decoded:
    """Answers to ``prompts [N, R]`` decoded block by block with ``rule`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    parts = [_decode_batch(model, task, prompts_nr[i:i + batch_size].to(device), block_size, rule)
             for i in range(0, len(prompts_nr), batch_size)]
    model.train(was_training)
    return Decoded(torch.cat([a for a, _ in parts]).cpu(), torch.cat([s for _, s in parts]).cpu())


def _decode_batch(model: nn.Module, task: MdTask, prompts_br: torch.Tensor, block_size: int,
                  rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    mask_id = special_ids(task.values)[1]
    answers_br = torch.full_like(prompts_br, mask_id)
    x_bl = task.sequences(prompts_br.cpu(), answers_br.cpu()).to(prompts_br.device)
    steps_b = torch.zeros(len(prompts_br), dtype=torch.long, device=prompts_br.device)
    for start in range(task.answer_start, task.positions, block_size):
        end = min(start + block_size, task.positions)
        while True:
            masked_bn = x_bl[:, start:end] == mask_id
            active_b = masked_bn.any(dim=1)
            if not active_b.any():
                break
            logits_anv = token_logits(model, x_bl[active_b])[:, start:end]
            logits_anv[..., mask_id] = float("-inf")
            ent_an = entropy(logits_anv).masked_fill(~masked_bn[active_b], float("inf"))
            chosen_an = rule(ent_an)
            block_an = x_bl[active_b, start:end]
            x_bl[active_b, start:end] = torch.where(chosen_an, logits_anv.argmax(-1), block_an)
            steps_b += active_b.long()
    return x_bl[:, task.answer_start:], steps_b

