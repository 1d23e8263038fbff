"""An in-process teacher with another tokenizer than the student's (``teacher.tokenizer_mode: cross``).

For each student batch the teacher reads the same text in its own tokens
(:meth:`~stillroom.teachers.cross_align.CrossVocab.align`), runs its decoder body once, and
projects only the hidden states of the *aligned* positions through its output head, a
chunk of rows at a time. Each chunk's ``[n, V_t]`` logits are reduced at once to what the
loss compares (:class:`~stillroom.teachers.signal.CrossTargets`): the logits of the matched
tokens ``[n, M]`` and, for ``uld`` terms, the ``K`` largest probabilities with the tail mass.
So a 256k-vocabulary teacher never holds more than ``rows_per_chunk x V_t`` logits.
"""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch
from stillroom.models import decoder_body, output_head
from stillroom.teachers.cross_align import CrossVocab, RowAlignment
from stillroom.teachers.signal import CrossTargets, Fingerprint, TeacherSignal


class CrossTeacher:
    """``signal(batch) -> TeacherSignal`` with :class:`CrossTargets` in the student's positions.

    ``supports``: the ``uld`` supports the loss uses (``all``, ``unmatched``); ``rank_k``: at most this many
    ranked probabilities per row (None: ``min(V_s, V_t)`` over the support, exact); ``chunk_rows``:
    aligned rows projected through the head at a time.
    """

    def __init__(self, model: torch.nn.Module, vocab: CrossVocab, *, temperature: float, supports: set[str],
                 rank_k: int | None = None, chunk_rows: int = 256, fingerprint: Fingerprint | None = None,
                 output_device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab = vocab
        self.temperature = temperature
        self.supports = set(supports)
        self.chunk_rows = chunk_rows
        self.fingerprint = fingerprint
        self.output_device = torch.device(output_device)
        self.device = next(model.parameters()).device
        self.body = decoder_body(model)
        self.head = output_head(model)
        self.matched_teacher = vocab.matched_teacher.to(self.device) if vocab.one_to_one else None
        self.columns = vocab.teacher_to_matched.to(self.device)  # [V_t]
        self.mapped_teacher = vocab.mapped_teacher.to(self.device)  # [M_t]
        self.matched_student = vocab.matched_student.to(self.output_device)
        m = vocab.matched_student.numel()
        self.rank_k = {
            "all": min(vocab.student_vocab, vocab.teacher_vocab),
            "unmatched": min(vocab.student_vocab - m, vocab.teacher_vocab - self.mapped_teacher.numel()),
        }
        if rank_k is not None:
            self.rank_k = {s: min(k, rank_k) for s, k in self.rank_k.items()}

    def alignments(self, batch: Batch) -> list[RowAlignment]:
        return self.vocab.align_batch(batch)

    @torch.no_grad()
    def signal(self, batch: Batch) -> TeacherSignal:
        rows = self.alignments(batch)
        ids, mask = self._teacher_batch(rows)
        hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, Tt, H]
        b_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r.teacher_pos], dtype=torch.long)
        s_idx = torch.tensor([i for r in rows for i in r.student_pos], dtype=torch.long)
        t_idx = torch.tensor([j for r in rows for j in r.teacher_pos], dtype=torch.long)
        picked = hidden[b_idx.to(hidden.device), t_idx.to(hidden.device)]  # [N, H]
        matched, ranked = self._reduce(picked)
        bsz, width = batch.input_ids.shape
        out = self.output_device
        flat = b_idx * width + s_idx
        aligned = torch.zeros(bsz * width, dtype=torch.bool)
        aligned[flat] = True
        flat = flat.to(out)
        cross = CrossTargets(
            aligned_bt=aligned.reshape(bsz, width).to(out),
            matched_student=self.matched_student,
            matched_logits_btm=_scatter(matched, flat, bsz, width),
            ranked={s: (_scatter(p, flat, bsz, width), _scatter(t, flat, bsz, width)) for s, (p, t) in ranked.items()},
            temperature=self.temperature,
        )
        return TeacherSignal(cross=cross, fingerprint=self.fingerprint)

    def _teacher_batch(self, rows: list[RowAlignment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded teacher ids and attention mask ``[B, T_t]`` on the teacher's device."""
        pad = self.vocab.t.fill_id
        width = max(1, max(len(r.teacher_ids) for r in rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.teacher_ids)] = torch.tensor(r.teacher_ids, dtype=torch.long)
            mask[b, : len(r.teacher_ids)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _reduce(self, hidden_nh: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Matched logits ``[N, M]`` and ranked probabilities per support, ``chunk_rows`` rows at a time."""
        matched, ranked = [], {s: ([], []) for s in self.supports}
        for lo in range(0, hidden_nh.shape[0], self.chunk_rows):
            logits = self.head(hidden_nh[lo: lo + self.chunk_rows])[:, : self.vocab.teacher_vocab].float()  # [n, V_t]
            matched.append(self._matched(logits).to(self.output_device))
            if self.supports:
                probs = torch.softmax(logits / self.temperature, dim=-1)
                for support in self.supports:
                    p = probs.index_fill(1, self.mapped_teacher, 0.0) if support == "unmatched" else probs
                    top = torch.topk(p, self.rank_k[support], dim=-1).values
                    tail = (p.sum(-1) - top.sum(-1)).clamp_min(0.0)
                    ranked[support][0].append(top.to(self.output_device))
                    ranked[support][1].append(tail.to(self.output_device))
        m = self.matched_student.numel()
        cat = (lambda xs, *shape: torch.cat(xs) if xs else torch.zeros(0, *shape, device=self.output_device))
        return cat(matched, m), {s: (cat(p, self.rank_k[s]), cat(t)) for s, (p, t) in ranked.items()}

    def _matched(self, logits_nv: torch.Tensor) -> torch.Tensor:
        """``[n, M]`` matched logits. One-to-one (exact map): a gather. Many-to-one (min_edit_distance): per
        column ``T * logsumexp(z_j / T)`` over its teacher tokens ``j``, so that the loss's
        ``softmax(matched / T)`` is exactly the teacher's tempered distribution summed per column (renormalised
        over the columns). Per-column maxima keep it exact where a column's logits are far below the row's."""
        if self.matched_teacher is not None:
            return logits_nv[:, self.matched_teacher]
        n, m, t = logits_nv.shape[0], self.matched_student.numel(), self.temperature
        z = logits_nv[:, self.mapped_teacher] / t  # [n, M_t]
        col = self.columns[self.mapped_teacher].unsqueeze(0).expand(n, -1)  # [n, M_t]
        top = z.new_full((n, m), float("-inf")).scatter_reduce(1, col, z, "amax", include_self=True)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        mass = z.new_zeros((n, m)).scatter_add_(1, col, (z - safe.gather(1, col)).exp())
        return (mass.log() + safe) * t


def _scatter(values_n: torch.Tensor, flat_n: torch.Tensor, bsz: int, width: int) -> torch.Tensor:
    """``[B, T, ...]`` zeros with ``values_n`` ``[N, ...]`` at the flat positions ``flat_n`` ``[N]``."""
    out = values_n.new_zeros((bsz * width, *values_n.shape[1:]))
    out[flat_n] = values_n
    return out.reshape(bsz, width, *values_n.shape[1:])
