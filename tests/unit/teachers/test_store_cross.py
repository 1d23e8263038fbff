"""A cross-tokenizer teacher store: the teacher's top-k at its own positions of the student's text.

With k = the teacher's vocabulary (float32) the store-fed targets and losses equal the online CrossTeacher's; at a
small k in float16, int8 and int4 they stay close to cross_from_topk on the exact top k; a store of the other
tokenizer mode, of another student tokenizer or of other text is refused naming the field."""

import json

import pytest
import torch
from helpers import other_tokenizer, tiny_llama, tiny_tokenizer

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Example, collate
from stillroom.losses import forward_kl, uld
from stillroom.models import tokenizer_hash
from stillroom.teachers.cross import CrossTeacher
from stillroom.teachers.cross_align import cross_vocab
from stillroom.teachers.cross_topk import cross_from_topk
from stillroom.teachers.factory import build_teacher_source
from stillroom.teachers.signal import Fingerprint, TeacherSignal
from stillroom.teachers.store_cross import CrossStoreTeacher, cross_store_examples, cross_store_fields
from stillroom.teachers.store_format import StoreMismatch, data_fingerprint
from stillroom.teachers.store_reader import StoreReader
from stillroom.teachers.store_writer import make_header, model_compute, write_store

TEXTS = ["The quick brown fox, déjà vu.", "def f(x):\n    return x * 2", "Attribute references are written",
         "A class definition: class Foo(Base): pass", "Numbers 12345 and symbols #@!"]
TEACHER = "local:/teacher@local#sha256:0123456789abcdef"
SUPPORTS = {"all", "unmatched"}


@pytest.fixture(scope="module")
def setup():
    student, teacher_tok = other_tokenizer(400), tiny_tokenizer()
    vocab = cross_vocab(student, teacher_tok, student_vocab=len(student), teacher_vocab=len(teacher_tok))
    teacher = tiny_llama(len(teacher_tok), layers=2, seed=3)
    teacher.model.norm.weight.data.mul_(8.0)  # a peaked teacher: top-k log-probs spanning several nats
    exs = []
    for i, text in enumerate(TEXTS):
        ids = student(text)["input_ids"] + [student.eos_token_id]
        exs.append(Example(ids, [False] + [True] * (len(ids) - 1), f"data:{i}:0", n_bytes=len(text.encode())))
    fp = Fingerprint(teacher=TEACHER, tokenizer_hash=tokenizer_hash(student), vocab_size=len(student))
    return vocab, teacher, exs, fp, student.pad_token_id


def _write(folder, setup, *, k, dtype, shard_tokens=40):
    vocab, teacher, exs, fp, _ = setup
    t_exs = cross_store_examples(vocab, exs)
    header = make_header(t_exs, teacher_identity=TEACHER, k=k, loss_temperature=1.0, logprob_dtype=dtype,
                         shard_tokens=shard_tokens, **cross_store_fields(vocab, fp))
    compute = model_compute(teacher, k=k, loss_temperature=1.0, vocab_size=vocab.teacher_vocab,
                            pad_id=vocab.t.fill_id, batch_size=2)
    write_store(folder, header, t_exs, compute, log=lambda s: None)
    return folder


def _cfg(folder, *, mode="cross", **store):
    student = {"from_config": {"num_hidden_layers": 1}, "tokenizer": str(folder.parent / "student_tok")}
    loss = {"terms": [{"name": "forward_kl"}] + [{"name": "uld", "params": {"support": s}} for s in sorted(SUPPORTS)]}
    return RunConfig.model_validate({
        "name": "r", "output_dir": str(folder.parent), **({"student": student, "loss": loss} if mode == "cross" else {}),
        "teacher": {"source": "store", "tokenizer_mode": mode, "store": {"path": str(folder), **store}},
    })


def _source(cfg, setup, *, cross=True, examples=None, fingerprint=None, log=lambda s: None):
    vocab, _, exs, fp, _ = setup
    return build_teacher_source(cfg, teacher_model=None, vocab_size=vocab.student_vocab, fingerprint=fingerprint or fp,
                                hidden_layers=[], output_device="cpu", train_examples=examples or exs, log=log,
                                cross=vocab if cross else None)


