"""Top-k teacher signals: the K + 1 bin estimator.

A top-k teacher gives, per position, the log-probabilities of its k most likely
tokens and the log of the remaining ("tail") mass, but not how the tail is
spread. Divergences against such a teacher are computed on K + 1 bins:

* bins 0..K-1: the teacher's k tokens; student log-prob ``log q(id_k)``;
* bin K, the tail: teacher ``tail_logmass``, student ``log(sum of q over every
  token not in the top k)``, computed as a logsumexp over those tokens (exact,
  no ``log(1 - sum)`` cancellation, exactly ``-inf`` when k = V).

When the student has no entry outside the k ids (k = V), the tail bin is empty
and the teacher's stored tail (rounding noise of order 1e-7) is treated as 0.

Coarsening both distributions onto the same partition can only lose
information, so by the data-processing inequality every f-divergence on the
bins (KL both ways, JSD, TVD, skew KL) lies in ``[0, dense value]``, with
equality when k = V. It is a lower bound, not an unbiased estimate: the tail
bin stops pushing once the student's tail mass matches the teacher's.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def student_bins(s_logp_nv: torch.Tensor, ids_nk: torch.Tensor, *, all_finite: bool = False) -> torch.Tensor:
    """``[N, K+1]`` student log-probs on the teacher's bins (k ids, then the tail).

    ``s_logp_nv``: ``[N, V]`` normalised student log-probabilities. ``all_finite``: the caller knows every entry
    is finite (no padded vocabulary or banned token): with K < V every row then keeps a token outside the k ids,
    and the tail is one logsumexp over one ``[N, V]`` copy, without the checks for rows with nothing left.
    """
    ids = ids_nk.long()
    logq_k = s_logp_nv.gather(-1, ids)
    rest = s_logp_nv.scatter(-1, ids, NEG_INF)  # the student outside the k ids
    if all_finite and ids.shape[-1] < s_logp_nv.shape[-1]:
        tail = torch.logsumexp(rest, dim=-1)
    else:
        has_rest = torch.isfinite(rest).any(-1)
        # Rows with nothing left would give logsumexp(-inf...) whose gradient is NaN: feed zeros there
        # and select -inf afterwards (the discarded branch then has a finite, zeroed gradient).
        rest = rest.masked_fill(~has_rest.unsqueeze(-1), 0.0)
        tail = torch.where(has_rest, torch.logsumexp(rest, dim=-1), torch.full_like(logq_k[:, 0], NEG_INF))
    return torch.cat([logq_k, tail.unsqueeze(-1)], dim=-1)


def teacher_bins(topk_logprobs_nk: torch.Tensor, tail_logmass_n: torch.Tensor, dtype: torch.dtype,
                 empty_tail_n: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, K+1]`` teacher log-probs: the stored top-k log-probs, then the tail log-mass.

    ``empty_tail_n`` ``[N]`` bool: rows where the student has nothing outside the k ids (the k ids cover every
    finite entry). Their tail bin is empty by construction; a stored teacher tail there is rounding noise
    (log(1 - sum) of ~1e-7) and would make KL(p||q) infinite, so it is set to -inf (probability 0)."""
    tail = tail_logmass_n.to(dtype)
    if empty_tail_n is not None:
        tail = tail.masked_fill(empty_tail_n, NEG_INF)
    return torch.cat([topk_logprobs_nk.to(dtype), tail.unsqueeze(-1)], dim=-1)
