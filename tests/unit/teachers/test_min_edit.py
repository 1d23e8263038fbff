"""MinED (teacher.cross.vocab_map: min_edit_distance): hand-computed edit distances and maps on tiny byte
tables, the cache, the many-to-one CrossVocab, the projected distribution (online and from top-k), the config
refusal of uld's unmatched support."""

import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import cross_recipe, other_tokenizer, student_batch, tiny_llama, tiny_tokenizer

pytest.importorskip("rapidfuzz", reason="the optional extra stillroom[cross]")

from stillroom.losses import forward_kl, uld  # noqa: E402
from stillroom.teachers import min_edit  # noqa: E402
from stillroom.teachers.cross import CrossTeacher  # noqa: E402
from stillroom.teachers.cross_align import RowAlignment, cross_vocab  # noqa: E402
from stillroom.teachers.cross_topk import cross_from_topk  # noqa: E402
from stillroom.teachers.min_edit import edit_distance, min_edit_map  # noqa: E402
from stillroom.teachers.signal import TeacherSignal  # noqa: E402


# student: 0 "a", 1 "b", 2 special, 3 "the", 4 " th", 5 "" (spells nothing), 6 "ab"
STUDENT = [b"a", b"b", None, b"the", b" th", b"", b"ab"]
TEACHER = [b"the", b" the", b"ba", b"x", None, b"abc"]


def test_edit_distances_by_hand():
    assert edit_distance(b"kitten", b"sitting") == 3  # k->s, e->i, +g
    assert edit_distance(b"", b"abc") == 3
    assert edit_distance(b"flaw", b"lawn") == 2  # -f, +n
    assert edit_distance("é".encode(), b"e") == 2  # bytes, not characters: 0xC3 0xA9 vs 0x65
    assert edit_distance(b" the", b"the") == 1


def test_the_map_by_hand():
    out, dist = min_edit_map(TEACHER, STUDENT)
    # "the": identical to 3. " the": 1 from both "the" and " th"; " th" shares the longer prefix (3 bytes).
    # "ba": 1 from "a" and "b"; "b" shares a prefix of 1. "x": 1 from "a" and "b", no prefix: the lower id.
    # special: no candidate. "abc": 1 from "ab" (the special 2 and the empty 5 never take part).
    assert out.tolist() == [3, 4, 1, 0, -1, 6]
    assert dist.tolist() == [0, 1, 1, 1, -1, 1]
    for j, i in enumerate(out.tolist()):  # nothing closer exists
        if i >= 0:
            assert all(edit_distance(TEACHER[j], s) >= dist[j] for s in STUDENT if s)


def _levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_random_tables_match_a_plain_python_reference():
    g = torch.Generator().manual_seed(0)

    def table(n):  # short strings over a 4-letter alphabet: many ties
        return [bytes(b"abcd"[k] for k in torch.randint(0, 4, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                           generator=g).tolist()) for _ in range(n)]

    teacher, student = table(60), table(25)
    for block in (7, 1024):  # blocks of teacher rows change nothing
        out, dist = min_edit_map(teacher, student, block=block)
        for j, t in enumerate(teacher):
            want = min(range(len(student)), key=lambda i: (_levenshtein(t, student[i]), -_prefix(t, student[i]), i))
            assert (out[j].item(), dist[j].item()) == (want, _levenshtein(t, student[want])), (t, student[want])


