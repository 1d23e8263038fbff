"""EnsembleTeacher: probability averaging (MEAL V2) over dense and top-k members, and routing."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from stillroom.data.batch import Example, collate
from stillroom.losses import forward_kl
from stillroom.teachers.ensemble import EnsembleTeacher, densify_topk
from stillroom.teachers.signal import OnlineTeacher
from stillroom.teachers.signal import Fingerprint, TeacherSignal, tail_logmass

V = 64


class Fixed:
    """A member returning fixed per-uid logits [T, V] (dense) or their top-k; counts its calls."""

    def __init__(self, seed, k=None, temperature=1.0, hidden=False, fingerprint=None):
        self.seed, self.k, self.temperature, self.hidden = seed, k, temperature, hidden
        self.fingerprint = fingerprint
        self.calls: list[list[str]] = []

    def logits(self, batch):
        rows = []
        for uid in batch.uids:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}|{uid}".encode()))
            rows.append(torch.randn(batch.input_ids.shape[1], V, generator=g) * 3)
        return torch.stack(rows)

    def signal(self, batch):
        self.calls.append(list(batch.uids))
        z = self.logits(batch)
        hidden = {2: z[..., :8].clone()} if self.hidden else {}
        if self.k is None:
            return TeacherSignal(logits_btv=z, hidden_states=hidden, fingerprint=self.fingerprint)
        lp, ids = torch.log_softmax(z / self.temperature, -1).topk(self.k)
        return TeacherSignal(topk_ids_btk=ids, topk_logprobs_btk=lp, tail_logmass_bt=tail_logmass(lp),
                             temperature=self.temperature, hidden_states=hidden, fingerprint=self.fingerprint)


def batch_of(n=4, t=6, domains=None):
    exs = [Example(input_ids=list(range(2, 2 + t)), target=[True] * t, uid=f"u{i}",
                   domain=None if domains is None else domains[i]) for i in range(n)]
    return collate(exs, pad_id=0)


def test_average_is_the_log_of_the_mean_of_probabilities():
    a, b, c = Fixed(1), Fixed(2), Fixed(3)
    batch = batch_of()
    sig = EnsembleTeacher([a, b, c], weights=[2, 1, 1]).signal(batch)
    want = (0.5 * a.logits(batch).softmax(-1) + 0.25 * b.logits(batch).softmax(-1)
            + 0.25 * c.logits(batch).softmax(-1)).log()
    torch.testing.assert_close(sig.logits_btv, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sig.logits_btv.exp().sum(-1), torch.ones(4, 6))
    only_a = EnsembleTeacher([a, b], weights=[1, 0]).signal(batch).logits_btv
    torch.testing.assert_close(only_a, torch.log_softmax(a.logits(batch), -1))
    assert len(b.calls) == 1  # a member with weight 0 is not run


def test_average_loss_equals_the_loss_engines_list_of_teachers():
    a, b = Fixed(1), Fixed(2)
    batch = batch_of()
    student = torch.randn(4, 6, V)
    mask = batch.loss_mask
    ens = EnsembleTeacher([a, b]).signal(batch)
    got, n = forward_kl(student, ens, mask)
    want, m = forward_kl(student, [a.logits(batch), b.logits(batch)], mask)
    assert n == m and float(got) == pytest.approx(float(want), rel=1e-5)


def test_topk_members_with_k_equal_v_average_exactly_like_dense_ones():
    batch = batch_of()
    dense = EnsembleTeacher([Fixed(1), Fixed(2)]).signal(batch).logits_btv
    topk = EnsembleTeacher([Fixed(1, k=V), Fixed(2, k=V)], vocab_size=V).signal(batch).logits_btv
    mixed = EnsembleTeacher([Fixed(1), Fixed(2, k=V)]).signal(batch).logits_btv
    torch.testing.assert_close(topk, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, dense, atol=1e-5, rtol=0)


def test_densify_keeps_listed_log_probs_and_spreads_the_tail_evenly():
    sig = Fixed(5, k=8).signal(batch_of(2, 3))
    full = densify_topk(sig, V)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(-1, sig.topk_ids_btk), sig.topk_logprobs_btk)
    outside = full.exp().sum(-1) - sig.topk_logprobs_btk.exp().sum(-1)
    torch.testing.assert_close(outside, sig.tail_logmass_bt.exp(), atol=1e-5, rtol=0)
    one_other = full.scatter(-1, sig.topk_ids_btk, -math.inf).max(-1).values
    torch.testing.assert_close(one_other, sig.tail_logmass_bt - math.log(V - 8))


def test_route_by_domain_runs_each_member_on_its_rows_only():
    a, b = Fixed(1, hidden=True), Fixed(2, hidden=True)
    batch = batch_of(domains=["1", "prose", "1", "prose"])
    ens = EnsembleTeacher([a, b], mode="route", route_field="domain", routes={"prose": 0})
    sig = ens.signal(batch)
    assert a.calls == [["u1", "u3"]] and b.calls == [["u0", "u2"]]
    full_a, full_b = a.logits(batch), b.logits(batch)
    torch.testing.assert_close(sig.logits_btv[[1, 3]], full_a[[1, 3]])
    torch.testing.assert_close(sig.logits_btv[[0, 2]], full_b[[0, 2]])
    torch.testing.assert_close(sig.hidden_states[2][[0, 2]], full_b[[0, 2]][..., :8])


def test_route_keeps_topk_form_and_mixes_forms_as_log_probs():
    batch = batch_of(domains=["0", "1", "1", "0"])
    topk = EnsembleTeacher([Fixed(1, k=4), Fixed(2, k=4)], mode="route").signal(batch)
    assert topk.is_topk and topk.topk_ids_btk.shape == (4, 6, 4)
    ref = Fixed(2, k=4).signal(batch)
    assert torch.equal(topk.topk_ids_btk[1], ref.topk_ids_btk[1])
    mixed = EnsembleTeacher([Fixed(1), Fixed(2, k=4)], mode="route", vocab_size=V).signal(batch)
    assert mixed.is_dense
    torch.testing.assert_close(mixed.logits_btv[0], torch.log_softmax(Fixed(1).logits(batch)[0], -1))
    torch.testing.assert_close(mixed.logits_btv[1], densify_topk(ref, V)[1])


def test_route_by_uid_and_member_names():
    batch = batch_of(2)
    a, b = Fixed(1), Fixed(2)
    EnsembleTeacher([a, b], mode="route", route_field="uid", routes={"u0": 1, "u1": 0}).signal(batch)
    assert a.calls == [["u1"]] and b.calls == [["u0"]]
    a2, b2 = Fixed(1), Fixed(2)
    EnsembleTeacher([a2, b2], mode="route", names=["math", "prose"]).signal(batch_of(2, domains=["prose"] * 2))
    assert a2.calls == [] and b2.calls == [["u0", "u1"]]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="names no member"):
        EnsembleTeacher([Fixed(1), Fixed(2)], mode="route").signal(batch_of(domains=["7", "0", "0", "0"]))
    with pytest.raises(ValueError, match="names no member"):
        EnsembleTeacher([Fixed(1)], mode="route").signal(batch_of())  # no domain labels
    with pytest.raises(ValueError, match="temperature 2.0"):
        EnsembleTeacher([Fixed(1), Fixed(2, k=4, temperature=2.0)]).signal(batch_of())
    with pytest.raises(ValueError, match="weights"):
        EnsembleTeacher([Fixed(1), Fixed(2)], weights=[1, -1])
    with pytest.raises(ValueError, match="route_field"):
        EnsembleTeacher([Fixed(1)], mode="route", route_field="topic")
    with pytest.raises(ValueError, match="vocab_size"):
        EnsembleTeacher([Fixed(1, k=4)]).signal(batch_of())
    f1 = Fingerprint("a", "h1", V)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        EnsembleTeacher([Fixed(1, fingerprint=f1), Fixed(2, fingerprint=Fingerprint("b", "h2", V))])
    ens = EnsembleTeacher([Fixed(1, fingerprint=f1), Fixed(2, fingerprint=Fingerprint("b", "h1", V))])
    assert ens.fingerprint.tokenizer_hash == "h1" and ens.vocab_size == V and "a|b" in ens.fingerprint.teacher


def test_works_with_online_and_store_teachers(tmp_path):
    from stillroom.teachers.store_reader import StoreReader, StoreTeacher
    from stillroom.teachers.store_writer import make_header, model_compute, write_store

    tok = tiny_tokenizer()
    vocab = len(tok)
    m1, m2 = tiny_llama(vocab, layers=2, seed=1), tiny_llama(vocab, layers=2, seed=2)
    g = torch.Generator().manual_seed(0)
    examples = [Example(input_ids=torch.randint(4, vocab, (n,), generator=g).tolist(), target=[True] * n,
                        uid=f"e{i}") for i, n in enumerate([7, 5, 6])]
    header = make_header(examples, teacher_identity="m2", tokenizer_hash="h", vocab_size=vocab, k=vocab,
                         loss_temperature=1.0, logprob_dtype="float32", shard_tokens=1024)
    write_store(tmp_path / "s", header, examples, model_compute(m2, k=vocab, loss_temperature=1.0, vocab_size=vocab,
                                                                  pad_id=1), log=lambda _: None)
    batch = collate(examples, pad_id=1)
    online1, online2 = OnlineTeacher(m1, vocab_size=vocab), OnlineTeacher(m2, vocab_size=vocab)
    store2 = StoreTeacher(StoreReader(tmp_path / "s"))
    want = EnsembleTeacher([online1, online2]).signal(batch).logits_btv
    got = EnsembleTeacher([online1, store2], vocab_size=vocab).signal(batch).logits_btv
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


def test_ensemble_from_run_builds_members_from_the_config():
    from stillroom.config.schema import TeacherConfig
    from stillroom.teachers.ensemble import ensemble_from_run

    cfg = TeacherConfig.model_validate({"source": "ensemble", "ensemble_mode": "route", "route_field": "domain",
                                        "ensemble": [{"source": "online"}, {"source": "store"}]})
    built = []
    ens = ensemble_from_run(cfg, lambda m, i: built.append(m.source) or Fixed(i), vocab_size=V)
    assert built == ["online", "store"] and ens.mode == "route"
    sig = ens.signal(batch_of(2, domains=["1", "0"]))
    torch.testing.assert_close(sig.logits_btv[0], Fixed(1).logits(batch_of(2))[0])
    with pytest.raises(ValueError, match="teacher.ensemble"):
        ensemble_from_run(TeacherConfig(source="ensemble"), lambda m, i: Fixed(i))
