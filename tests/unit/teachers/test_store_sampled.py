"""Sampled stores (teacher.store.signal: sampled): draws, frequencies, the unbiased gradient, the format, checks."""

from __future__ import annotations

import math

import pytest
import torch
from test_store_fixtures import V, FakeTeacher, examples

import stillroom.losses as L
from stillroom.config.schema import LossConfig, LossTerm, RunConfig
from stillroom.teachers.signal import TeacherSignal
from stillroom.teachers.store_format import SequenceSignal
from stillroom.teachers.store_reader import StoreReader, run_expectation
from stillroom.teachers.store_sampled import draw_from, draw_tokens, frequencies, sequence_generator
from stillroom.teachers.store_writer import make_header, write_store


def test_frequencies_put_each_count_on_the_first_slot_of_its_id():
    ids = torch.tensor([[1, 1, 3, 5], [2, 2, 2, 2]])
    lp, tail = frequencies(ids)
    inf = float("-inf")
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), inf, math.log(0.25), math.log(0.25)],
                                                 [0.0, inf, inf, inf]]))
    assert torch.isneginf(tail).all()


def test_draws_are_sorted_seeded_per_sequence_and_follow_the_tempered_teacher():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    a = draw_tokens(logits, 8, 2.0, sequence_generator(0, "u1"))
    assert a.shape == (4000, 8) and bool((a[:, 1:] >= a[:, :-1]).all())
    assert torch.equal(a, draw_tokens(logits, 8, 2.0, sequence_generator(0, "u1")))
    assert not torch.equal(a, draw_tokens(logits, 8, 2.0, sequence_generator(0, "u2")))
    lp, _ = frequencies(a)
    p_hat = torch.zeros(4000, 4).scatter_add_(1, a, torch.full(a.shape, 1 / 8)).mean(0)
    torch.testing.assert_close(p_hat, torch.softmax(logits[0] / 2.0, -1), atol=0.01, rtol=0)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(4000))  # the distinct ids' frequencies sum to one


@pytest.mark.parametrize("draw", ["systematic", "multinomial"])
def test_both_draws_are_unbiased_and_systematic_counts_are_floor_or_ceil_of_k_p(draw):
    probs = torch.tensor([0.37, 0.0, 0.21, 0.005, 0.3, 0.115]).repeat(20000, 1)
    k = 8
    ids = draw_from(probs, k, torch.Generator().manual_seed(0), draw)
    assert ids.shape == (20000, k) and bool((ids[:, 1:] >= ids[:, :-1]).all())
    counts = torch.zeros(20000, 6).scatter_add_(1, ids, torch.ones(ids.shape))
    assert counts[:, 1].sum() == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(counts.mean(0) / k, probs[0], atol=0.005, rtol=0)
    expected = k * probs[0]
    off = ((counts < expected.floor()) | (counts > expected.ceil())).any(-1).float().mean()
    if draw == "systematic":
        assert off == 0  # each count is floor(k p) or ceil(k p): the low-variance property
        assert counts.var(0).sum() < 0.5 * (k * probs[0] * (1 - probs[0])).sum()  # below the multinomial variance
    else:
        assert off > 0.05


def test_the_store_records_its_draws_and_a_store_of_other_draws_is_not_resumed(tmp_path):
    import json

    from stillroom.teachers.store_format import MANIFEST, StoreError, legacy_fields
    from stillroom.teachers.store_writer import StoreWriter

    exs, manifest = _write(tmp_path)
    assert manifest["draw"] == "multinomial"  # the default
    del manifest["draw"]
    assert legacy_fields(manifest)["draw"] == "multinomial"  # a store written before the field: independent draws
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(manifest))
    header = make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=16, loss_temperature=1.0,
                         logprob_dtype="float16", shard_tokens=1024, signal="sampled", draw="systematic")
    with pytest.raises(StoreError, match="draw \\(store 'multinomial', run 'systematic'\\)"):
        StoreWriter(tmp_path / "store", header, exs)


def _kd_grad(teacher: TeacherSignal, logits: torch.Tensor, name: str, chunk) -> torch.Tensor:
    leaf = logits.clone().requires_grad_(True)
    mix = L.LossMix(LossConfig(terms=[LossTerm(name=name)], chunk_tokens=4))
    mix.chunk_tokens = chunk
    targets = torch.zeros(logits.shape[:2], dtype=torch.long)
    res = mix(L.StudentOutput(logits_btv=leaf), teacher, targets, torch.ones(logits.shape[:2], dtype=torch.bool))
    res.total.backward()
    return leaf.grad


