"""The closed form of any divergence against a top-k teacher: the term's own kernel on the ``K + 1`` bins by
autograd (small), its bin gradient ``h`` spread onto the vocabulary in closed form (docs in
:mod:`stillroom.losses.closed_form`). A term carries this function as its ``on_bins`` (losses/logit.py)."""

from __future__ import annotations

import torch

from stillroom.losses.closed_form import ClosedChunk, Fallback
from stillroom.losses.sparse import teacher_bins


class _Bins:
    """What a divergence kernel reads for a top-k teacher: ``pair`` = (teacher, student) ``[n, K+1]`` bins."""

    def __init__(self, teacher, pair):
        self.teacher, self.pair = teacher, pair


def on_bins(c: ClosedChunk, coef_n: torch.Tensor, kernel, stats) -> torch.Tensor:
    """A divergence against a top-k teacher: ``kernel`` on the K + 1 bins by autograd, spread onto ``[n, V]``."""
    ids_nk, lp_nk, tail_n = c.teacher.topk
    logq, q = c.student
    ids = ids_nk.long()
    k = ids.shape[1]
    rest = c.buffer("tmp0").copy_(q).scatter_(1, ids, 0.0)
    q_tail = rest.sum(-1)  # a sum of the small entries: no 1 - sum cancellation
    if k < q.shape[1] and bool((q_tail <= 0).any()):
        raise Fallback("a student tail mass below fp32's range")
    q_ids = q.gather(1, ids)
    logq_bins = torch.cat([logq.gather(1, ids), q_tail.log().unsqueeze(1)], 1).requires_grad_(True)
    p_bins = teacher_bins(lp_nk, tail_n, q.dtype, empty_tail_n=q_tail <= 0)  # k = V: the tail bin is empty
    with torch.enable_grad():
        values = kernel(_Bins(c.teacher, (p_bins, logq_bins)), stats)
        if c.grad is None:
            return values.detach()
        (h,) = torch.autograd.grad((values * coef_n).sum(), logq_bins)
    h = h / c.T
    total_h = h.sum(-1)
    r = torch.where(q_tail > 0, h[:, k] / q_tail.clamp_min(torch.finfo(q.dtype).tiny), torch.zeros_like(total_h))
    c.add_grad(q, r - total_h)
    c.grad.scatter_add_(1, ids, h[:, :k] - q_ids * r.unsqueeze(1))
    return values.detach()
