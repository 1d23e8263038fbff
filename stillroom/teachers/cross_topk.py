"""Cross-tokenizer targets from a teacher that gives only its top k tokens (a store, a remote server).

The online :class:`~stillroom.teachers.cross.CrossTeacher` reduces the teacher's whole ``[V_t]``
distribution at each aligned position. A store or an OpenAI-compatible server keeps only the ``k``
most likely teacher tokens and their log-probabilities (temperature 1) at each *teacher* position;
:func:`cross_from_topk` turns those into the same :class:`~stillroom.teachers.signal.CrossTargets`
at the student's positions, so every loss term works unchanged.

What top-k cannot know is how the mass outside the k tokens (the tail, ``1 - sum p_k``) splits between
tokens the student has (matched) and tokens it has not. The rule here: the tail splits as the top-k mass
does (share ``r`` of it matched), and the matched part is spread evenly over the matched tokens outside
the top k. So

* matched logits ``[M]``: ``log p`` at matched top-k tokens (summed when several teacher tokens count for
  one student token), ``log(r * tail / n_rest)`` at the other ``n_rest`` matched tokens (``-inf`` when
  nothing is left: those tokens are then left out of both distributions, as in the dense path). Under a
  many-to-one map (``teacher.cross.vocab_map: min_edit_distance``) ``n_rest`` counts the mapped *teacher*
  tokens outside the top k, and each column adds ``r * tail / n_rest`` per such token it holds (one-to-one:
  the same rule). The loss tempers a summed column as ``(sum p)^(1/T)``, where the online teacher gives
  ``sum p^(1/T)``: the two agree at ``loss_temperature: 1``;
* ranked probabilities for ``uld``: the largest of the k probabilities on the support, sorted, and the tail
  bin: the rest of the support's mass (``all``: ``1 - sum``, exact; ``unmatched``: the unmatched top-k
  beyond the ranks plus ``(1 - r) * tail``).

With ``k = V_t`` nothing is estimated and the targets equal the online teacher's (test). Log-probs are at
temperature 1: the loss tempers the matched logits as it does raw logits; ranked probabilities stay at 1
(``uld`` with such a teacher needs ``loss.loss_temperature: 1``, checked in the config).
"""

from __future__ import annotations

import torch

from stillroom.teachers.cross_align import CrossVocab, RowAlignment
from stillroom.teachers.signal import CrossTargets

TopkRows = tuple[torch.Tensor, torch.Tensor]
"""One sequence's teacher top-k: ids ``[m, k]`` (int) and log-probs ``[m, k]`` at temperature 1, row ``j`` the
distribution over the token after teacher position ``j`` (``m`` may be shorter than the teacher ids)."""


def cross_from_topk(vocab: CrossVocab, rows: list[RowAlignment], topk: list[TopkRows], *, width: int,
                    supports: set[str], rank_k: int | None = None,
                    output_device: torch.device | str = "cpu") -> CrossTargets:
    """:class:`CrossTargets` ``[B, width, ...]`` from each row's alignment and its teacher top-k.

    ``rows[b]``: :meth:`CrossVocab.align` of batch row ``b``; ``topk[b]``: that row's teacher top-k at teacher
    positions (:data:`TopkRows`). Aligned pairs whose teacher position has no top-k row are dropped.
    ``supports``/``rank_k``: as :class:`~stillroom.teachers.cross.CrossTeacher`'s.
    """
    bsz = len(rows)
    b_idx, s_idx, ids, lps = [], [], [], []
    for b, (row, (tid, tlp)) in enumerate(zip(rows, topk)):
        keep = [(i, j) for i, j in zip(row.student_pos, row.teacher_pos) if j < tid.shape[0]]
        if not keep:
            continue
        t_pos = torch.tensor([j for _, j in keep], dtype=torch.long)
        b_idx += [b] * len(keep)
        s_idx += [i for i, _ in keep]
        ids.append(tid.long()[t_pos])
        lps.append(tlp.double()[t_pos])
    m = vocab.matched_student.numel()
    k = topk[0][0].shape[-1] if topk else 0
    out = torch.device(output_device)
    ids_nk = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.long)
    lp_nk = torch.cat(lps) if lps else torch.zeros(0, k, dtype=torch.float64)
    matched, ranked = _reduce(vocab, ids_nk, lp_nk, m, supports, rank_k)
    flat = torch.tensor(b_idx, dtype=torch.long) * width + torch.tensor(s_idx, dtype=torch.long)
    aligned = torch.zeros(bsz * width, dtype=torch.bool)
    aligned[flat] = True

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros((bsz * width, *values.shape[1:]))
        full[flat] = values
        return full.reshape(bsz, width, *values.shape[1:]).to(out)

    return CrossTargets(aligned_bt=aligned.reshape(bsz, width).to(out), matched_student=vocab.matched_student.to(out),
                        matched_logits_btm=scatter(matched),
                        ranked={s: (scatter(p), scatter(t)) for s, (p, t) in ranked.items()}, temperature=1.0)


