"""Loss terms for distillation: pure functions returning (sum over counted tokens, count).

Terms are registered by name, one :class:`TermSpec` each (see :func:`list_terms`); a recipe
refers to them in ``loss.terms``. :class:`LossMix` combines them for the training loop.
See docs/LOSSES.md.
"""

from stillroom.losses.registry import REGISTRY, BatchStats, TermSpec, divergences, get_term, list_terms, resolve_params
from stillroom.losses.engine import run_fused_logit_terms, run_logit_terms
from stillroom.losses.logit import define, make_logit_term
from stillroom.losses.terms import (
    ce,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_rkl,
    soft_ce,
    taid,
    tvd,
    tvd_pp,
)
from stillroom.losses.uld import uld
from stillroom.losses.hidden import (
    attention_mse,
    hidden_cosine,
    hidden_mse,
    resolve_layer_map,
    squarehead,
    uniform_attention_map,
    uniform_layer_map,
)
from stillroom.losses.schedule import TaidSchedule
from stillroom.losses.mix import LossMix, LossResult, OutputHead, StudentOutput, TiedHeadGrad

DIVERGENCES = divergences()
"""Registered terms that are divergences (zero iff the distributions are equal), from the specs."""

__all__ = [
    "REGISTRY", "TermSpec", "BatchStats", "get_term", "list_terms", "resolve_params", "divergences", "DIVERGENCES",
    "define", "ce", "soft_ce", "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "taid", "tvd_pp", "uld",
    "make_logit_term", "run_logit_terms", "run_fused_logit_terms",
    "squarehead", "hidden_mse", "hidden_cosine", "attention_mse",
    "uniform_layer_map", "uniform_attention_map", "resolve_layer_map",
    "TaidSchedule", "LossMix", "LossResult", "OutputHead", "StudentOutput", "TiedHeadGrad",
]
