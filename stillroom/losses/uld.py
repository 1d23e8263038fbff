"""Universal Logit Distillation: comparing two distributions over different vocabularies by rank.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation") replaces the KL, which
needs one vocabulary, by the Wasserstein-1 distance between the two distributions with a
uniform transport cost, whose closed form is the L1 distance between the probabilities
sorted in descending order (the shorter vector padded with zeros):

    ULD(p, q) = sum_k | p_(k) - q_(k) |

``support="all"`` compares whole distributions (the ULD paper). ``support="unmatched"``
compares only the tokens without a counterpart in the other vocabulary (GOLD's hybrid,
TRL's ``GOLDTrainer``: matched tokens are compared directly by a divergence term, the rest
by rank); neither side is renormalised there, as in GOLD.

The teacher side arrives already ranked (:class:`~stillroom.teachers.signal.CrossTargets`):
its ``K`` largest probabilities and the mass beyond them. With ``K = min(V_s, V_t)`` over the
support this is exact, because the padded zeros of the shorter side meet only the other
side's tail: ``ULD = sum_{k<K} |p_(k) - q_(k)| + |tail_p - tail_q|`` (one tail is 0). A
smaller ``K`` (``teacher.cross.rank_k``) makes the last bin a lower bound of the true tail term.
"""

from __future__ import annotations

import torch

from stillroom.losses.logit import define
from stillroom.losses.registry import TermSpec, one_of

SUPPORTS = ("all", "unmatched")


def uld_rows(teacher_ranked_nk: torch.Tensor, teacher_tail_n: torch.Tensor, student_probs_nv: torch.Tensor) -> torch.Tensor:
    """``[N]`` sorted-L1 distance between the teacher's ranked probabilities ``[N, K]`` (+ tail ``[N]``) and the
    student's probabilities ``[N, V]`` (zeros outside the support), ranked here (``topk`` keeps the gradient)."""
    k = teacher_ranked_nk.shape[-1]
    if k > student_probs_nv.shape[-1]:
        raise ValueError(f"uld: the teacher ranks {k} probabilities but the student has only "
                         f"{student_probs_nv.shape[-1]} tokens; rank at most min(V_s, V_t)")
    ranked = torch.topk(student_probs_nv, k, dim=-1).values
    tail = (student_probs_nv.sum(-1) - ranked.sum(-1)).clamp_min(0.0)
    p = teacher_ranked_nk.to(ranked.dtype)
    return (ranked - p).abs().sum(-1) + (tail - teacher_tail_n.to(ranked.dtype)).abs()


def _uld(ctx, _stats, *, support):
    cross = ctx.teacher.cross
    if cross is None:
        raise ValueError("loss term 'uld' compares a teacher with another tokenizer (teacher.tokenizer_mode: cross); "
                         "with a shared tokenizer use a divergence such as forward_kl")
    if support not in cross.ranked:
        raise ValueError(f"loss term 'uld' with support={support!r}: the teacher ranked only {sorted(cross.ranked)}")
    ranked, tail = cross.ranked[support]
    probs = ctx.s_logp.exp()
    if support == "unmatched":
        probs = probs.index_fill(1, cross.matched_student, 0.0)
    return uld_rows(ranked, tail, probs)


uld = define(TermSpec(
    "uld", "logit", _uld, {"support": "all"}, one_of("support", SUPPORTS), vocab_free=True,
    doc="""ULD (Boizard et al. 2024): sum_k |p_(k) - q_(k)|, the teacher's and student's probabilities sorted.

    Needs a cross-tokenizer teacher (``teacher.tokenizer_mode: cross``). ``support``: ``all`` (every
    token, the ULD paper) or ``unmatched`` (only tokens without a same-spelling counterpart, GOLD's
    hybrid beside a divergence term on the matched tokens). Counts the aligned positions only.
    """))
