"""Cross-tokenizer targets from a top-k teacher: equal to the online teacher's when k covers the whole
vocabulary; with a small k the matched tokens outside the top k share the tail as documented."""

import pytest
import torch
from helpers import cross_setup, tiny_llama

from stillroom.losses import forward_kl, reverse_kl, uld
from stillroom.teachers.cross import CrossTeacher
from stillroom.teachers.cross_topk import cross_from_topk
from stillroom.teachers.signal import TeacherSignal

@pytest.fixture(scope="module")
def setup():
    vocab, batch = cross_setup()
    return vocab, tiny_llama(vocab.teacher_vocab, layers=2, seed=3), batch


def _topk(vocab, teacher, batch, k):
    rows = vocab.align_batch(batch)
    out = []
    for row in rows:
        with torch.no_grad():
            logits = teacher(torch.tensor([row.teacher_ids])).logits[0, :-1, : vocab.teacher_vocab]  # [m-1, V_t]
        lp = torch.log_softmax(logits.double(), -1)
        top = lp.topk(k, dim=-1)
        out.append((top.indices, top.values.float()))
    return rows, out


def test_full_topk_equals_the_online_teacher(setup):
    vocab, teacher, batch = setup
    online = CrossTeacher(teacher, vocab, temperature=1.0, supports={"all", "unmatched"}).signal(batch).cross
    rows, topk = _topk(vocab, teacher, batch, vocab.teacher_vocab)
    sparse = cross_from_topk(vocab, rows, topk, width=batch.input_ids.shape[1], supports={"all", "unmatched"})
    assert torch.equal(sparse.aligned_bt, online.aligned_bt)
    a = sparse.aligned_bt
    # matched logits agree up to a per-row constant (log-probs vs logits): the renormalised distributions agree
    assert torch.allclose(torch.log_softmax(sparse.matched_logits_btm[a], -1),
                          torch.log_softmax(online.matched_logits_btm[a], -1), atol=1e-5)
    for support in ("all", "unmatched"):
        assert torch.allclose(sparse.ranked[support][0][a], online.ranked[support][0][a], atol=1e-6)
        assert torch.allclose(sparse.ranked[support][1][a], online.ranked[support][1][a], atol=1e-5)
    z = torch.randn(*batch.input_ids.shape, vocab.student_vocab, generator=torch.Generator().manual_seed(0))
    for term in (forward_kl, reverse_kl, uld):
        want, n_want = term(z, TeacherSignal(cross=online), batch.loss_mask)
        got, n_got = term(z, TeacherSignal(cross=sparse), batch.loss_mask)
        assert n_got == n_want and got.item() == pytest.approx(want.item(), rel=1e-5)


def test_small_k_spreads_the_matched_share_of_the_tail(setup):
    vocab, teacher, batch = setup
    rows, topk = _topk(vocab, teacher, batch, 4)
    sparse = cross_from_topk(vocab, rows, topk, width=batch.input_ids.shape[1], supports={"all", "unmatched"})
    b, i = sparse.aligned_bt.nonzero()[0].tolist()
    row = rows[b]
    j = row.teacher_pos[row.student_pos.index(i)]
    ids, lp = topk[b][0][j], topk[b][1][j].double()
    p = lp.exp()
    cols = vocab.teacher_to_matched[ids]
    share = p[cols >= 0].sum() / p.sum()
    tail = 1 - p.sum()
    got = sparse.matched_logits_btm[b, i].double().exp()
    covered = torch.zeros(vocab.matched_student.numel(), dtype=torch.bool)
    covered[cols[cols >= 0]] = True
    for c, pk in zip(cols.tolist(), p.tolist()):
        if c >= 0:
            assert got[c].item() == pytest.approx(pk, rel=1e-5)
    rest = got[~covered]
    assert torch.allclose(rest, torch.full_like(rest, (share * tail / (~covered).sum()).item()), rtol=1e-5)
    top, tail_all = sparse.ranked["all"][0][b, i], sparse.ranked["all"][1][b, i]
    assert torch.allclose(top.double(), p.sort(descending=True).values, atol=1e-6)
    assert tail_all.item() == pytest.approx(tail.item(), abs=1e-6)
    un_top, un_tail = sparse.ranked["unmatched"][0][b, i], sparse.ranked["unmatched"][1][b, i]
    assert un_top.sum().item() + un_tail.item() == pytest.approx((p[cols < 0].sum() + (1 - share) * tail).item(),
                                                                 abs=1e-6)


def test_positions_beyond_the_topk_rows_are_not_aligned(setup):
    vocab, teacher, batch = setup
    rows, topk = _topk(vocab, teacher, batch, 3)
    cut = [(ids[:2], lp[:2]) for ids, lp in topk]
    sparse = cross_from_topk(vocab, rows, cut, width=batch.input_ids.shape[1], supports=set())
    for b, row in enumerate(rows):
        want = [i for i, j in zip(row.student_pos, row.teacher_pos) if j < 2]
        assert sparse.aligned_bt[b].nonzero().squeeze(1).tolist() == want
