"""Loss terms for distillation: pure functions returning (sum over counted tokens, count).

Terms are registered by name (see :func:`list_terms`); a recipe refers to them in
``loss.terms``. :class:`LossMix` combines them for the training loop. See docs/LOSSES.md.
"""

from stillroom.losses.registry import REGISTRY, TermSpec, get_term, list_terms, resolve_params
from stillroom.losses.terms import (
    DIVERGENCES,
    ce,
    forward_kl,
    jsd,
    make_logit_term,
    reverse_kl,
    run_fused_logit_terms,
    run_logit_terms,
    skew_kl,
    skew_rkl,
    soft_ce,
    taid,
    tvd,
    tvd_pp,
)
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
from stillroom.losses.mix import LossMix, LossResult, StudentOutput

__all__ = [
    "REGISTRY", "TermSpec", "get_term", "list_terms", "resolve_params", "DIVERGENCES",
    "ce", "soft_ce", "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "taid", "tvd_pp",
    "make_logit_term", "run_logit_terms", "run_fused_logit_terms",
    "squarehead", "hidden_mse", "hidden_cosine", "attention_mse",
    "uniform_layer_map", "uniform_attention_map", "resolve_layer_map",
    "TaidSchedule", "LossMix", "LossResult", "StudentOutput",
]