@pytest.mark.parametrize("name", ["forward_kl", "soft_ce"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_the_gradient_is_q_minus_the_sample_frequencies_on_both_loss_paths(name, chunk):
    torch.manual_seed(0)
    b, t, v, k = 2, 5, 30, 12
    logits = torch.randn(b, t, v)
    ids = draw_tokens(torch.randn(b * t, v) * 2, k, 1.0, sequence_generator(0, "x")).view(b, t, k)
    lp, tail = frequencies(ids.view(-1, k))
    teacher = TeacherSignal(topk_ids_btk=ids, topk_logprobs_btk=lp.view(b, t, k), tail_logmass_bt=tail.view(b, t))
    p_hat = torch.zeros(b, t, v).scatter_add_(2, ids, torch.full(ids.shape, 1.0 / k))
    expected = torch.softmax(logits, -1) - p_hat  # the loss is a sum over positions (the loop divides once)
    torch.testing.assert_close(_kd_grad(teacher, logits, name, chunk), expected, rtol=1e-4, atol=1e-6)


def _write(tmp_path, k=16, signal="sampled"):
    exs, teacher = examples(12), FakeTeacher()

    def compute(batch):
        return [SequenceSignal(e.uid, draw_tokens(teacher.logits(e.input_ids), k, 1.0, sequence_generator(0, e.uid)),
                               torch.zeros(len(e.input_ids), k), torch.zeros(len(e.input_ids))) for e in batch]

    header = make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=k, loss_temperature=1.0,
                         logprob_dtype="float16", shard_tokens=1024, signal=signal)
    return exs, write_store(tmp_path / "store", header, exs, compute, log=lambda _m: None)


def test_a_sampled_store_holds_only_the_sorted_ids_and_reads_back_their_frequencies(tmp_path):
    from safetensors.torch import load_file

    exs, manifest = _write(tmp_path)
    assert manifest["signal"] == "sampled"
    shards = [load_file(str(tmp_path / "store" / e["file"])) for e in manifest["shards"]]
    assert all(set(s) == {"offsets", "topk_ids"} for s in shards)  # no log-probs, no tail
    assert sum(s["topk_ids"].nbytes for s in shards) == manifest["tokens"] * 16 * 2  # 2 bytes per draw at V = 300
    reader = StoreReader(tmp_path / "store")
    ids, lp, tail, _ = reader.sequence(exs[3].uid)
    torch.testing.assert_close((lp, tail), frequencies(ids))
    assert "16 tokens drawn per position" in reader.summary()


def test_a_run_must_name_the_stores_signal(tmp_path):
    from stillroom.teachers.signal import Fingerprint
    from stillroom.teachers.store_format import StoreMismatch, data_fingerprint

    exs, _ = _write(tmp_path)
    want = dict(fingerprint=Fingerprint("fake", "h", V), data_fingerprint=data_fingerprint(exs), k=16,
                loss_temperature=1.0, logprob_dtype="float16")
    reader = StoreReader(tmp_path / "store")
    reader.check_run(run_expectation(**want, signal="sampled"))
    with pytest.raises(StoreMismatch, match=r"signal \(store 'sampled', run 'topk'\): teacher.store.signal"):
        reader.check_run(run_expectation(**want))


def _cfg(**over) -> dict:
    cfg = {"name": "x", "teacher": {"model": {"path": "t"}, "source": "store", "store": {"signal": "sampled"}},
           "student": {"model": {"path": "s"}}, "data": {"sources": [{"path": "d.jsonl"}]},
           "loss": {"terms": [{"name": "forward_kl"}, {"name": "ce"}]}}
    for key, value in over.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


def test_terms_that_are_not_linear_in_the_teacher_are_refused_with_a_sampled_store():
    RunConfig.model_validate(_cfg())
    RunConfig.model_validate(_cfg(**{"loss.terms": [{"name": "soft_ce"}]}))
    with pytest.raises(ValueError, match="reverse_kl with a sampled teacher.store.signal.*forward_kl, soft_ce"):
        RunConfig.model_validate(_cfg(**{"loss.terms": [{"name": "forward_kl"}, {"name": "reverse_kl"}]}))
    # an online run ignores the store section
    RunConfig.model_validate(_cfg(**{"teacher.source": "online", "loss.terms": [{"name": "jsd"}]}))
    # a topk_sampled store is checked alike, and so is an ensemble member reading one
    with pytest.raises(ValueError, match="jsd with a sampled teacher.store.signal"):
        RunConfig.model_validate(_cfg(**{"teacher.store": {"signal": "topk_sampled"}, "loss.terms": [{"name": "jsd"}]}))
    member = {"model": {"path": "t"}, "source": "store", "store": {"path": "s1", "signal": "sampled"}}
    with pytest.raises(ValueError, match="reverse_kl with a sampled teacher.store.signal"):
        RunConfig.model_validate(_cfg(**{"teacher.source": "ensemble", "teacher.ensemble": [member, member],
                                         "teacher.store": {}, "loss.terms": [{"name": "reverse_kl"}]}))


def test_a_cross_tokenizer_run_refuses_a_sampled_store():
    from helpers import cross_recipe

    cross_recipe()  # the recipe as the cross tests build it is valid
    with pytest.raises(ValueError, match="sampled / topk_sampled works with teacher.tokenizer_mode: same"):
        cross_recipe(teacher={"source": "store", "store": {"signal": "sampled"}})


def test_tail_draws_come_from_outside_the_head_and_carry_the_tail_mass_unbiased():
    from stillroom.teachers.store_sampled import draw_tail, with_tail_draws
    from stillroom.teachers.store_sampled import topk_signal

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(3000, 1)
    ids, lp, tail = topk_signal(logits, 2, 1.0)
    draws = draw_tail(logits, ids, 8, 1.0, sequence_generator(0, "t"))
    assert not bool(torch.isin(draws, ids[0]).any()) and bool((draws[:, 1:] >= draws[:, :-1]).all())
    all_ids, all_lp, rest = with_tail_draws(ids, lp, tail, draws)
    assert all_ids.shape == (3000, 10) and torch.isneginf(rest).all()
    torch.testing.assert_close(all_lp.exp().sum(1), torch.ones(3000), rtol=1e-5, atol=1e-5)
    p_hat = torch.zeros(3000, 6).scatter_add_(1, all_ids, all_lp.exp()).mean(0)  # E over draws: the teacher
    torch.testing.assert_close(p_hat, torch.softmax(logits[0], -1), atol=0.005, rtol=0)
    torch.testing.assert_close(p_hat[:2], torch.softmax(logits[0], -1)[:2])  # the head is exact, every row


def test_a_topk_sampled_store_reads_back_the_head_and_the_drawn_tail(tmp_path):
    from safetensors.torch import load_file

    from stillroom.teachers.store_sampled import draw_tail, with_tail_draws
    from stillroom.teachers.store_sampled import topk_signal

    exs, teacher = examples(8), FakeTeacher()

    def compute(batch):
        rows = []
        for e in batch:
            logits = teacher.logits(e.input_ids)
            ids, lp, tail = topk_signal(logits, 4, 1.0)
            draws = draw_tail(logits, ids, 6, 1.0, sequence_generator(0, e.uid))
            rows.append(SequenceSignal(e.uid, ids, lp, tail, extra={"tail_ids": draws}))
        return rows

    header = make_header(exs, teacher_identity="fake", tokenizer_hash="h", vocab_size=V, k=4, loss_temperature=1.0,
                         logprob_dtype="float32", shard_tokens=100000, signal="topk_sampled", tail_draws=6)
    manifest = write_store(tmp_path / "s", header, exs, compute, log=lambda _m: None)
    shard = load_file(str(tmp_path / "s" / manifest["shards"][0]["file"]))
    assert shard["tail_ids"].shape == (manifest["tokens"], 6) and shard["tail_ids"].element_size() == 2
    reader = StoreReader(tmp_path / "s")
    ids, lp, tail, _ = reader.sequence(exs[2].uid)
    row = compute([exs[2]])[0]
    want = with_tail_draws(row.topk_ids_tk, row.topk_logprobs_tk, row.tail_logmass_t, row.extra["tail_ids"])
    torch.testing.assert_close((ids, lp, tail), want, rtol=1e-5, atol=1e-5)
    assert "6 tail tokens drawn per position" in reader.summary()
    from stillroom.data.batch import collate
    from stillroom.teachers.store_reader import StoreTeacher

    signal = StoreTeacher(reader).signal(collate(exs[:3], 0))  # a batch's rows carry the head and the draws
    assert signal.topk_ids_btk.shape[-1] == 10
    n = len(exs[1].input_ids)
    torch.testing.assert_close(signal.topk_logprobs_btk[1, :n], reader.sequence(exs[1].uid)[1])
