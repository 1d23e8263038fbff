"""Aligning a student sequence with the teacher's tokens of the same text.

The teacher reads exactly the student's text: each student sequence (after truncation
and packing, or a sample the student generated) is spelled into bytes with the student's
:class:`~stillroom.teachers.token_bytes.TokenBytes`, cut at special tokens into text
segments, and each segment is tokenized by the teacher. Special tokens carry over by
content string (``<|im_end|>`` on both sides) or by role (the student's EOS becomes the
teacher's EOS). A BOS takes no room in the text; each side keeps its own BOS habit.

**Aligned positions.** Student position ``i`` has read the text up to the end of token
``i``; teacher position ``j`` up to the end of its token ``j``. Where the two ends are the
same point of the text (a *common boundary*), both models condition on the same text and
predict what comes next: the pair ``(i, j)`` is aligned, and the teacher's distribution at
``j`` is the distillation target of the student's at ``i``. Inside a teacher token that
spans several student tokens there is no teacher distribution for the student's partial
word; those positions learn from the cross-entropy alone (the run logs the share of target
positions that align, before step 0).

**Matched vocabulary** (``teacher.cross.vocab_map``). ``exact``: a student token and a teacher
token *match* when they spell the same bytes (special tokens: the same content); one teacher
token per column. ``min_edit_distance`` (FuseLLM's MinED, :mod:`stillroom.teachers.min_edit`):
*every* teacher token counts for the student token spelled closest to it, so several teacher
tokens may share one column and the teacher's probabilities are summed per column. Either way
:class:`CrossVocab` holds ``teacher id -> column`` (``-1``: no column) and the student id of each
column, used to compare the two distributions on the student's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stillroom.teachers.signal import real_ids
from stillroom.teachers.token_bytes import CrossTokenizerError, first_difference, token_bytes, utf8_runs

VOCAB_MAPS = ("exact", "min_edit_distance")
"""``teacher.cross.vocab_map`` values (see the module docstring)."""


@dataclass
class RowAlignment:
    """One sequence in the teacher's tokens: ``teacher_ids`` ``[m]`` and the aligned pairs (student position,
    teacher position), both positions whose logits predict the next token from the same text."""

    teacher_ids: list[int]
    student_pos: list[int]
    teacher_pos: list[int]
    student_end: list[int]
    """Per student token: the text unit where it ends (units: bytes, one per special token, none for BOS)."""
    teacher_end: list[int]
    """Per teacher token: the same."""
    teacher_target: list[bool] | None = None
    """A chat record in the teacher's own rendering (:mod:`~stillroom.teachers.cross_chat`): its own targets."""


