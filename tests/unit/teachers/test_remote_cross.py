"""A remote teacher with another tokenizer than the student's (teacher.tokenizer_mode=cross), against our
teacher server on loopback: with top_k = the teacher's whole vocabulary the targets and the losses equal the
online CrossTeacher's; with a small k they are cross_from_topk's of the served top-k; answered rows come
from the resume cache; ids or a tokenizer that are not the teacher's fail by name."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from helpers import cross_setup, tiny_llama
from loopback import serve, teacher_app

from stillroom.config.schema import RemoteConfig
from stillroom.losses import forward_kl, uld
from stillroom.models.vocab import tokenizer_hash
from stillroom.teachers.cross import CrossTeacher
from stillroom.teachers.cross_topk import cross_from_topk
from stillroom.teachers.http import RemoteError
from stillroom.teachers.remote import RemoteTeacher
from stillroom.teachers.remote_cache import ids_digest
from stillroom.teachers.remote_cross import TEACHER_VOCAB, RemoteCrossTeacher
from stillroom.teachers.signal import TeacherSignal

TEXTS = ["The quick brown fox, déjà vu.", "def f(x):\n    return x * 2", "Attribute references", ""]  # "": one token, no request
SUPPORTS = {"all", "unmatched"}


@pytest.fixture(scope="module")
def setup():
    vocab, batch = cross_setup(TEXTS)
    return vocab, tiny_llama(vocab.teacher_vocab, layers=2, seed=3), vocab.teacher_tok, batch


@pytest.fixture(scope="module")
def server(setup):
    _, teacher, teacher_tok, _ = setup
    with serve(teacher_app(teacher, teacher_tok, max_top_k=len(teacher_tok))) as srv:
        yield srv


def remote_cross(url, vocab, k, *, cache=None, model="tiny", tok_hash=None):
    remote = RemoteTeacher(RemoteConfig(url=url, model=model, top_k=k, concurrency=2),
                           vocab_size=vocab.teacher_vocab, cache=cache, vocabulary=TEACHER_VOCAB)
    return RemoteCrossTeacher(remote, vocab, supports=SUPPORTS, tokenizer_hash=tok_hash)


def test_whole_vocabulary_top_k_equals_the_online_teacher(setup, server):
    vocab, teacher, teacher_tok, batch = setup
    online = CrossTeacher(teacher, vocab, temperature=1.0, supports=SUPPORTS).signal(batch).cross
    remote = remote_cross(server.url, vocab, vocab.teacher_vocab, tok_hash=tokenizer_hash(teacher_tok))
    got = remote.signal(batch).cross
    remote.close()
    a = online.aligned_bt
    assert a.any() and torch.equal(got.aligned_bt, a) and got.matched_logits_btm.shape == online.matched_logits_btm.shape
    # log-probs vs logits: equal up to a per-row constant, so the renormalised matched distributions agree
    torch.testing.assert_close(torch.log_softmax(got.matched_logits_btm[a], -1),
                               torch.log_softmax(online.matched_logits_btm[a], -1), atol=1e-5, rtol=0)
    for support in SUPPORTS:
        torch.testing.assert_close(got.ranked[support][0][a], online.ranked[support][0][a], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.ranked[support][1][a], online.ranked[support][1][a], atol=1e-5, rtol=0)
    z = torch.randn(*batch.input_ids.shape, vocab.student_vocab, generator=torch.Generator().manual_seed(0))
    for term, params in ((forward_kl, {}), (uld, {"support": "all"}), (uld, {"support": "unmatched"})):
        want, n_want = term(z, TeacherSignal(cross=online), batch.loss_mask, **params)
        have, n_have = term(z, TeacherSignal(cross=got), batch.loss_mask, **params)
        assert n_have == n_want > 0 and have.item() == pytest.approx(want.item(), rel=1e-5)
    # log-probs at temperature 1 temper as logits do: a divergence at loss_temperature 2 agrees too
    want, _ = forward_kl(z, TeacherSignal(cross=online), batch.loss_mask, loss_temperature=2.0)
    have, _ = forward_kl(z, TeacherSignal(cross=got), batch.loss_mask, loss_temperature=2.0)
    assert have.item() == pytest.approx(want.item(), rel=1e-5)


def test_small_k_targets_are_cross_from_topk_of_the_served_rows(setup, server):
    vocab, teacher, _, batch = setup
    k = 4
    got = remote_cross(server.url, vocab, k).signal(batch).cross
    rows = vocab.align_batch(batch)
    local = []
    for row in rows:  # the teacher's own top-k at its positions, computed here
        with torch.no_grad():
            logits = teacher(torch.tensor([row.teacher_ids])).logits[0, :-1, : vocab.teacher_vocab]
        top = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        local.append((top.indices, top.values))
    want = cross_from_topk(vocab, rows, local, width=batch.input_ids.shape[1], supports=SUPPORTS)
    bsz, width = batch.input_ids.shape
    assert got.matched_logits_btm.shape == (bsz, width, vocab.matched_student.numel())
    assert got.ranked["all"][0].shape == (bsz, width, k) and got.ranked["all"][1].shape == (bsz, width)
    for b, row in enumerate(rows):  # every aligned pair has a served row (the server answers m - 1 rows)
        assert got.aligned_bt[b].nonzero().squeeze(1).tolist() == row.student_pos
    a = got.aligned_bt
    assert torch.equal(got.matched_logits_btm[a].isinf(), want.matched_logits_btm[a].isinf())
    finite = ~want.matched_logits_btm[a].isinf()
    torch.testing.assert_close(got.matched_logits_btm[a][finite], want.matched_logits_btm[a][finite],
                               atol=1e-4, rtol=0)
    for support in SUPPORTS:
        torch.testing.assert_close(got.ranked[support][0][a], want.ranked[support][0][a], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.ranked[support][1][a], want.ranked[support][1][a], atol=1e-5, rtol=0)


def test_answered_rows_come_from_the_cache_keyed_by_the_teacher_ids(setup, server, tmp_path):
    vocab, _, _, batch = setup
    path = tmp_path / "remote.jsonl"
    first = remote_cross(server.url, vocab, 5, cache=path)
    a = first.signal(batch).cross
    sent = first.requests_sent
    rows = vocab.align_batch(batch)
    # /models, then one request per row of more than one teacher token (the 1-token row needs none)
    assert sent == 1 + sum(len(r.teacher_ids) > 1 for r in rows) == len(rows)
    b = first.signal(batch).cross
    assert first.requests_sent == sent and torch.equal(a.matched_logits_btm, b.matched_logits_btm)
    first.close()
    again = remote_cross(server.url, vocab, 5, cache=path)
    c = again.signal(batch).cross
    assert again.requests_sent == 1  # /models only: every row is read from the file
    assert torch.equal(a.matched_logits_btm, c.matched_logits_btm) and torch.equal(a.aligned_bt, c.aligned_bt)
    for uid, row in zip(batch.uids, rows):
        if len(row.teacher_ids) > 1:
            assert again.remote.cache.get(uid, row.teacher_ids) is not None  # keyed by the teacher's ids
    assert again.remote.cache._rows["u0"][0] == ids_digest(rows[0].teacher_ids)
    again.close()


class Junk(BaseHTTPRequestHandler):
    """A server that answers ids beyond the tiny teacher's 320 (yet inside the student's 400)."""

    tokenizer_hash = None

    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"object": "list", "data": [{"id": "junk", "tokenizer_hash": type(self).tokenizer_hash}]})

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        entries = [None] + [{"350": {"logprob": -0.5, "rank": 1}, "3": {"logprob": -1.5, "rank": 2}} for _ in prompt[1:]]
        self.reply({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]})


def test_ids_outside_the_teachers_vocabulary_fail_by_name(setup, loopback):
    vocab, _, _, batch = setup
    assert vocab.teacher_vocab <= 350 < vocab.student_vocab
    teacher = remote_cross(loopback(Junk).url, vocab, 2, model="junk")
    with pytest.raises(RemoteError) as err:
        teacher.signal(batch)
    msg = str(err.value)
    assert f"token id 350 at prompt_logprobs[1] is outside teacher.model's vocabulary [0, {vocab.teacher_vocab})" in msg
    assert "set teacher.model to the served model" in msg
    assert "/v1/completions" in msg


def test_a_served_tokenizer_other_than_the_teachers_fails_before_any_row(setup, loopback):
    vocab, _, teacher_tok, batch = setup

    class OtherTokenizer(Junk):
        tokenizer_hash = "0" * 64

    teacher = remote_cross(loopback(OtherTokenizer).url, vocab, 2, model="junk", tok_hash=tokenizer_hash(teacher_tok))
    with pytest.raises(RemoteError, match="differs from teacher.model's"):
        teacher.signal(batch)
    assert teacher.requests_sent == 1  # /models only


def test_the_remote_teacher_must_check_ids_against_the_teachers_vocabulary(setup):
    vocab = setup[0]
    remote = RemoteTeacher(RemoteConfig(url="http://127.0.0.1:9/v1", top_k=2), vocab_size=vocab.student_vocab)
    with pytest.raises(ValueError, match="vocab_size=vocab.teacher_vocab"):
        RemoteCrossTeacher(remote, vocab, supports=set())
    remote.close()
