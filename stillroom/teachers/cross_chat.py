"""Chat records rendered by each side's own chat template (``teacher.cross.chat_template: own``).

By default the teacher of a cross-tokenizer run reads the student's rendering of a conversation
(:meth:`~stillroom.teachers.cross_align.CrossVocab.align`): right when the two templates agree, as with
``student.new_tokenizer``, which carries the teacher's template. Two models with different templates (a
Llama-format student, a ChatML teacher) each expect their own scaffolding around the same messages, so
here each side renders the conversation with its own template, and positions align inside the
*message contents* only, the text both renderings share:

* each message's content is found, in order, in both renderings (a template that rewrites content, e.g.
  strips it, fails naming the record and the message);
* student position ``i`` (it has read the rendering up to character ``e``) pairs with teacher position ``j``
  when ``e`` lies in a content span, before its end, and the teacher's token ``j`` ends at the same point of
  the same content (so both predict the same next content text); positions in the scaffolding, or at the end
  of a content where the two templates go on differently, learn from the cross-entropy alone;
* the teacher's tokens are its own rendering (:class:`~stillroom.data.formats.TextEncoder`), its targets its
  own assistant turns (for the report's teacher bits per byte); a student sequence cut at ``seq_len`` cuts the
  teacher's rendering at the same point of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from stillroom.teachers.cross_align import RowAlignment
from stillroom.teachers.token_bytes import CrossTokenizerError


@dataclass
class Rendering:
    """One side's rendering of a conversation: ``text``, its ``ids`` ``[n]`` and each token's end character
    ``ends`` ``[n]``, and the ``(start, end)`` characters of every message content, in message order."""

    text: str
    ids: list[int]
    ends: list[int]
    contents: list[tuple[int, int]]


def render(tokenizer, messages: list[dict], uid: str, side: str) -> Rendering:
    """``messages`` through ``tokenizer``'s chat template, tokenized with offsets (a fast tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CrossTokenizerError(f"sequence {uid}: teacher.cross.chat_template=own renders each side's own chat "
                                  f"template, but the {side}'s tokenizer has none; give it one, or set "
                                  "teacher.cross.chat_template: student (the teacher reads the student's rendering)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    contents, cursor = [], 0
    for n, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            raise CrossTokenizerError(f"sequence {uid}: the {side}'s chat template does not keep the content of "
                                      f"message {n} verbatim ({content[:40]!r}), so the two renderings cannot be "
                                      "aligned on it; set teacher.cross.chat_template: student")
        contents.append((at, at + len(content)))
        cursor = at + len(content)
    return Rendering(text, list(enc["input_ids"]), [hi for _, hi in enc["offset_mapping"]], contents)


def chat_alignment(student_tok, teacher_tok, student_ids: list[int], messages: list[dict],
                   teacher_target: list[bool], uid: str) -> RowAlignment:
    """The :class:`RowAlignment` of a conversation that each side renders with its own template.

    ``student_ids``: the student's sequence (its rendering, perhaps cut at ``seq_len``); ``teacher_target``
    ``[m]``: the teacher's targets on its own full rendering (its assistant turns), cut with it.
    ``student_end`` / ``teacher_end`` hold each token's end character in its own rendering.
    """
    s = render(student_tok, messages, uid, "student")
    t = render(teacher_tok, messages, uid, "teacher")
    if s.ids[: len(student_ids)] != list(student_ids):
        raise CrossTokenizerError(f"sequence {uid}: the student's ids are not its chat template's rendering of the "
                                  "record's messages; teacher.cross.chat_template=own needs unpacked chat records "
                                  "(data.pack: false)")
    if len(s.contents) != len(t.contents):
        raise CrossTokenizerError(f"sequence {uid}: the two chat templates render different messages "
                                  f"({len(s.contents)} vs {len(t.contents)} contents, e.g. one drops the system "
                                  "prompt); set teacher.cross.chat_template: student")
    n = len(student_ids)
    cut = len(t.ids) if n == len(s.ids) else _teacher_cut(s, t, s.ends[n - 1] if n else 0)
    teacher_at = {end: j for j, end in enumerate(t.ends[: cut - 1])}  # a token ends here and another follows
    s_pos, t_pos = [], []
    for i in range(n - 1):
        if s.ends[i + 1] <= s.ends[i]:  # token i ends inside a character the next token finishes
            continue
        point = _to_teacher(s, t, s.ends[i], inside=True)
        j = teacher_at.get(point) if point is not None else None
        if j is not None:
            s_pos.append(i)
            t_pos.append(j)
    return RowAlignment(t.ids[:cut], s_pos, t_pos, s.ends[:n], t.ends[:cut], list(teacher_target[:cut]))


def _to_teacher(s: Rendering, t: Rendering, point: int, *, inside: bool) -> int | None:
    """The teacher character at student character ``point`` of a content span (``inside``: the next text is
    still that content), else None; not ``inside``: after a content, its end."""
    for (s_lo, s_hi), (t_lo, _) in zip(s.contents, t.contents):
        if s_lo <= point < s_hi or (not inside and point == s_hi):
            return t_lo + point - s_lo
    return None


def _teacher_cut(s: Rendering, t: Rendering, point: int) -> int:
    """Teacher tokens kept when the student's rendering stops at character ``point``: those ending by the
    same point of the text (the end of the last content the student has begun, if it stopped in scaffolding)."""
    mapped = _to_teacher(s, t, point, inside=False)
    if mapped is None:
        begun = [(s_lo, t_lo, t_hi) for (s_lo, s_hi), (t_lo, t_hi) in zip(s.contents, t.contents) if s_lo <= point]
        mapped = begun[-1][2] if begun else 0
    return max(1, sum(1 for end in t.ends if end <= mapped))