def _batch(setup, order=(3, 0, 4, 1)):
    _, _, exs, _, pad = setup
    return collate([exs[i] for i in order], pad)


def test_k_equal_to_the_teacher_vocabulary_gives_the_online_targets(tmp_path, setup):
    vocab, teacher, exs, fp, _ = setup
    folder = _write(tmp_path / "s", setup, k=vocab.teacher_vocab, dtype="float32")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer_mode"] == "cross" and manifest["vocab_size"] == vocab.teacher_vocab
    assert manifest["tokenizer_hash"] == tokenizer_hash(vocab.teacher_tok) != fp.tokenizer_hash
    assert manifest["student_tokenizer_hash"] == fp.tokenizer_hash and manifest["num_shards"] > 1
    lines = []
    source = _source(_cfg(folder), setup, log=lines.append)
    assert isinstance(source, CrossStoreTeacher)
    assert "cross-tokenizer store" in lines[0] and f"k={vocab.teacher_vocab} of the teacher's" in lines[0]
    batch = _batch(setup)
    for temperature in (1.0, 2.0):  # the loss tempers the stored temperature-1 log-probs as it tempers logits
        stored = source.signal(batch).cross
        online = CrossTeacher(teacher, vocab, temperature=temperature, supports=SUPPORTS).signal(batch).cross
        a = stored.aligned_bt
        assert torch.equal(a, online.aligned_bt) and a.sum() > 10
        assert torch.allclose(torch.log_softmax(stored.matched_logits_btm[a], -1),
                              torch.log_softmax(online.matched_logits_btm[a], -1), atol=1e-5)
        z = torch.randn(*batch.input_ids.shape, vocab.student_vocab, generator=torch.Generator().manual_seed(0))
        terms = [(forward_kl, {})] + ([(uld, {"support": s}) for s in SUPPORTS] if temperature == 1.0 else [])
        for term, params in terms:
            want, n_want = term(z, TeacherSignal(cross=online), batch.loss_mask, loss_temperature=temperature, **params)
            got, n_got = term(z, TeacherSignal(cross=stored), batch.loss_mask, loss_temperature=temperature, **params)
            assert n_got == n_want and got.item() == pytest.approx(want.item(), rel=1e-5)
        if temperature == 1.0:
            for support in SUPPORTS:
                assert torch.allclose(stored.ranked[support][0][a], online.ranked[support][0][a], atol=1e-6)
                assert torch.allclose(stored.ranked[support][1][a], online.ranked[support][1][a], atol=1e-5)


def _exact(setup, batch, k):
    """cross_from_topk on the teacher's exact top k (fp64 log-softmax) for ``batch``."""
    vocab, teacher, *_ = setup
    rows, topk = vocab.align_batch(batch), []
    for row in rows:
        with torch.no_grad():
            logits = teacher(torch.tensor([row.teacher_ids])).logits[0, :-1, : vocab.teacher_vocab]
        top = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
        topk.append((top.indices, top.values.float()))
    return cross_from_topk(vocab, rows, topk, width=batch.input_ids.shape[1], supports=SUPPORTS)


# Rank errors: a stored log-prob is off by <= range / 510 nats in int8 and range / 30 in int4 (docs/STORE.md), by a
# relative 2^-11 in float16; the k = 12 ranges here reach 4.7 nats and p <= ~0.5, so <= 1e-3, 2e-3 and 2e-2 in
# probability bound them (measured: 1.5e-4, 3e-4, 5.5e-3). Reading the rows one position off gives a KL of 3.4.
@pytest.mark.parametrize("dtype,max_kl,max_rank_err", [("float16", 1e-5, 1e-3), ("int8", 1e-4, 2e-3),
                                                       ("int4", 5e-3, 2e-2)])
