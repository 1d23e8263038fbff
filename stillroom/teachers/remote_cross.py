"""A remote teacher with another tokenizer than the student's (``teacher.source: remote`` with
``teacher.tokenizer_mode: cross``).

The run holds the teacher's tokenizer locally (``teacher.model``; the run's
:class:`~stillroom.teachers.cross_align.CrossVocab`). For each student batch every row is spelled
into the teacher's tokens of the same text (:meth:`CrossVocab.align_batch`); those *teacher* ids go to
the OpenAI-compatible server as token-id prompts with ``prompt_logprobs``, through the same request,
parsing and resume cache as a same-tokenizer remote teacher (:meth:`RemoteTeacher.fetch`; the cache
key is the row's uid and the digest of the teacher ids sent). The server's answer for a prompt of
``m`` teacher tokens is the top-k at teacher positions ``0 .. m-2`` (row ``j``: the distribution
over the token after teacher position ``j``), which is what
:func:`~stillroom.teachers.cross_topk.cross_from_topk` turns into the student-position
:class:`~stillroom.teachers.signal.CrossTargets`. With ``top_k`` = the teacher's whole vocabulary
the targets equal the online :class:`~stillroom.teachers.cross.CrossTeacher`'s.

Ids the server answers with are checked against the *teacher's* vocabulary, and the served
tokenizer against ``teacher.model``'s (where ``/models`` lists a ``tokenizer_hash``, as
``stillroom serve-teacher`` does): the local tokenizer decides which ids are sent, so it must be
the served model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from stillroom.data.batch import Batch
from stillroom.teachers.cross_align import CrossVocab
from stillroom.teachers.cross_topk import TopkRows, cross_from_topk
from stillroom.teachers.http import RemoteError
from stillroom.teachers.remote import RemoteTeacher, run_remote
from stillroom.teachers.signal import Fingerprint, TeacherSignal

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

TEACHER_VOCAB = ("teacher.model's vocabulary",
                 "the server answers in another tokenizer than teacher.model's, whose tokens of the student's text "
                 "are sent: set teacher.model to the served model (a folder or hub id with its tokenizer)")
"""How a served id outside the teacher's vocabulary is explained (see :func:`~stillroom.teachers.remote.parse_prompt_logprobs`)."""


class RemoteCrossTeacher:
    """``signal(batch) -> TeacherSignal(cross=CrossTargets)`` from a remote teacher of another tokenizer.

    ``remote``: a :class:`RemoteTeacher` whose ``vocab_size`` is ``vocab.teacher_vocab`` (it sends and parses
    teacher ids); ``supports``/``rank_k``: as :func:`cross_from_topk`'s; ``tokenizer_hash``: the hash of
    ``vocab.teacher_tok``, compared with the server's in :meth:`check_server` (None: not compared).
    """

    def __init__(self, remote: RemoteTeacher, vocab: CrossVocab, *, supports: set[str], rank_k: int | None = None,
                 tokenizer_hash: str | None = None, fingerprint: Fingerprint | None = None,
                 output_device: torch.device | str = "cpu") -> None:
        if remote.vocab_size != vocab.teacher_vocab:
            raise ValueError(f"the remote teacher checks ids against a vocabulary of {remote.vocab_size}, but the "
                             f"teacher's tokenizer has {vocab.teacher_vocab} ids; build it with "
                             "vocab_size=vocab.teacher_vocab")
        self.remote, self.vocab = remote, vocab
        self.supports, self.rank_k = set(supports), rank_k
        self.tokenizer_hash, self.fingerprint = tokenizer_hash, fingerprint
        self.output_device = torch.device(output_device)
        self._checked = False

    @property
    def requests_sent(self) -> int:
        """HTTP requests made so far (every attempt counts)."""
        return self.remote.requests_sent

    def check_server(self) -> dict | None:
        """Ask ``/models``: the model must be served and, where the server lists one, its tokenizer must be
        ``teacher.model``'s (the ids sent are that tokenizer's). Returns the model's entry."""
        entry = self.remote.check_server()
        theirs = (entry or {}).get("tokenizer_hash")
        if self.tokenizer_hash is not None and theirs and theirs != self.tokenizer_hash:
            raise RemoteError(f"{self.remote.client.shown_base}: the served model's tokenizer ({theirs[:12]}) differs "
                              f"from teacher.model's ({self.tokenizer_hash[:12]}); a cross-tokenizer run sends the "
                              "teacher's token ids from teacher.model's tokenizer: set teacher.model to the served "
                              "model (a folder or hub id with its tokenizer)")
        self._checked = True
        return entry

    def signal(self, batch: Batch) -> TeacherSignal:
        """:class:`CrossTargets` ``[B, T, ...]`` for the student ``batch`` (right-padded rows).

        One request per row not in the cache (rows of < 2 teacher tokens need none and align nowhere).
        """
        if not self._checked:
            self.check_server()
        rows = self.vocab.align_batch(batch)  # refuses rows that are not right-padded
        answers = self.remote.fetch(batch.uids, [r.teacher_ids for r in rows])
        k = self.remote.cfg.top_k
        topk: list[TopkRows] = []
        for answer in answers:
            ids, lp = answer if answer is not None else (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
            topk.append((torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lp.copy())))
        cross = cross_from_topk(self.vocab, rows, topk, width=batch.input_ids.shape[1], supports=self.supports,
                                rank_k=self.rank_k, output_device=self.output_device)
        return TeacherSignal(cross=cross, fingerprint=self.fingerprint)

    def close(self) -> None:
        self.remote.close()


def remote_cross_from_run(cfg: "RunConfig", vocab: CrossVocab, *, supports: set[str],
                          output_device: torch.device | str, fingerprint: Fingerprint | None = None
                          ) -> RemoteCrossTeacher:
    """The remote teacher of a cross-tokenizer run, its server checked before step 0.

    Rows are cached as a same-tokenizer remote run's (:func:`~stillroom.teachers.remote.remote_cache_path`;
    ``--resume`` asks only what is missing). Log-probs are at temperature 1: divergence terms temper the matched
    log-probs as raw logits (exact up to the top-k estimate); ``uld`` needs ``loss.loss_temperature: 1``
    (checked when the recipe loads, :func:`stillroom.config.cross.check_cross_run`).
    """
    from stillroom.models.vocab import tokenizer_hash

    remote = run_remote(cfg, vocab_size=vocab.teacher_vocab, fingerprint=None, vocabulary=TEACHER_VOCAB)
    try:
        teacher = RemoteCrossTeacher(remote, vocab, supports=supports, rank_k=cfg.teacher.cross.rank_k,
                                     tokenizer_hash=tokenizer_hash(vocab.teacher_tok), fingerprint=fingerprint,
                                     output_device=output_device)
        teacher.check_server()
    except BaseException:
        remote.close()
        raise
    return teacher