def _reduce(vocab: CrossVocab, ids_nk: torch.Tensor, lp_nk: torch.Tensor, m: int, supports: set[str],
            rank_k: int | None) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Matched logits ``[N, M]`` (fp32) and ranked (``[N, K]``, ``[N]``) per support, from ``[N, k]`` top-k rows."""
    n, k = ids_nk.shape
    p = lp_nk.exp()  # [N, k] float64
    col = vocab.teacher_to_matched[ids_nk.clamp(0, vocab.teacher_vocab - 1)]
    col = torch.where((ids_nk >= 0) & (ids_nk < vocab.teacher_vocab), col, torch.full_like(col, -1))
    is_matched = col >= 0
    p_matched = torch.where(is_matched, p, torch.zeros_like(p))
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)  # [N]
    top_mass = p.sum(-1)
    share = torch.where(top_mass > 0, p_matched.sum(-1) / top_mass.clamp_min(1e-300), torch.ones_like(top_mass))
    probs = torch.zeros(n, m, dtype=torch.float64)
    probs.scatter_add_(1, col.clamp_min(0), p_matched)
    # the matched share of the tail, spread evenly over the mapped teacher tokens outside the top k, summed per
    # column (one-to-one: the columns no top-k token covers, an equal part each)
    in_top = torch.zeros(n, m, dtype=torch.long).scatter_add_(1, col.clamp_min(0), is_matched.long())
    rest_nm = (vocab.column_size.unsqueeze(0) - in_top).clamp_min(0)  # [N, M] tail tokens per column
    n_rest = rest_nm.sum(-1)
    fill = torch.where(n_rest > 0, share * tail / n_rest.clamp_min(1), torch.zeros_like(tail))  # [N] per token
    probs = probs + rest_nm.double() * fill.unsqueeze(-1)
    matched = probs.log().float()  # 0 -> -inf: left out of both distributions
    ranked = {}
    for support in supports:
        on = p if support == "all" else torch.where(is_matched, torch.zeros_like(p), p)
        width = min(k, rank_k or k, _support_size(vocab, support))
        top = torch.sort(on, dim=-1, descending=True).values[:, :width]
        rest = on.sum(-1) - top.sum(-1) + (tail if support == "all" else (1.0 - share) * tail)
        ranked[support] = (top.float(), rest.clamp_min(0.0).float())
    return matched, ranked


def _support_size(vocab: CrossVocab, support: str) -> int:
    """The most ranks a support can have on both sides (as :class:`~stillroom.teachers.cross.CrossTeacher`)."""
    m = vocab.matched_student.numel()
    if support == "all":
        return min(vocab.student_vocab, vocab.teacher_vocab)
    return min(vocab.student_vocab - m, vocab.teacher_vocab - vocab.mapped_teacher.numel())
