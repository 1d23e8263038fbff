"""Ensembles of cross-tokenizer teachers: the average is the mixture of the members' matched distributions
(aligned where every member aligns), route takes each row from its member, and ranked probabilities do not
average (refused)."""

import pytest
import torch
from helpers import other_tokenizer, tiny_llama, tiny_tokenizer

from stillroom.data.batch import Example, collate
from stillroom.teachers.cross import CrossTeacher
from stillroom.teachers.cross_align import cross_vocab
from stillroom.teachers.ensemble import EnsembleTeacher

TEXTS = ["The quick brown fox, déjà vu.", "def f(x):\n    return x * 2", "Attribute references"]


@pytest.fixture(scope="module")
def setup():
    student, teacher_tok = other_tokenizer(400), tiny_tokenizer()
    vocab = cross_vocab(student, teacher_tok, student_vocab=len(student), teacher_vocab=len(teacher_tok))
    rows = [student(t)["input_ids"] + [student.eos_token_id] for t in TEXTS]
    batch = collate([Example(ids, [False] + [True] * (len(ids) - 1), f"u{i}", domain=str(i % 2))
                     for i, ids in enumerate(rows)], student.pad_token_id)
    members = [CrossTeacher(tiny_llama(len(teacher_tok), layers=2, seed=s), vocab, temperature=1.0, supports=set())
               for s in (3, 4)]
    return vocab, members, batch


def test_average_is_the_mixture_of_matched_distributions(setup):
    vocab, members, batch = setup
    got = EnsembleTeacher(members, weights=[3.0, 1.0]).signal(batch).cross
    a, b = (m.signal(batch).cross for m in members)
    assert torch.equal(got.aligned_bt, a.aligned_bt & b.aligned_bt)
    on = got.aligned_bt
    want = 0.75 * torch.softmax(a.matched_logits_btm[on], -1) + 0.25 * torch.softmax(b.matched_logits_btm[on], -1)
    assert torch.allclose(torch.softmax(got.matched_logits_btm[on], -1), want, atol=1e-6)
    assert not torch.allclose(want, torch.softmax(a.matched_logits_btm[on], -1), rtol=1e-2, atol=0)  # members differ


def test_route_takes_each_row_from_its_member(setup):
    vocab, members, batch = setup
    got = EnsembleTeacher(members, mode="route").signal(batch).cross
    for b in range(batch.input_ids.shape[0]):
        own = members[b % 2].signal(batch.select([b])).cross
        assert torch.equal(got.aligned_bt[b], own.aligned_bt[0])
        assert torch.allclose(got.matched_logits_btm[b], own.matched_logits_btm[0])


def test_ranked_probabilities_do_not_average(setup):
    vocab, members, batch = setup
    ranked = [CrossTeacher(m.model, vocab, temperature=1.0, supports={"all"}) for m in members]
    with pytest.raises(ValueError, match="ensemble_mode: route"):
        EnsembleTeacher(ranked).signal(batch)
    routed = EnsembleTeacher(ranked, mode="route").signal(batch).cross
    assert routed.ranked["all"][0].shape[:2] == batch.input_ids.shape


def test_recipes_refuse_ranked_terms_on_an_averaged_ensemble():
    from stillroom.config.schema import RunConfig

    base = {"teacher": {"tokenizer_mode": "cross", "source": "ensemble", "ensemble": [{"source": "online"}] * 2},
            "student": {"from_config": {"num_hidden_layers": 1}, "tokenizer": "some/folder"},
            "loss": {"terms": [{"name": "uld", "params": {"support": "all"}}]}}
    with pytest.raises(ValueError, match="ensemble_mode: route"):
        RunConfig.model_validate(base)
    routed = RunConfig.model_validate({**base, "teacher": {**base["teacher"], "ensemble_mode": "route"}})
    assert routed.teacher.ensemble_mode == "route"
