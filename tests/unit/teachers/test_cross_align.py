"""Cross-tokenizer alignment: byte tables, aligned positions, special tokens, matched vocabulary, and the
errors that stop a run whose texts cannot be aligned."""

import pytest
import torch
from helpers import other_tokenizer, tiny_tokenizer

from stillroom.teachers.cross_align import CrossVocab, cross_vocab
from stillroom.teachers.token_bytes import CrossTokenizerError, token_bytes, utf8_runs

TEXTS = ["Hello world, héllo wörld ☃ 42!", "  indented\n\tline two\n", "x", "def f(a, b):\n    return a+b  # sum"]


@pytest.fixture(scope="module")
def vocab() -> CrossVocab:
    student, teacher = other_tokenizer(400), tiny_tokenizer()
    return cross_vocab(student, teacher, student_vocab=len(student), teacher_vocab=len(teacher))


@pytest.mark.parametrize("make", [lambda: other_tokenizer(400), lambda: other_tokenizer(400, metaspace=True),
                                  tiny_tokenizer])
def test_token_bytes_spell_the_text_back(make):
    tok = make()
    table = token_bytes(tok)
    for text in TEXTS:
        spelled = table.text_bytes(tok(text, add_special_tokens=False)["input_ids"])
        want = text.encode()
        assert spelled == (b" " + want if table.prefix_space and not text.startswith(" ") else want)


def test_a_rewriting_tokenizer_is_refused():
    from tokenizers import normalizers

    tok = other_tokenizer(400)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(CrossTokenizerError, match=r"do not spell the text back \(byte 0 of the probe"):
        token_bytes(tok)


def test_pairs_are_common_boundaries_by_hand():
    # student tokens end at units 2, 3, 5, 6; teacher tokens at 3, 6: student 1 ("..3") pairs teacher 0; the last
    # tokens predict nothing inside the sequence
    row = CrossVocab._pairs([2, 3, 5, 6], [10, 11], [3, 6])
    assert (row.student_pos, row.teacher_pos) == ([1], [0])
    # a 0-width BOS on both sides aligns (both predict the first text token); on one side only it does not
    assert CrossVocab._pairs([0, 2, 4], [1, 7, 8], [0, 2, 4]).student_pos == [0, 1]
    assert CrossVocab._pairs([0, 2, 4], [7, 8], [2, 4]).student_pos == [1]


def test_aligned_positions_have_read_the_same_text(vocab):
    s, t = vocab.s, vocab.t
    for k, text in enumerate(TEXTS):
        ids = vocab.student_tok(text)["input_ids"] + [vocab.student_tok.eos_token_id]
        row = vocab.align(ids, f"r{k}")
        assert t.text_bytes(row.teacher_ids) == text.encode()  # the teacher's EOS spells nothing, as the student's
        assert row.teacher_ids[-1] == vocab.teacher_tok.eos_token_id
        for i, j in zip(row.student_pos, row.teacher_pos):
            assert s.text_bytes(ids[: i + 1]) == t.text_bytes(row.teacher_ids[: j + 1])
        # every student position ending where a teacher token ends (and more text follows) is aligned
        teacher_ends = set(row.teacher_end[:-1])
        expected = [i for i, e in enumerate(row.student_end[:-1]) if e in teacher_ends]
        assert row.student_pos == expected and expected


def test_bytes_that_are_no_text_are_left_out(vocab):
    ids = vocab.student_tok("☃ snow", add_special_tokens=False)["input_ids"]
    pieces = [vocab.s.spelled[i] for i in ids]
    assert pieces[0] != "☃".encode()  # byte-level BPE splits the snowman into pieces
    row = vocab.align(ids[1:], "cut")  # the block starts inside the character
    assert vocab.t.text_bytes(row.teacher_ids) == " snow".encode()
    assert utf8_runs(b"\x98\x83 a\xe2") == [(2, 4)]
    assert utf8_runs(b"ab\xffcd\xe2\x98\x83") == [(0, 2), (3, 8)]  # a stray byte inside generated text
    encode = lambda text: vocab.student_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stray = encode("ab") + [ids[1]] + encode(" cd")  # a lone piece of the snowman between two words
    row = vocab.align(stray, "gen")
    assert vocab.t.text_bytes(row.teacher_ids) == b"ab cd"
    for i, j in zip(row.student_pos, row.teacher_pos):  # aligned pairs never straddle the stray byte wrongly
        assert vocab.s.text_bytes(stray[: i + 1]).replace(pieces[1], b"") == vocab.t.text_bytes(row.teacher_ids[: j + 1])


def test_divergent_text_names_the_sequence_and_character():
    student, teacher = other_tokenizer(400), tiny_tokenizer()  # the tiny tokenizer applies NFKC: "ﬁ" -> "fi"
    v = cross_vocab(student, teacher, student_vocab=len(student), teacher_vocab=len(teacher))
    ids = student("a ﬁne day", add_special_tokens=False)["input_ids"]
    with pytest.raises(CrossTokenizerError, match=r"sequence src0:7:ab: .*character 2 "):
        v.align(ids, "src0:7:ab")


def test_special_tokens_carry_over_by_content_or_role(vocab):
    im_start = vocab.teacher_tok.convert_tokens_to_ids("<|im_start|>")
    assert vocab.student_to_teacher[vocab.student_tok.eos_token_id] == -1  # "<eos>" spells no teacher token
    row = vocab.align(vocab.student_tok("hi")["input_ids"] + [vocab.student_tok.eos_token_id], "e")
    assert row.teacher_ids[-1] == vocab.teacher_tok.eos_token_id  # ... but is the student's EOS: role
    student = other_tokenizer(400)
    student.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<tool>"]})
    v = cross_vocab(student, vocab.teacher_tok, student_vocab=len(student), teacher_vocab=len(vocab.teacher_tok))
    sid = student.convert_tokens_to_ids("<|im_start|>")
    assert v.student_to_teacher[sid] == im_start and v.align([sid] + student("hi")["input_ids"], "c").teacher_ids[0] \
        == im_start
    with pytest.raises(CrossTokenizerError, match=r"sequence u9: student token 1 is the special token '<tool>'"):
        v.align(student("a")["input_ids"] + [student.convert_tokens_to_ids("<tool>")], "u9")


def test_matched_vocabulary_is_same_spelling(vocab):
    s2t = vocab.student_to_teacher
    teacher_spellings = {b for b in vocab.t.spelled if b is not None}
    for i in range(len(vocab.student_tok)):
        b = vocab.s.spelled[i]
        if b is None:
            continue
        if s2t[i] >= 0:
            assert vocab.t.spelled[int(s2t[i])] == b
        else:
            assert b not in teacher_spellings
    assert torch.equal(vocab.matched_teacher, s2t[vocab.matched_student])
    assert 0.3 < vocab.matched_fraction < 1.0
