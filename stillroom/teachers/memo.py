"""The online teacher, remembered (``teacher.memo: true``): its signal for each training sequence is computed the
first time the sequence is seen and kept in memory, so later epochs read it instead of running the teacher.

Why: with data seen more than once (a small set for several epochs, ``data.train_max``), an online KD step pays the
teacher's forward every time, while a store pays it once but needs ``stillroom cache-teacher`` first. The memo is
the store's economics inside one run: the first visit of a sequence costs a KD step (student + teacher), every
later visit costs about a CE step. The signal is the store's from the first visit on, as ``teacher.store`` says
(``signal``, ``k``, ``tail_draws``, ``draw``; rows made by :func:`~stillroom.teachers.store_sampled.row_signal`, read back by
:func:`~stillroom.teachers.store_sampled.loss_rows`, kept unquantised), so every step of the run trains on one
kind of signal and a memo run equals a run from a float32 store of the same settings.

Memory: ``W`` ids (int32) and ``W`` fp32 log-probs per position plus a 4-byte tail, ``W`` = k (+ ``tail_draws``
for ``topk_sampled``; with ``draw: allocated`` k + the sequence's widest count): 516 B per position at the
default top-64, 196 B at top-8 + 16 tail draws (:meth:`MemoTeacher.held_bytes`).
A resumed run starts with an empty memo and recomputes each sequence once (the same rows: the teacher is frozen
and the draws are seeded by the sequence's uid). Each process of a multi-process run keeps its own.
"""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch
from stillroom.teachers.signal import OnlineTeacher, TeacherSignal
from stillroom.teachers.store_reader import batch_signal
from stillroom.teachers.store_sampled import loss_rows, row_signal


class MemoTeacher:
    """:class:`OnlineTeacher` whose per-sequence signal is kept by uid: ``signal(batch)`` -> top-k
    :class:`TeacherSignal` ``[B, T, W]``; the teacher runs only on the rows not seen before (a sub-batch)."""

    def __init__(self, inner: OnlineTeacher, *, signal: str, k: int, tail_draws: int, loss_temperature: float,
                 draw: str = "multinomial", draw_seed: int = 0) -> None:
        if inner.hidden_layers or inner.attentions:
            raise ValueError("teacher.memo keeps the teacher's log-probabilities only; hidden-state and attention "
                             "loss terms need the online teacher without a memo (teacher.memo: false)")
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.signal_kind, self.k, self.tail_draws, self.draw, self.draw_seed = signal, k, tail_draws, draw, draw_seed
        self.width = k + tail_draws if signal == "topk_sampled" else k
        if self.width > inner.vocab_size:
            raise ValueError(f"teacher.memo keeps {self.width} tokens per position (teacher.store.k"
                             f"{' + tail_draws' if signal == 'topk_sampled' else ''}), more than the vocabulary "
                             f"({inner.vocab_size}); lower teacher.store.k")
        self.loss_temperature = loss_temperature
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # one per sequence the teacher ran on

    def signal(self, batch: Batch) -> TeacherSignal:
        lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
        missing = [b for b, uid in enumerate(batch.uids) if uid not in self.rows]
        if missing:
            sub = batch if len(missing) == len(batch.uids) else batch.select(missing)
            logits_btv = self.inner.signal(sub).logits_btv
            for j, b in enumerate(missing):
                ids, lp, tail, extra = row_signal(logits_btv[j, : lengths[b]], batch.uids[b], signal=self.signal_kind,
                                                  k=self.k, tail_draws=self.tail_draws, draw=self.draw,
                                                  draw_seed=self.draw_seed,
                                                  loss_temperature=self.loss_temperature)
                ids, lp, tail = loss_rows(self.signal_kind, ids, lp, tail, extra.get("tail_ids"))
                self.rows[batch.uids[b]] = (ids.to(torch.int32), lp, tail)
        rows = []
        for b, uid in enumerate(batch.uids):
            ids, lp, tail = self.rows[uid]
            if ids.shape[0] != lengths[b]:  # two sequences with one uid: the data pipeline's uids are unique
                raise ValueError(f"sequence {uid!r}: {ids.shape[0]} positions in the teacher memo but {lengths[b]} "
                                 "in this batch; the uids of the training data must be unique")
            rows.append((ids.long(), lp, tail, {}))
        return batch_signal(batch, rows, width=self.width, vocab_size=self.inner.vocab_size,
                            temperature=self.loss_temperature, hidden_layers=[], fingerprint=self.fingerprint,
                            device=self.inner.output_device)

    def held_bytes(self) -> int:
        """Bytes of the kept rows (ids, log-probs, tails)."""
        return sum(t.numel() * t.element_size() for row in self.rows.values() for t in row)