def test_small_k_quantised_stores_stay_close_to_the_exact_top_k(tmp_path, setup, dtype, max_kl, max_rank_err):
    k = 12
    source = _source(_cfg(_write(tmp_path / "s", setup, k=k, dtype=dtype)), setup)
    batch = _batch(setup)
    stored, exact = source.signal(batch).cross, _exact(setup, batch, k)
    a = exact.aligned_bt
    assert torch.equal(stored.aligned_bt, a)
    logp = torch.log_softmax(exact.matched_logits_btm[a].double(), -1)
    logq = torch.log_softmax(stored.matched_logits_btm[a].double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # per aligned position, over the matched tokens
    assert kl.max().item() < max_kl, kl.max().item()
    for support in SUPPORTS:
        for got, want in zip(stored.ranked[support], exact.ranked[support]):
            assert (got[a] - want[a]).abs().max().item() < max_rank_err


def test_a_row_whose_text_is_not_the_stored_one_is_refused(tmp_path, setup):
    vocab, _, exs, fp, pad = setup
    reader = StoreReader(_write(tmp_path / "s", setup, k=8, dtype="float16"))
    source = CrossStoreTeacher(reader, vocab, supports=SUPPORTS)
    longer = Example(exs[1].input_ids[:-1] + exs[2].input_ids, [True] * (len(exs[1].input_ids) + len(exs[2].input_ids)
                                                                        - 1), exs[1].uid)
    with pytest.raises(StoreMismatch, match=r"sequence 'data:1:0': \d+ positions in the teacher store .* but \d+ "
                                            r"teacher tokens"):
        source.signal(collate([exs[0], longer], pad))


def test_stores_of_the_other_mode_student_or_data_are_refused_by_name(tmp_path, setup):
    vocab, teacher, exs, fp, _ = setup
    folder = _write(tmp_path / "s", setup, k=8, dtype="float16")
    # a cross store for a same-tokenizer run
    with pytest.raises(StoreMismatch, match=r"tokenizer_mode \(store 'cross', run 'same'\): a cross store") as err:
        _source(_cfg(folder, mode="same"), setup, cross=False,
                fingerprint=Fingerprint(TEACHER, tokenizer_hash(vocab.teacher_tok), vocab.teacher_vocab))
    assert "student_tokenizer_hash (store" in str(err.value)
    # another student tokenizer
    other = Fingerprint(TEACHER, "b" * 64, vocab.student_vocab)
    with pytest.raises(StoreMismatch, match=r"student_tokenizer_hash \(store .*, run bbbbbbbbbbbb\.\.\.\)") as err:
        _source(_cfg(folder), setup, fingerprint=other)
    assert "tokenizer_mode" not in str(err.value)
    # other text (the same uids in another order), another k
    with pytest.raises(StoreMismatch, match="data_fingerprint"):
        _source(_cfg(folder), setup, examples=exs[::-1])
    with pytest.raises(StoreMismatch, match=r"k \(store 8, run 16\)"):
        _source(_cfg(folder, k=16), setup)
    # a same-tokenizer store (written before the field existed: no tokenizer_mode in its manifest) for a cross run
    same = tmp_path / "same"
    t_exs = cross_store_examples(vocab, exs)
    header = make_header(t_exs, teacher_identity=TEACHER, tokenizer_hash=tokenizer_hash(vocab.teacher_tok),
                         vocab_size=vocab.teacher_vocab, k=8, loss_temperature=1.0, logprob_dtype="float16")
    write_store(same, header, t_exs, model_compute(teacher, k=8, loss_temperature=1.0, vocab_size=vocab.teacher_vocab,
                                                   pad_id=vocab.t.fill_id), log=lambda s: None)
    manifest = json.loads((same / "manifest.json").read_text())
    assert manifest["tokenizer_mode"] == "same"
    del manifest["tokenizer_mode"], manifest["student_tokenizer_hash"]
    (same / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreMismatch, match=r"tokenizer_mode \(store 'same', run 'cross'\)"):
        _source(_cfg(same), setup)


def test_the_store_covers_the_teacher_tokens_of_each_student_sequence(setup):
    vocab, _, exs, _, _ = setup
    t_exs = cross_store_examples(vocab, exs)
    assert [e.uid for e in t_exs] == [e.uid for e in exs]
    assert [e.input_ids for e in t_exs] == [vocab.align(e.input_ids, e.uid).teacher_ids for e in exs]
    assert data_fingerprint(t_exs) != data_fingerprint(exs)
