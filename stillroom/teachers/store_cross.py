"""A teacher store for a student with its own tokenizer (``teacher.source: store`` with ``tokenizer_mode: cross``).

Writing (``stillroom cache-teacher``): each training sequence of the student is spelled into text and read by
the teacher in its own tokens (:func:`cross_store_examples`: same uid, the teacher's ids); the store holds the
teacher's top k at every one of *its* positions, at temperature 1, ids of the teacher's vocabulary. The manifest
records ``tokenizer_mode: cross``, the teacher's tokenizer hash and vocabulary size, and the student tokenizer's
hash (:func:`cross_store_fields`); its ``data_fingerprint`` covers the teacher's ids, so it also pins the text.

Reading (:class:`CrossStoreTeacher`): per student batch the alignment is recomputed from the student ids
(:meth:`~stillroom.teachers.cross_align.CrossVocab.align_batch`, cheaper than storing it), each row's teacher
top-k is read by uid, and :func:`~stillroom.teachers.cross_topk.cross_from_topk` turns it into the same
:class:`~stillroom.teachers.signal.CrossTargets` as the online :class:`~stillroom.teachers.cross.CrossTeacher`
(equal when k is the teacher's vocabulary). Top-k log-probs cannot be re-tempered, so the store is always at
temperature 1: the loss tempers the matched logits itself, and ``uld`` needs ``loss.loss_temperature: 1``
(checked when the recipe loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from stillroom.data.batch import Batch, Example
from stillroom.teachers.cross_align import CrossVocab
from stillroom.teachers.cross_topk import cross_from_topk
from stillroom.teachers.signal import Fingerprint, TeacherSignal
from stillroom.teachers.store_format import REBUILD, StoreMismatch
from stillroom.teachers.store_reader import StoreReader

STORE_TEMPERATURE = 1.0
"""The temperature of a cross store's log-probs (the matched logits are tempered by the loss)."""


def cross_store_examples(vocab: CrossVocab, examples: list[Example]) -> list[Example]:
    """The student's ``examples`` in the teacher's tokens (same uids and order): what a cross store covers."""
    from stillroom.domains.lm.cross import teacher_examples

    return teacher_examples(vocab, examples)


def cross_store_fields(vocab: CrossVocab, student: Fingerprint) -> dict:
    """The manifest fields that make a store a cross store of this pair of tokenizers: ``tokenizer_mode``,
    ``tokenizer_hash`` and ``vocab_size`` (the teacher's: the stored ids are its), ``student_tokenizer_hash``.
    ``student``: the run's fingerprint (its tokenizer hash is the student's in a cross run)."""
    from stillroom.models import tokenizer_hash

    return {"tokenizer_mode": "cross", "tokenizer_hash": tokenizer_hash(vocab.teacher_tok),
            "vocab_size": int(vocab.teacher_vocab), "student_tokenizer_hash": student.tokenizer_hash}


class CrossStoreTeacher:
    """``signal(batch) -> TeacherSignal(cross=CrossTargets)`` read from a cross store.

    ``supports``/``rank_k``: the ``uld`` supports and rank cap, as :class:`~stillroom.teachers.cross.CrossTeacher`.
    Raises :class:`StoreMismatch` when a row's stored positions are not its teacher tokens (a store of other
    data; the manifest check before step 0 normally catches that first).
    """

    def __init__(self, reader: StoreReader, vocab: CrossVocab, *, supports: set[str], rank_k: int | None = None,
                 fingerprint: Fingerprint | None = None, output_device: torch.device | str = "cpu") -> None:
        self.reader = reader
        self.vocab = vocab
        self.supports = set(supports)
        self.rank_k = rank_k
        self.fingerprint = fingerprint
        self.output_device = torch.device(output_device)

    def signal(self, batch: Batch) -> TeacherSignal:
        rows = self.vocab.align_batch(batch)
        topk = []
        for row, uid in zip(rows, batch.uids):
            ids_mk, lp_mk, _tail, _hidden = self.reader.sequence(uid)  # [m, k] at the teacher's positions
            if ids_mk.shape[0] != len(row.teacher_ids):
                raise StoreMismatch(
                    f"sequence {uid!r}: {ids_mk.shape[0]} positions in the teacher store {self.reader.folder} but "
                    f"{len(row.teacher_ids)} teacher tokens in the batch's text; the store covers other data: "
                    f"{REBUILD}", fix="overwrite")
            topk.append((ids_mk[:-1], lp_mk[:-1]))  # the last position predicts past the text
        cross = cross_from_topk(self.vocab, rows, topk, width=batch.input_ids.shape[1], supports=self.supports,
                                rank_k=self.rank_k, output_device=self.output_device)
        return TeacherSignal(cross=cross, fingerprint=self.fingerprint)


def cross_store_teacher(cfg, folder: Path, vocab: CrossVocab, output_device, supports: set[str], *,
                        fingerprint: Fingerprint, train_examples: list[Example] | None,
                        log: Callable[[str], None] = print) -> CrossStoreTeacher:
    """Open the store at ``folder`` for a cross run and check its manifest against the run before step 0:
    ``tokenizer_mode``, both tokenizers, the teacher, the data (the fingerprint of ``train_examples`` in the
    teacher's tokens), ``k`` and ``logprob_dtype`` (read from the manifest where the recipe leaves them at their
    defaults), temperature 1. A difference raises :class:`StoreMismatch` naming every field."""
    from stillroom.teachers.store_format import data_fingerprint, recorded_settings, taken_note
    from stillroom.teachers.store_reader import run_expectation

    if train_examples is None:
        raise ValueError("teacher.source=store needs the training examples (to check the store's data fingerprint)")
    reader = StoreReader(folder)
    fields = cross_store_fields(vocab, fingerprint)
    settings, taken = recorded_settings(cfg.teacher.store, reader.manifest, ("k", "logprob_dtype"))
    teacher = Fingerprint(fingerprint.teacher, fields["tokenizer_hash"], fields["vocab_size"])
    expected = run_expectation(
        fingerprint=teacher, data_fingerprint=data_fingerprint(cross_store_examples(vocab, train_examples)),
        k=settings["k"], loss_temperature=STORE_TEMPERATURE, logprob_dtype=settings["logprob_dtype"],
        tokenizer_mode="cross", student_tokenizer_hash=fields["student_tokenizer_hash"])
    reader.check_run(expected)
    log(f"teacher: cross-tokenizer store {reader.folder} (k={reader.k} of the teacher's {reader.vocab_size} tokens, "
        f"{reader.manifest['logprob_dtype']}, {reader.manifest['tokens']} teacher positions)"
        f"{taken_note('teacher.store', taken)}")
    return CrossStoreTeacher(reader, vocab, supports=supports, rank_k=cfg.teacher.cross.rank_k,
                             fingerprint=fingerprint, output_device=output_device)
