"""``teacher.store.signal: auto``: chosen from the loss terms when the recipe loads (topk_sampled where every
teacher-logit term is linear in the teacher, else topk), so the writer, the manifest and the reader's check all
see the chosen signal; never the default."""

from __future__ import annotations

import pytest

from stillroom.config.schema import RunConfig
from stillroom.config.store import StoreConfig


def _cfg(terms, **teacher) -> RunConfig:
    t = {"model": {"path": "t"}, "source": "store", "store": {"signal": "auto"}, **teacher}
    return RunConfig.model_validate({"name": "x", "teacher": t, "student": {"model": {"path": "s"}},
                                     "data": {"sources": [{"path": "d.jsonl"}]},
                                     "loss": {"terms": [{"name": n} for n in terms]}})


@pytest.mark.parametrize("terms, chosen", [
    (["forward_kl"], "topk_sampled"), (["forward_kl", "ce"], "topk_sampled"), (["soft_ce"], "topk_sampled"),
    (["forward_kl", "reverse_kl"], "topk"), (["jsd"], "topk"), (["ce"], "topk"),  # no teacher term: topk serves all
])
def test_auto_is_topk_sampled_only_when_every_teacher_logit_term_is_linear_in_the_teacher(terms, chosen):
    cfg = _cfg(terms)
    assert cfg.teacher.store.signal == chosen
    again = RunConfig.model_validate(cfg.model_dump())  # what config.resolved.yaml holds loads to the same
    assert again.teacher.store.signal == chosen


def test_auto_resolves_the_ensemble_members_and_the_memo_too():
    member = {"model": {"path": "t"}, "source": "store", "store": {"path": "s1", "signal": "auto"}}
    cfg = _cfg(["forward_kl"], source="ensemble", ensemble=[member, {**member, "store": {"path": "s2"}}])
    assert [m.store.signal for m in cfg.teacher.ensemble] == ["topk_sampled", "topk"]  # the second says topk
    memo = _cfg(["jsd"], source="online", memo=True)
    assert memo.teacher.store.signal == "topk"


def test_auto_is_topk_for_a_cross_tokenizer_teacher_and_never_the_default():
    from helpers import cross_recipe

    cfg = cross_recipe(teacher={"source": "store", "store": {"signal": "auto"}})
    assert cfg.teacher.store.signal == "topk"
    assert StoreConfig().signal == "topk"