def test_the_map_is_cached_atomically_and_reread(tmp_path, monkeypatch):
    out, dist = min_edit_map(TEACHER, STUDENT, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("min_edit-") and files[0].endswith(".safetensors")

    def fail(*args):
        raise AssertionError("computed again although cached")

    monkeypatch.setattr(min_edit, "_compute", fail)
    again, d2 = min_edit_map(TEACHER, STUDENT, cache_dir=tmp_path)
    assert torch.equal(again, out) and torch.equal(d2, dist)
    with pytest.raises(AssertionError, match="computed again"):  # another table is another key
        min_edit_map(TEACHER + [b"zz"], STUDENT, cache_dir=tmp_path)


def test_missing_rapidfuzz_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    with pytest.raises(ImportError, match=r"pip install 'stillroom\[cross\]'"):
        min_edit_map(TEACHER, STUDENT)


@pytest.fixture(scope="module")
def setup():
    student, teacher_tok = other_tokenizer(280), tiny_tokenizer(400)  # a smaller student: many-to-one columns
    kw = dict(student_vocab=len(student), teacher_vocab=len(teacher_tok))
    vocab = cross_vocab(student, teacher_tok, vocab_map="min_edit_distance", **kw)
    exact = cross_vocab(student, teacher_tok, **kw)
    teacher = tiny_llama(len(teacher_tok), layers=2, seed=3)
    batch = student_batch(student)
    return vocab, exact, teacher, batch


def test_every_teacher_token_has_a_column_and_identical_spellings_keep_theirs(setup):
    vocab, exact, _, _ = setup
    t, s = vocab.t, vocab.s
    assert not vocab.one_to_one and vocab.matched_teacher is None and exact.one_to_one
    ordinary = [j for j in range(vocab.teacher_vocab) if j not in t.special]
    assert (vocab.teacher_to_matched[ordinary] >= 0).all()
    unmapped = (vocab.teacher_to_matched < 0).nonzero().squeeze(1).tolist()
    assert set(unmapped) == {0, 2, 3}  # "<unk>", "<|im_start|>", "<|im_end|>": specials the student lacks
    assert vocab.column_size.sum() == vocab.mapped_teacher.numel() and (vocab.column_size >= 1).all()
    assert vocab.column_size.max() > 1  # many-to-one
    student_of = vocab.matched_student[vocab.teacher_to_matched.clamp_min(0)]
    for j in ordinary:
        i = int(student_of[j])
        assert edit_distance(t.spelled[j], s.spelled[i]) == vocab.distance[j]
    for j in ordinary[:: 7]:  # brute force: no ordinary student token is closer
        best = min(edit_distance(t.spelled[j], s.spelled[i]) for i in range(vocab.student_vocab)
                   if i not in s.special and s.spelled[i])
        assert vocab.distance[j] == best
    # the exact map's pairs survive: a teacher token whose bytes a student token spells counts for it
    for i, j in enumerate(exact.student_to_teacher.tolist()):
        if j >= 0 and j not in t.special:
            assert s.spelled[int(student_of[j])] == s.spelled[i]
    # the teacher's EOS counts for the student's EOS (by role: "<|endoftext|>" vs "<eos>")
    assert int(student_of[t.eos_id]) == s.eos_id
    assert "min_edit_distance map:" in vocab.describe() and "by nearest spelling" in vocab.describe()


def test_online_targets_sum_the_teacher_probabilities_per_column(setup):
    vocab, _, teacher, batch = setup
    temperature = 2.0
    ct = CrossTeacher(teacher, vocab, temperature=temperature, supports={"all"}, chunk_rows=5)
    cross = ct.signal(batch).cross
    cols = vocab.teacher_to_matched
    m = vocab.matched_student.numel()
    for b, row in enumerate(ct.alignments(batch)):
        with torch.no_grad():
            full = teacher(torch.tensor([row.teacher_ids])).logits[0, :, : vocab.teacher_vocab].double()
        for i, j in zip(row.student_pos, row.teacher_pos):
            p = torch.softmax(full[j] / temperature, -1)
            want = torch.zeros(m, dtype=torch.float64).index_add_(0, cols[cols >= 0], p[cols >= 0])
            got = torch.softmax(cross.matched_logits_btm[b, i].double() / temperature, -1)  # as the loss reads it
            assert torch.allclose(got, want / want.sum(), atol=1e-6)
    one = CrossTeacher(teacher, vocab, temperature=1.0, supports=set(), chunk_rows=1).signal(batch).cross
    many = CrossTeacher(teacher, vocab, temperature=1.0, supports=set(), chunk_rows=4096).signal(batch).cross
    assert torch.allclose(one.matched_logits_btm, many.matched_logits_btm, atol=1e-5)


def test_online_and_full_topk_agree_under_the_many_to_one_map(setup):
    vocab, _, teacher, batch = setup
    online = CrossTeacher(teacher, vocab, temperature=1.0, supports={"all", "unmatched"}).signal(batch).cross
    rows = vocab.align_batch(batch)
    topk = []
    for row in rows:
        with torch.no_grad():
            logits = teacher(torch.tensor([row.teacher_ids])).logits[0, :-1, : vocab.teacher_vocab]
        top = torch.log_softmax(logits.double(), -1).topk(vocab.teacher_vocab, dim=-1)
        topk.append((top.indices, top.values.float()))
    sparse = cross_from_topk(vocab, rows, topk, width=batch.input_ids.shape[1], supports={"all", "unmatched"})
    a = sparse.aligned_bt
    assert torch.equal(a, online.aligned_bt)
    assert torch.allclose(torch.log_softmax(sparse.matched_logits_btm[a], -1),
                          torch.log_softmax(online.matched_logits_btm[a], -1), atol=1e-5)
    for support in ("all", "unmatched"):
        assert sparse.ranked[support][0].shape == online.ranked[support][0].shape
        assert torch.allclose(sparse.ranked[support][0][a], online.ranked[support][0][a], atol=1e-6)
        assert torch.allclose(sparse.ranked[support][1][a], online.ranked[support][1][a], atol=1e-5)
    z = torch.randn(*batch.input_ids.shape, vocab.student_vocab, generator=torch.Generator().manual_seed(0))
    for term in (forward_kl, uld):
        want, n_want = term(z, TeacherSignal(cross=online), batch.loss_mask)
        got, n_got = term(z, TeacherSignal(cross=sparse), batch.loss_mask)
        assert n_got == n_want and got.item() == pytest.approx(want.item(), rel=1e-5)


def test_small_topk_spreads_the_tail_per_teacher_token_by_hand():
    # V_t = 6: t0, t1 -> column 0; t2, t3 -> column 1; t4 -> column 2; t5 has no column. V_s = 5.
    to_col = torch.tensor([0, 0, 1, 1, 2, -1])
    vocab = SimpleNamespace(teacher_to_matched=to_col, column_size=torch.tensor([2, 2, 1]), teacher_vocab=6,
                            student_vocab=5, matched_student=torch.tensor([0, 2, 3]),
                            mapped_teacher=torch.tensor([0, 1, 2, 3, 4]))
    row = RowAlignment(teacher_ids=[0, 1], student_pos=[0], teacher_pos=[0], student_end=[1, 2], teacher_end=[1, 2])
    top = (torch.tensor([[0, 5]]), torch.tensor([[0.5, 0.2]]).log())
    out = cross_from_topk(vocab, [row], [top], width=2, supports={"unmatched"})
    # tail 0.3; matched share of the top-k mass 0.5 / 0.7; the matched tail 0.3 * 5/7 spread over the 4 mapped
    # teacher tokens outside the top k (t1, t2, t3, t4): 0.3 * 5/7 / 4 each
    fill = 0.3 * 5 / 7 / 4
    got = out.matched_logits_btm[0, 0].double().exp()
    assert got.tolist() == pytest.approx([0.5 + fill, 2 * fill, fill], rel=1e-6)
    p, rest = out.ranked["unmatched"]
    assert p[0, 0].tolist() == pytest.approx([0.2]) and rest[0, 0].item() == pytest.approx(0.3 * 2 / 7, rel=1e-6)


def test_config_defaults_to_exact_and_refuses_uld_unmatched_with_min_edit():
    assert cross_recipe().teacher.cross.vocab_map == "exact"
    assert cross_recipe(teacher={"cross": {"vocab_map": "min_edit_distance"}}).teacher.cross.vocab_map == "min_edit_distance"
    unmatched = {"terms": [{"name": "ce"}, {"name": "uld", "params": {"support": "unmatched"}}]}
    assert cross_recipe(loss=unmatched).teacher.cross.vocab_map == "exact"
    with pytest.raises(ValueError, match="support: unmatched.*min_edit_distance"):
        cross_recipe(teacher={"cross": {"vocab_map": "min_edit_distance"}}, loss=unmatched)
    with pytest.raises(ValueError, match="vocab_map"):
        cross_recipe(teacher={"cross": {"vocab_map": "nearest"}})


@pytest.mark.gpu
def test_on_cuda_the_many_to_one_targets_match_the_cpu_ones(setup):
    import copy

    vocab, _, teacher, batch = setup
    cpu = CrossTeacher(teacher, vocab, temperature=2.0, supports={"all"}).signal(batch).cross
    on_gpu = CrossTeacher(copy.deepcopy(teacher).cuda(), vocab, temperature=2.0, supports={"all"},
                          output_device="cuda").signal(batch.to("cuda")).cross
    assert torch.equal(on_gpu.aligned_bt.cpu(), cpu.aligned_bt)
    assert torch.allclose(on_gpu.matched_logits_btm.cpu(), cpu.matched_logits_btm, atol=1e-4)
