"""Ensembles of cross-tokenizer teachers: the average is the mixture of the members' matched distributions
(aligned where every member aligns), route takes each row from its member, and ranked probabilities do not
average (refused)."""

import pytest
import torch
from helpers import cross_recipe, cross_setup, tiny_llama

from stillroom.teachers.cross import CrossTeacher
from stillroom.teachers.ensemble import EnsembleTeacher


@pytest.fixture(scope="module")
def setup():
    vocab, batch = cross_setup()
    members = [CrossTeacher(tiny_llama(vocab.teacher_vocab, layers=2, seed=s), vocab, temperature=1.0,
                            supports=set()) for s in (3, 4)]
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
    ensemble = {"source": "ensemble", "ensemble": [{"source": "online"}] * 2}
    with pytest.raises(ValueError, match="ensemble_mode: route"):
        cross_recipe(teacher=ensemble)
    assert cross_recipe(teacher={**ensemble, "ensemble_mode": "route"}).teacher.ensemble_mode == "route"
