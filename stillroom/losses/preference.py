"""DPO-family pair losses against a frozen reference model (LLaVA-MoD's preference distillation).

Inputs are summed response log-probabilities ``log pi(y | x)`` per sequence, ``[P]`` each: the policy's
(the student, with gradient) and the reference's (the teacher, or a frozen copy of the student; no
gradient) for the chosen ``y_w`` and the rejected ``y_l`` of ``P`` pairs. With the log-ratios
``r_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r_l = log pi(y_l|x) - log pi_ref(y_l|x)``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``l = -log sigma(beta (r_w - r_l))`` per pair;
* ``kto_pair`` (the KTO-pair variant of TRL's DPO trainer, LLaVA-MoD's released default): with the
  batch estimates ``KL_w = max(0, mean_p r_w)`` and ``KL_l = max(0, mean_p r_l)``,
  ``l = ((1 - sigma(beta (r_w - KL_l))) + (1 - sigma(beta (KL_w - r_l)))) / 2`` per pair (TRL averages the
  ``2P`` halves; the KL estimates come from the pairs given in one call, i.e. one micro-batch).

Each returns ``(sum over pairs, P)`` so the training loop divides once by the step's pair count.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PreferenceLoss = Literal["sigmoid", "kto_pair"]


def _log_ratios(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
                ref_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not policy_w.shape == policy_l.shape == ref_w.shape == ref_l.shape or policy_w.dim() != 1:
        raise ValueError(f"preference losses take four [P] log-prob vectors; got shapes {tuple(policy_w.shape)}, "
                         f"{tuple(policy_l.shape)}, {tuple(ref_w.shape)}, {tuple(ref_l.shape)}")
    return policy_w.float() - ref_w.float().detach(), policy_l.float() - ref_l.float().detach()


def dpo_sigmoid(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
                beta: float = 0.1) -> tuple[torch.Tensor, int]:
    """``(sum_p -log sigma(beta (r_w - r_l)), P)``; see the module docstring."""
    r_w, r_l = _log_ratios(policy_w, policy_l, ref_w, ref_l)
    return -F.logsigmoid(beta * (r_w - r_l)).sum(), r_w.shape[0]


def kto_pair(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
             beta: float = 0.1) -> tuple[torch.Tensor, int]:
    """``(sum_p of the mean of the two KTO halves, P)``; see the module docstring."""
    r_w, r_l = _log_ratios(policy_w, policy_l, ref_w, ref_l)
    kl_w, kl_l = r_w.mean().clamp(min=0), r_l.mean().clamp(min=0)
    halves = (1 - torch.sigmoid(beta * (r_w - kl_l))) + (1 - torch.sigmoid(beta * (kl_w - r_l)))
    return (halves / 2).sum(), r_w.shape[0]


PREFERENCE_LOSSES = {"sigmoid": dpo_sigmoid, "kto_pair": kto_pair}


def preference_loss(kind: PreferenceLoss, policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor,
                    ref_l: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, int]:
    """The pair loss named ``kind`` (``sigmoid`` or ``kto_pair``) as ``(sum, count)``."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[kind](policy_w, policy_l, ref_w, ref_l, beta=beta)


def sequence_logps(logits_btv: torch.Tensor, target_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32: ``sum_t log softmax(logits)[t, target_t]`` over the positions ``mask_bt`` marks (aligned
    targets: no shift here). Log-softmax in fp32."""
    logp_btv = torch.log_softmax(logits_btv.float(), dim=-1)
    safe_bt = target_ids_bt.clamp(min=0)
    token_bt = logp_btv.gather(-1, safe_bt.unsqueeze(-1)).squeeze(-1)
    return (token_bt * mask_bt.to(token_bt.dtype)).sum(dim=1)
