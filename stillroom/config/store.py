"""Run-level checks of ``teacher.store`` that read other sections (the loss terms, the tokenizer mode).

Imports the loss registry only (tensor-free), like :mod:`stillroom.config.cross`; ``config.schema`` calls
:func:`check_store_run` when a recipe loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

UNBIASED_TERMS = ("forward_kl", "soft_ce")
"""Divergences linear in the teacher's distribution: the only ones a sampled store estimates without bias
(their gradient ``(q - p_hat) / T`` has the dense gradient as its mean; :mod:`stillroom.teachers.store_sampled`)."""


SAMPLED = ("sampled", "topk_sampled")
"""Store signals that estimate part of the teacher's distribution by drawn tokens."""


def check_store_run(cfg: "RunConfig") -> None:
    """Refuse a run whose sampled store cannot give what its loss needs, naming the fix."""
    from stillroom.losses.registry import get_term

    t = cfg.teacher
    members = t.ensemble if t.source == "ensemble" else [t]
    if not any(m.store.signal in SAMPLED for m in members):
        return
    if t.tokenizer_mode == "cross":
        raise ValueError("teacher.store.signal sampled / topk_sampled works with teacher.tokenizer_mode: same; a "
                         "cross-tokenizer store needs the teacher's ranked probabilities (use teacher.store.signal: "
                         "topk)")
    if not any(m.source == "store" and m.store.signal in SAMPLED for m in members):
        return
    teacher_logit_terms = [x.name for x in cfg.loss.terms
                           if get_term(x.name).kind == "logit" and get_term(x.name).uses_teacher]
    biased = [n for n in teacher_logit_terms if n not in UNBIASED_TERMS]
    if biased:
        raise ValueError(f"loss.terms has {', '.join(biased)} with a sampled teacher.store.signal: tokens drawn from "
                         "the teacher estimate its distribution without bias only in terms linear in it "
                         f"({', '.join(UNBIASED_TERMS)}); use those terms, or teacher.store.signal: topk")