class CrossVocab:
    """The two tokenizers of a cross run: their byte tables, the matched vocabulary and the aligner."""

    def __init__(self, student_tok, teacher_tok, *, student_vocab: int, teacher_vocab: int,
                 vocab_map: str = "exact", cache_dir: str | None = None) -> None:
        if vocab_map not in VOCAB_MAPS:
            raise ValueError(f"teacher.cross.vocab_map must be one of {VOCAB_MAPS}, not {vocab_map!r}")
        self.student_tok = student_tok
        self.teacher_tok = teacher_tok
        self.s = token_bytes(student_tok)
        self.t = token_bytes(teacher_tok)
        self.student_vocab = student_vocab
        self.teacher_vocab = teacher_vocab
        self.vocab_map = vocab_map
        self._special_map = self._map_specials()
        self.chat_rows: dict[str, tuple[tuple[int, ...], RowAlignment]] = {}
        """uid -> (student ids, alignment) of chat records each side renders with its own template
        (``teacher.cross.chat_template: own``), used by :meth:`align` for exactly those ids."""
        self.student_to_teacher = self._match()
        """``[V_s]`` long: the teacher id spelling the same bytes (specials: the same content), else -1 (both maps)."""
        self.distance: torch.Tensor | None = None
        """``[V_t]`` long, min_edit_distance only: each teacher token's edit distance to its column's student
        token (0: the same spelling; -1: a special token or no column)."""
        if vocab_map == "exact":
            matched = (self.student_to_teacher >= 0).nonzero().squeeze(1)
            self.matched_student = matched
            """``[M]`` student ids that receive teacher mass (a column each), ascending."""
            self.matched_teacher: torch.Tensor | None = self.student_to_teacher[matched]
            """``[M]`` exact map only (one teacher token per column): the teacher id of each column; None for
            a many-to-one map (use :attr:`teacher_to_matched`)."""
            self.teacher_to_matched = torch.full((teacher_vocab,), -1, dtype=torch.long)
            """``[V_t]`` long: the column of :attr:`matched_student` a teacher id counts for, else -1 (several
            teacher ids may share a column under min_edit_distance)."""
            self.teacher_to_matched[self.matched_teacher] = torch.arange(matched.numel())
        else:
            student_of_teacher = self._min_edit(cache_dir)
            mapped = student_of_teacher >= 0
            self.matched_student = torch.unique(student_of_teacher[mapped])  # sorted
            self.matched_teacher = None
            self.teacher_to_matched = torch.full((teacher_vocab,), -1, dtype=torch.long)
            self.teacher_to_matched[mapped] = torch.searchsorted(self.matched_student, student_of_teacher[mapped])
        cols = self.teacher_to_matched[self.teacher_to_matched >= 0]
        self.column_size = torch.bincount(cols, minlength=self.matched_student.numel())
        """``[M]`` long: how many teacher ids count for each column (1 everywhere under the exact map)."""

    @property
    def one_to_one(self) -> bool:
        """Each column holds exactly one teacher token (the exact map): a gather reads the matched logits."""
        return self.matched_teacher is not None

    @property
    def mapped_teacher(self) -> torch.Tensor:
        """``[M_t]`` long: the teacher ids that have a column, ascending (the rest is ``uld``'s unmatched support)."""
        return (self.teacher_to_matched >= 0).nonzero().squeeze(1)

    def _min_edit(self, cache_dir: str | None) -> torch.Tensor:
        """``[V_t]`` long: each teacher token's student id under MinED (specials: by content or role), else -1."""
        from stillroom.teachers.min_edit import min_edit_map

        def table(tb, vocab: int) -> list[bytes | None]:
            return [None if (i in tb.special or i >= tb.size) else tb.spelled[i] for i in range(vocab)]

        student_of_teacher, self.distance = min_edit_map(table(self.t, self.teacher_vocab),
                                                         table(self.s, self.student_vocab), cache_dir=cache_dir)
        for i, j in sorted(self._special_map.items(), reverse=True):  # the lowest student id wins
            if j is not None and 0 <= j < self.teacher_vocab and i < self.student_vocab:
                student_of_teacher[j] = i
                self.distance[j] = -1
        return student_of_teacher

    def describe(self) -> str:
        """One log line: how the vocabularies map (the run logs it before step 0)."""
        m = self.matched_student.numel()
        if self.one_to_one:
            return f"{m} student tokens ({self.matched_fraction:.1%}) spell a teacher token"
        d = self.distance[self.distance >= 0]
        near = d[d > 0]
        mean = float(near.double().mean()) if near.numel() else 0.0
        return (f"min_edit_distance map: {self.mapped_teacher.numel()}/{self.teacher_vocab} teacher tokens count for "
                f"{m} student tokens ({self.matched_fraction:.1%}); {d.numel() - near.numel()} by identical spelling, "
                f"{near.numel()} by nearest spelling (mean edit distance {mean:.2f} bytes)")

    # ------------------------------------------------------------------ vocabulary
    def _match(self) -> torch.Tensor:
        """``[V_s]`` long: the teacher id spelling the same bytes (specials: the same content), else -1."""
        by_bytes: dict[bytes, int] = {}
        for j, b in enumerate(self.t.spelled[: self.teacher_vocab]):
            if b is not None and b not in by_bytes:
                by_bytes[b] = j
        by_special = {name: j for j, name in self.t.special.items() if j < self.teacher_vocab}
        out = torch.full((self.student_vocab,), -1, dtype=torch.long)
        for i in range(min(self.student_vocab, self.s.size)):
            b = self.s.spelled[i]
            j = by_bytes.get(b) if b is not None else by_special.get(self.s.special.get(i, ""))
            if j is not None:
                out[i] = j
        return out

    @property
    def matched_fraction(self) -> float:
        """Share of the student's vocabulary that receives teacher mass (has a column)."""
        return float(self.matched_student.numel()) / max(1, self.student_vocab)

    def _map_specials(self) -> dict[int, int | None]:
        """Student special id -> teacher id (None: dropped, a BOS the teacher does not use)."""
        by_name = {name: j for j, name in self.t.special.items()}
        out: dict[int, int | None] = {}
        for i, name in self.s.special.items():
            if name in by_name:
                out[i] = by_name[name]
            elif i == self.s.bos_id:
                out[i] = self.t.bos_id
            elif i == self.s.eos_id and self.t.eos_id is not None:
                out[i] = self.t.eos_id
            else:
                out[i] = -1  # refused when it occurs in a sequence (see _special)
        return out

    def _special(self, sid: int, uid: str, pos: int) -> int | None:
        tid = self._special_map.get(sid, -1)
        if tid == -1:
            raise CrossTokenizerError(
                f"sequence {uid}: student token {pos} is the special token {self.s.special.get(sid)!r}, which the "
                f"teacher's tokenizer has no counterpart for (teacher specials: {sorted(self.t.special.values())[:8]}); "
                "add it to the teacher's tokenizer or keep it out of the data (e.g. another chat template)")
        return tid

    # ------------------------------------------------------------------ alignment
    def align_batch(self, batch) -> list[RowAlignment]:
        """:meth:`align` of every row of a student :class:`~stillroom.data.batch.Batch` (right-padded)."""
        return [self.align(ids, uid) for ids, uid in zip(real_ids(batch), batch.uids)]

    def align(self, student_ids: list[int], uid: str) -> RowAlignment:
        """The teacher's tokens of ``student_ids``'s text and the aligned position pairs.

        Text is measured in units: one per byte, one per special token other than BOS, zero for a BOS.
        Raises :class:`CrossTokenizerError` naming ``uid`` and the first divergent character when the
        teacher's tokens do not spell the student's text. A chat record registered in :attr:`chat_rows` with
        these ids takes its own-template alignment instead.
        """
        chat = self.chat_rows.get(uid)
        if chat is not None and chat[0] == tuple(student_ids):
            return chat[1]
        s_end: list[int] = []  # unit offset at the end of each student token
        t_ids: list[int] = []
        t_end: list[int] = []
        unit = 0
        if self.t.adds_bos and self.t.bos_id is not None and not (student_ids and student_ids[0] == self.s.bos_id
                                                                     and self.s.bos_id is not None):
            t_ids.append(self.t.bos_id)
            t_end.append(0)
        run: list[int] = []  # student positions of the current text segment
        for pos, sid in enumerate(student_ids):
            if sid in self.s.special:
                unit = self._flush(student_ids, run, unit, s_end, t_ids, t_end, uid)
                run = []
                tid = self._special(sid, uid, pos)
                width = 0 if sid == self.s.bos_id else 1
                unit += width
                s_end.append(unit)
                if tid is not None:
                    t_ids.append(tid)
                    t_end.append(unit)
            else:
                run.append(pos)
        self._flush(student_ids, run, unit, s_end, t_ids, t_end, uid)
        return self._pairs(s_end, t_ids, t_end)

    def _flush(self, ids, run, unit, s_end, t_ids, t_end, uid) -> int:
        """Tokenize one text segment (student positions ``run``) with the teacher; returns the unit after it."""
        if not run:
            return unit
        pieces = [self.s.spelled[ids[p]] or b"" for p in run]
        if self.s.prefix_space and not s_end and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # the student's own prefix space is not text
        data = b"".join(pieces)
        for lo, hi in utf8_runs(data):
            self._teacher_tokens(data[lo:hi], unit + lo, t_ids, t_end, uid)
        offset = unit
        for b in pieces:
            offset += len(b)
            s_end.append(offset)
        return unit + len(data)

    def _teacher_tokens(self, data: bytes, start: int, t_ids: list[int], t_end: list[int], uid: str) -> None:
        """Append the teacher's tokens of the text ``data`` (whole UTF-8) and their end units from ``start``."""
        text = data.decode("utf-8")
        teacher = list(self.teacher_tok(text, add_special_tokens=False)["input_ids"])
        spelled = self.t.text_bytes(teacher)
        trim = 1 if self.t.prefix_space and spelled.startswith(b" ") and not text.startswith(" ") else 0
        if spelled[trim:] != data:
            at = first_difference(spelled[trim:], data)
            char = len(data[:at].decode("utf-8", errors="ignore"))
            raise CrossTokenizerError(
                f"sequence {uid}: the teacher's tokens do not spell the student's text; they diverge at character "
                f"{char} of a text segment ({text[max(0, char - 10):char + 10]!r}: teacher "
                f"{spelled[trim + at:trim + at + 8]!r} vs student {data[at:at + 8]!r}). The teacher's tokenizer "
                "rewrites this text (a normaliser); use tokenizer_mode=same with a shared tokenizer, or clean the text")
        offset = start
        for k, tid in enumerate(teacher):
            offset += len(self.t.spelled[tid] or b"") - (trim if k == 0 else 0)
            t_ids.append(tid)
            t_end.append(offset)

    @staticmethod
    def _pairs(s_end: list[int], t_ids: list[int], t_end: list[int]) -> RowAlignment:
        last_teacher_at: dict[int, int] = {}
        for j, e in enumerate(t_end[:-1]):  # the last teacher token predicts nothing inside the sequence
            last_teacher_at[e] = j
        s_pos, t_pos = [], []
        for i, e in enumerate(s_end[:-1]):
            j = last_teacher_at.get(e)
            if j is not None and t_end[j + 1] > e:  # the teacher's next token starts here (not a 0-width BOS)
                s_pos.append(i)
                t_pos.append(j)
        return RowAlignment(t_ids, s_pos, t_pos, s_end, t_end)


def cross_vocab(student_tok, teacher_tok, *, student_vocab: int, teacher_vocab: int, vocab_map: str = "exact",
                cache_dir: str | None = None) -> CrossVocab:
    """The :class:`CrossVocab` of a run (checks both tokenizers' spelling first). ``vocab_map``:
    ``teacher.cross.vocab_map``; ``cache_dir``: where a min_edit_distance map is cached."""
    return CrossVocab(student_tok, teacher_tok, student_vocab=student_vocab, teacher_vocab=teacher_vocab,
                      vocab_map=vocab_map, cache_dir=cache_dir)
