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

:func:`copg_group` / :func:`copg_pair` (CoPG, method ``copg``) take scalar rewards instead of a
chosen/rejected label: the squared difference of the regularised rewards ``R - beta log(pi / pi_ref)``.
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


def copg_group(logp_gk: torch.Tensor, ref_logp_gk: torch.Tensor, reward_gk: torch.Tensor, *,
               beta: float) -> tuple[torch.Tensor, int]:
    """CoPG (Flet-Berliac et al. 2024) over ``G`` groups of ``k >= 2`` completions of one prompt each.

    ``logp_gk``: the policy's summed response log-probs ``[G, k]`` (with gradient); ``ref_logp_gk``: the
    frozen reference's (no gradient); ``reward_gk``: scalar rewards. With the regularised reward
    ``a_i = R_i - beta (logp_i - ref_logp_i)``, one group's loss is
    ``(1 / (k - 1)) sum_{i>j} (a_i - a_j)^2 / (2 beta)``, computed as
    ``k / (k - 1) * sum_i (a_i - mean a)^2 / (2 beta)``
    (the same sum: ``sum_{i>j} (a_i - a_j)^2 = k sum_i (a_i - mean a)^2``). For a pair the gradient is
    ``-(a_y - a_y') (grad logp(y) - grad logp(y'))``: a policy gradient whose baseline is the other sample.
    Returns ``(sum over groups, G)`` (fp32).
    """
    if logp_gk.dim() != 2 or logp_gk.shape[1] < 2 or not logp_gk.shape == ref_logp_gk.shape == reward_gk.shape:
        raise ValueError(f"copg takes three [G, k >= 2] tensors (policy log-probs, reference log-probs, rewards); "
                         f"got shapes {tuple(logp_gk.shape)}, {tuple(ref_logp_gk.shape)}, {tuple(reward_gk.shape)}")
    if beta <= 0:
        raise ValueError(f"copg needs beta > 0 (got {beta})")
    k = logp_gk.shape[1]
    regularised_gk = reward_gk.float() - beta * (logp_gk.float() - ref_logp_gk.float().detach())
    centred_gk = regularised_gk - regularised_gk.mean(dim=1, keepdim=True)
    per_group_g = centred_gk.pow(2).sum(dim=1) * (k / (k - 1)) / (2 * beta)
    return per_group_g.sum(), logp_gk.shape[0]


def copg_pair(logp_y: torch.Tensor, logp_y2: torch.Tensor, ref_logp_y: torch.Tensor, ref_logp_y2: torch.Tensor,
              reward_y: torch.Tensor, reward_y2: torch.Tensor, beta: float) -> tuple[torch.Tensor, int]:
    """CoPG on ``P`` pairs ``(y, y')``, each argument ``[P]``: ``(sum_p (a_y - a_y')^2 / (2 beta), P)`` with
    ``a = R - beta (logp - ref_logp)`` (:func:`copg_group` with ``k = 2``)."""
    shapes = {tuple(t.shape) for t in (logp_y, logp_y2, ref_logp_y, ref_logp_y2, reward_y, reward_y2)}
    if len(shapes) != 1 or logp_y.dim() != 1:
        raise ValueError(f"copg_pair takes six [P] tensors; got shapes {sorted(shapes)}")
    return copg_group(torch.stack([logp_y, logp_y2], dim=1), torch.stack([ref_logp_y, ref_logp_y2], dim=1),
                      torch.stack([reward_y, reward_y2], dim=1), beta=beta)


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
