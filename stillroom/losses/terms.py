"""The logit-level loss terms: one spec each (kernel, parameters, validation, what it needs).

Each ``name = define(TermSpec(...))`` below is the whole definition of a term: it registers
the spec (so recipes can name it) and returns its public function
``name(student_logits, teacher, mask, *, <args>, loss_temperature=1.0,
scale_by_temperature_squared=False, chunk_tokens=None) -> (sum, count)``
(see :mod:`stillroom.losses.logit` for the shared contract).

A kernel ``kernel(ctx, stats, **args) -> [N]`` gets a :class:`~stillroom.losses.engine.ChunkContext`
for ``N`` counted rows (``ctx.pair`` = (teacher, student) log-probs ``[N, V]`` or top-k bins
``[N, K+1]``; ``ctx.t_logp``/``ctx.s_logp`` dense ``[N, V]``) and returns per-row values.
"""

from __future__ import annotations

import math

import torch

from stillroom.losses import functional as Fn
from stillroom.losses.logit import define
from stillroom.losses.registry import BatchStats, TermSpec, all_of, non_negative, one_of, unit_interval
from stillroom.losses.schedule import TaidSchedule

# ---------------------------------------------------------------- kernels


def _ce(ctx, _stats):
    if ctx.target_n is None:
        raise ValueError("loss term 'ce' needs target_ids [B, T]")
    return torch.nn.functional.nll_loss(ctx.s_logp_t1, ctx.target_n.long(), ignore_index=-100, reduction="none")


def _soft_ce(ctx, _stats):
    return Fn.soft_ce(*ctx.pair)


def _divergence(fn):
    """Kernel of a divergence ``fn(logp, logq, **args) -> [N]``; rounding below 0 is clamped."""

    def kernel(ctx, _stats, **args):
        return fn(*ctx.pair, **args).clamp_min(0.0)

    return kernel


def _taid(ctx, _stats, *, t):
    if ctx.teacher.topk is not None:
        raise ValueError("loss term 'taid' needs dense teacher logits (its target interpolates logits)")
    return Fn.taid(ctx.t_logp, ctx.s_logp, t).clamp_min(0.0)


def _tvd_pp(ctx, stats, *, eps, weighting, scope):
    return Fn.tvd_pp(*ctx.pair, eps=eps, weighting=weighting, stats=stats)


def _tvd_pp_batch_stats(args) -> BatchStats | None:
    """scope="batch": mu and sigma (unbiased) of r over every counted (token, v) entry of the micro-batch."""
    if args["scope"] != "batch":
        return None

    def finish(s):
        total, n = float(s[0]), float(s[1])
        mu = total / max(n, 1.0)
        var = (total - total * total / n) / (n - 1.0) if n > 1 else 0.0
        return mu, math.sqrt(max(var, 0.0))

    return BatchStats(prepass=lambda ctx: Fn.tvd_pp_stats(*ctx.pair), finish=finish)


def _taid_state(p) -> TaidSchedule:
    return TaidSchedule(p["t_start"], p["t_end"], p["alpha"], p["beta"], p["adaptive"])


# ---------------------------------------------------------------- terms (registration order = DIVERGENCES order)

ce = define(TermSpec(
    "ce", "logit", _ce, uses_teacher=False, sparse_ok=True, uses_targets=True,
    doc="""Cross-entropy on hard labels: sum over counted tokens of -log q(target) (softmax at T = 1).

    ``target_ids`` ``[B, T]``: the token each position predicts, -100 where ignored (contributes 0).
    ``teacher`` is ignored (may be None). ``loss_temperature`` does not apply: CE is on the raw model.
    """))

soft_ce = define(TermSpec(
    "soft_ce", "logit", _soft_ce, sparse_ok=True,
    doc="""Soft cross-entropy -sum_v p(v) log q(v) = H(p) + KL(p||q) (not zero at p = q: it is a CE).

    With a list of teachers, p is the average of their probabilities (MEAL V2, Shen & Savvides 2020).
    """))

forward_kl = define(TermSpec(
    "forward_kl", "logit", _divergence(Fn.forward_kl), divergence=True, sparse_ok=True,
    doc="""Forward KL(p || q) = sum_v p (log p - log q), p teacher, q student (Hinton et al. 2015)."""))

reverse_kl = define(TermSpec(
    "reverse_kl", "logit", _divergence(Fn.reverse_kl), divergence=True, sparse_ok=True,
    doc="""Reverse KL(q || p) = sum_v q (log q - log p), mode-seeking (MiniLLM, Gu et al. 2024)."""))

jsd = define(TermSpec(
    "jsd", "logit", _divergence(Fn.jsd), {"beta": 0.5}, unit_interval("beta"), divergence=True, sparse_ok=True,
    doc="""Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    log m by logsumexp. beta = 0 is exactly KL(p||q), beta = 1 exactly KL(q||p) (TRL). Default beta 0.5.
    """))

tvd = define(TermSpec(
    "tvd", "logit", _divergence(Fn.tvd), divergence=True, sparse_ok=True,
    doc="""Total variation distance 0.5 sum_v |p - q| (= 1 - speculative acceptance rate)."""))

skew_kl = define(TermSpec(
    "skew_kl", "logit", _divergence(Fn.skew_kl), {"alpha": 0.1}, unit_interval("alpha"), divergence=True,
    sparse_ok=True,
    doc="""Skew KL (DistiLLM, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q); default alpha 0.1."""))

skew_rkl = define(TermSpec(
    "skew_rkl", "logit", _divergence(Fn.skew_rkl), {"alpha": 0.1}, unit_interval("alpha"), divergence=True,
    sparse_ok=True,
    doc="""Skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q); default alpha 0.1."""))

taid = define(TermSpec(
    "taid", "logit", _taid, {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True},
    all_of(unit_interval("t"), TaidSchedule.check), divergence=True, args={"t": 0.4}, state=_taid_state,
    doc="""TAID (Shing et al. 2025): KL(p_t || q), p_t = softmax((1 - t) sg(z_s) + t z_T) (dense teacher only).

    ``t`` comes from :class:`~stillroom.losses.schedule.TaidSchedule` in a training run; the recipe
    params of a ``taid`` term configure that schedule: t_start 0.4, t_end 1.0, alpha 5e-4,
    beta 0.99, adaptive True (the official code's defaults). The schedule is fed this term's own
    loss per token after each optimizer step.
    """))

tvd_pp = define(TermSpec(
    "tvd_pp", "logit", _tvd_pp, {"eps": 1e-5, "weighting": "expectation", "scope": "position"},
    all_of(non_negative("eps"), one_of("weighting", ("expectation", "unweighted")),
           one_of("scope", ("position", "batch"))),
    divergence=True, sparse_ok=True, batch_stats=_tvd_pp_batch_stats,
    doc="""TVD++ (Goel et al. 2024): value TVD(p, q); gradient -E_q[r_hat grad log q], r = 1[p > q].

    r_hat = (r - mu) / (sigma + eps); ``scope``: "position" (mu, sigma over V per token, default)
    or "batch" (over all counted (token, v) entries of the call: per micro-batch and per process,
    so with gradient accumulation or several processes they differ slightly from one big batch);
    ``weighting``: "expectation" (surrogate -sum_v sg(r_hat) q, default) or "unweighted"
    (-mean_v sg(r_hat) log q, a different objective).
    """))
