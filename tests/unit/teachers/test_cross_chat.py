"""Chat records rendered by each side's own template: positions pair only where both have read the same
prefix of the same message content; scaffolding never pairs; a cut student cuts the teacher at the same text;
a template that rewrites content fails naming the record."""

import pytest
from helpers import other_tokenizer, tiny_tokenizer

from stillroom.teachers.cross_chat import chat_alignment, render
from stillroom.teachers.token_bytes import CrossTokenizerError

STUDENT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<eos>\n{% endfor %}"
                    "{% if add_generation_prompt %}### assistant: {% endif %}")
MESSAGES = [{"role": "user", "content": "What does a list comprehension return?"},
            {"role": "assistant", "content": "A new list, built from the expression for each item."}]


@pytest.fixture(scope="module")
def toks():
    student = other_tokenizer(400)
    student.chat_template = STUDENT_TEMPLATE
    return student, tiny_tokenizer()


def _content_prefix(rendering, point):
    for k, (lo, hi) in enumerate(rendering.contents):
        if lo <= point < hi:
            return k, rendering.text[lo:point]
    return None


def test_pairs_read_the_same_content(toks):
    student, teacher = toks
    s, t = render(student, MESSAGES, "r", "student"), render(teacher, MESSAGES, "r", "teacher")
    assert s.text != t.text and "<|im_start|>" in t.text and "### user" in s.text
    row = chat_alignment(student, teacher, s.ids, MESSAGES, [False] * len(t.ids), "r")
    assert row.teacher_ids == t.ids and len(row.student_pos) > 10
    seen = set()
    for i, j in zip(row.student_pos, row.teacher_pos):
        a, b = _content_prefix(s, s.ends[i]), _content_prefix(t, t.ends[j])
        assert a is not None and a == b  # same message, same text read so far, and more of it to come
        seen.add(a[0])
    assert seen == {0, 1}
    # every student position whose text ends inside a content at a point the teacher also stops at is paired
    teacher_points = {_content_prefix(t, e) for e in t.ends[:-1]}
    want = [i for i in range(len(s.ids) - 1)
            if _content_prefix(s, s.ends[i]) in teacher_points - {None} and s.ends[i + 1] > s.ends[i]]
    assert row.student_pos == want


def test_a_cut_student_cuts_the_teacher_at_the_same_text(toks):
    student, teacher = toks
    s, t = render(student, MESSAGES, "r", "student"), render(teacher, MESSAGES, "r", "teacher")
    lo1, hi1 = s.contents[1]
    n = next(i for i, e in enumerate(s.ends) if lo1 + 10 < e < hi1) + 1  # stops inside the answer
    row = chat_alignment(student, teacher, s.ids[:n], MESSAGES, [True] * len(t.ids), "r")
    stop = _content_prefix(s, s.ends[n - 1])
    assert stop is not None  # the cut falls inside a content for this record
    k, text = stop
    lo = t.contents[k][0]
    assert t.ends[len(row.teacher_ids) - 1] <= lo + len(text) < t.ends[len(row.teacher_ids)]
    assert len(row.teacher_target) == len(row.teacher_ids)
    assert all(i < n - 1 for i in row.student_pos)


def test_a_template_that_rewrites_content_fails_naming_the_record(toks):
    student, teacher = toks
    student = other_tokenizer(400)
    student.chat_template = STUDENT_TEMPLATE.replace("m['content']", "m['content'] | upper")
    with pytest.raises(CrossTokenizerError, match="sequence data:3.*message 0"):
        render(student, MESSAGES, "data:3", "student")
    with pytest.raises(CrossTokenizerError, match="has none"):
        render(other_tokenizer(400), MESSAGES, "data:3", "student")
