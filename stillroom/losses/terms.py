"""The logit-level loss terms, each in one place: its per-row math, its kernel and its spec.

Each ``name = define(TermSpec(...))`` below is the whole definition of a term: it registers
the spec (so recipes can name it) and returns its public function
``name(student_logits, teacher, mask, *, <args>, loss_temperature=1.0,
scale_by_temperature_squared=False, chunk_tokens=None) -> (sum, count)``
(see :mod:`stillroom.losses.logit` for the shared contract).

A kernel ``kernel(ctx, stats, **args) -> [N]`` gets a :class:`~stillroom.losses.engine.ChunkContext`
for ``N`` counted rows (``ctx.pair`` = (teacher, student) log-probs ``[N, V]`` or top-k bins
``[N, K+1]``; ``ctx.t_logp``/``ctx.s_logp`` dense ``[N, V]``) and returns per-row values.

The per-row math (``*_rows``) works on the last axis: ``logp`` (teacher, ``p``) and ``logq``
(student, ``q``) are ``[N, V]`` log-probabilities (or ``[N, K+1]`` bins of a top-k teacher,
see :mod:`stillroom.losses.sparse`) and every function returns ``[N]`` per-row values; no
reduction over rows happens here. Zero-probability entries (``-inf`` log-probabilities, e.g.
padded vocabulary rows or banned tokens) are handled explicitly so that ``0 * log 0`` is 0 and
no NaN appears in the value *or* the gradient: the inputs are sanitised before the products
(``where`` alone would still leak NaN into the backward pass).
"""
from __future__ import annotations

import math

import torch

from stillroom.losses import closed_form
from stillroom.losses.logit import define
from stillroom.losses.registry import BatchStats, TermSpec, all_of, non_negative, one_of, unit_interval
from stillroom.losses.schedule import TaidSchedule
from stillroom.losses.targets import MixedTargets, mixed_nll

# ---------------------------------------------------------------- per-row math

NEG_INF = float("-inf")


def kl_terms(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """Elementwise ``a * (log a - log b)``, exactly 0 where ``a == 0``. Shape of the inputs."""
    zero = torch.isneginf(loga)
    if not zero.any():  # the common case: skip three [N, V] copies
        return loga.exp() * (loga - logb)
    la = loga.masked_fill(zero, 0.0)
    lb = logb.masked_fill(zero, 0.0)
    return (la.exp() * (la - lb)).masked_fill(zero, 0.0)


def ce_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-p * log q``, exactly 0 where ``p == 0``."""
    zero = torch.isneginf(logp)
    if not zero.any():
        return -(logp.exp() * logq)
    lp = logp.masked_fill(zero, 0.0)
    lq = logq.masked_fill(zero, 0.0)
    return (-(lp.exp() * lq)).masked_fill(zero, 0.0)


def log_mix(loga: torch.Tensor, logb: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` via logaddexp (never ``log`` of a sum).

    Entries where both ``a`` and ``b`` are 0 give ``-inf`` with a zero (not NaN) gradient.
    """
    if weight_a == 1.0:
        return loga
    if weight_a == 0.0:
        return logb
    both = torch.isneginf(loga) & torch.isneginf(logb)
    if not both.any():
        return torch.logaddexp(loga + math.log(weight_a), logb + math.log1p(-weight_a))
    la = loga.masked_fill(both, 0.0)
    lb = logb.masked_fill(both, 0.0)
    mix = torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))
    return mix.masked_fill(both, NEG_INF)


def forward_kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q), per row."""
    return kl_terms(logp, logq).sum(-1)


def reverse_kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p), per row."""
    return kl_terms(logq, logp).sum(-1)


def jsd_rows(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD of GKD: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    beta = 0 is defined as KL(p||q) and beta = 1 as KL(q||p) (TRL's convention; the
    formula itself would vanish at both ends).
    """
    if beta == 0.0:
        return forward_kl_rows(logp, logq)
    if beta == 1.0:
        return reverse_kl_rows(logp, logq)
    logm = log_mix(logp, logq, beta)
    return beta * kl_terms(logp, logm).sum(-1) + (1.0 - beta) * kl_terms(logq, logm).sum(-1)


def tvd_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p - q|, per row."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skew_kl_rows(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return kl_terms(logp, log_mix(logp, logq, alpha)).sum(-1)


def skew_rkl_rows(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q)."""
    return kl_terms(logq, log_mix(logp, logq, 1.0 - alpha)).sum(-1)


def soft_ce_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets: -sum_v p log q = H(p) + KL(p||q), per row."""
    return ce_terms(logp, logq).sum(-1)


def taid_target(logp: torch.Tensor, logq: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t with p_t = softmax((1 - t) sg(log q) + t log p) (TAID's logit-space interpolation).

    Interpolating normalised log-probabilities equals interpolating the logits
    (per-row constants cancel in the softmax) and avoids ``0 * inf`` at t in {0, 1}.
    Returns detached ``[N, V]`` log-probabilities.
    """
    logq = logq.detach()
    if t >= 1.0:
        return logp.detach()
    if t <= 0.0:
        return logq
    both = torch.isneginf(logp) | torch.isneginf(logq)
    mixed = (1.0 - t) * logq.masked_fill(both, 0.0) + t * logp.masked_fill(both, 0.0)
    return torch.log_softmax(mixed.masked_fill(both, NEG_INF), dim=-1).detach()


def taid_rows(logp: torch.Tensor, logq: torch.Tensor, t: float) -> torch.Tensor:
    """TAID: KL(p_t || q) with the interpolated, detached target p_t (see :func:`taid_target`)."""
    return kl_terms(taid_target(logp, logq, t), logq).sum(-1)


def tvd_pp_reward(logp: torch.Tensor, logq: torch.Tensor, eps: float,
                  stats: tuple[float, float] | None = None) -> torch.Tensor:
    """Normalised TVD++ reward r_hat = (r - mu) / (sigma + eps), r = 1[p > q] (no gradient).

    ``stats=None``: mu and sigma (unbiased std) per row over the entries that are not zero
    in both distributions (padding and an empty top-k tail bin are left out, so k = V
    matches dense); otherwise ``stats = (mu, sigma)`` computed over the whole micro-batch
    by :func:`tvd_pp_stats`. r_hat is 0 on left-out entries.
    """
    with torch.no_grad():
        valid = ~(torch.isneginf(logp) & torch.isneginf(logq))
        r = (logp > logq).to(logq.dtype)
        if stats is None:
            n = valid.sum(-1, keepdim=True).to(r.dtype)
            mu = r.sum(-1, keepdim=True) / n.clamp(min=1)
            var = ((r - mu).pow(2) * valid).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
            sigma = var.sqrt()
        else:
            mu, sigma = stats
        return ((r - mu) / (sigma + eps)).masked_fill(~valid, 0.0)


def tvd_pp_stats(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Sufficient statistics ``[sum r, number of entries]`` (float64) for the batch-scope reward."""
    valid = ~(torch.isneginf(logp) & torch.isneginf(logq))
    r = (logp > logq) & valid
    return torch.stack([r.sum().double(), valid.sum().double()])


def tvd_pp_rows(logp: torch.Tensor, logq: torch.Tensor, *, eps: float = 1e-5, weighting: str = "expectation",
           stats: tuple[float, float] | None = None) -> torch.Tensor:
    """TVD++ (Goel et al. 2024): value = TVD(p, q), gradient = the variance-reduced policy gradient.

    Surrogate per row: ``-sum_v sg(r_hat) q`` (weighting="expectation", default) or
    ``-mean_v sg(r_hat) log q`` (weighting="unweighted", a different objective). The
    returned value is ``TVD.detach() + surrogate - surrogate.detach()`` so logs show the
    TVD (zero iff p == q) while backward follows TVD++.
    """
    r_hat = tvd_pp_reward(logp, logq, eps, stats)
    if weighting == "expectation":
        surrogate = -(r_hat * logq.exp()).sum(-1)
    else:
        finite = ~torch.isneginf(logq)
        surrogate = -(r_hat * logq.masked_fill(~finite, 0.0)).sum(-1) / finite.sum(-1).clamp(min=1)
    value = tvd_rows(logp, logq).detach()
    return value + (surrogate - surrogate.detach())


# ---------------------------------------------------------------- kernels


def _ce(ctx, _stats):
    if ctx.target_n is None:
        raise ValueError("loss term 'ce' needs target_ids [B, T]")
    if isinstance(ctx.target_n, MixedTargets):  # mixed inputs: lam * CE(first) + (1 - lam) * CE(second)
        return mixed_nll(ctx.s_logp_t1, ctx.target_n)
    return torch.nn.functional.nll_loss(ctx.s_logp_t1, ctx.target_n.long(), ignore_index=-100, reduction="none")


def _soft_ce(ctx, _stats):
    return soft_ce_rows(*ctx.pair)


def _divergence(fn):
    """Kernel of a divergence ``fn(logp, logq, **args) -> [N]``; rounding below 0 is clamped."""

    def kernel(ctx, _stats, **args):
        return fn(*ctx.pair, **args).clamp_min(0.0)

    return kernel


def _taid(ctx, _stats, *, t):
    if ctx.teacher.topk is not None:
        raise ValueError("loss term 'taid' needs dense teacher logits (its target interpolates logits)")
    return taid_rows(ctx.t_logp, ctx.s_logp, t).clamp_min(0.0)


def _tvd_pp(ctx, stats, *, eps, weighting, scope):
    return tvd_pp_rows(*ctx.pair, eps=eps, weighting=weighting, stats=stats)


def _tvd_pp_batch_stats(args) -> BatchStats | None:
    """scope="batch": mu and sigma (unbiased) of r over every counted (token, v) entry of the micro-batch."""
    if args["scope"] != "batch":
        return None

    def finish(s):
        total, n = float(s[0]), float(s[1])
        mu = total / max(n, 1.0)
        var = (total - total * total / n) / (n - 1.0) if n > 1 else 0.0
        return mu, math.sqrt(max(var, 0.0))

    return BatchStats(prepass=lambda ctx: tvd_pp_stats(*ctx.pair), finish=finish)


def _taid_state(p) -> TaidSchedule:
    return TaidSchedule(p["t_start"], p["t_end"], p["alpha"], p["beta"], p["adaptive"])


# ---------------------------------------------------------------- terms (registration order = DIVERGENCES order)

ce = define(TermSpec(
    "ce", "logit", _ce, uses_teacher=False, sparse_ok=True, uses_targets=True,
    closed_form=closed_form.ce,
    doc="""Cross-entropy on hard labels: sum over counted tokens of -log q(target) (softmax at T = 1).

    ``target_ids`` ``[B, T]``: the token each position predicts, -100 where ignored (contributes 0).
    Or :class:`~stillroom.losses.targets.MixedTargets` (mixed images): ``lam * CE(first) + (1 - lam) * CE(second)``.
    ``teacher`` is ignored (may be None). ``loss_temperature`` does not apply: CE is on the raw model.
    """))

soft_ce = define(TermSpec(
    "soft_ce", "logit", _soft_ce, sparse_ok=True,
    closed_form=closed_form.soft_ce,
    doc="""Soft cross-entropy -sum_v p(v) log q(v) = H(p) + KL(p||q) (not zero at p = q: it is a CE).

    With a list of teachers, p is the average of their probabilities (MEAL V2, Shen & Savvides 2020).
    """))

forward_kl = define(TermSpec(
    "forward_kl", "logit", _divergence(forward_kl_rows), divergence=True, sparse_ok=True,
    closed_form=closed_form.forward_kl,
    doc="""Forward KL(p || q) = sum_v p (log p - log q), p teacher, q student (Hinton et al. 2015)."""))

reverse_kl = define(TermSpec(
    "reverse_kl", "logit", _divergence(reverse_kl_rows), divergence=True, sparse_ok=True,
    closed_form=closed_form.reverse_kl,
    doc="""Reverse KL(q || p) = sum_v q (log q - log p), mode-seeking (MiniLLM, Gu et al. 2024)."""))

jsd = define(TermSpec(
    "jsd", "logit", _divergence(jsd_rows), {"beta": 0.5}, unit_interval("beta"), divergence=True, sparse_ok=True,
    closed_form=closed_form.jsd,
    doc="""Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    log m by logsumexp. beta = 0 is exactly KL(p||q), beta = 1 exactly KL(q||p) (TRL). Default beta 0.5.
    """))

tvd = define(TermSpec(
    "tvd", "logit", _divergence(tvd_rows), divergence=True, sparse_ok=True,
    doc="""Total variation distance 0.5 sum_v |p - q| (= 1 - speculative acceptance rate)."""))

skew_kl = define(TermSpec(
    "skew_kl", "logit", _divergence(skew_kl_rows), {"alpha": 0.1}, unit_interval("alpha"), divergence=True,
    sparse_ok=True,
    doc="""Skew KL (DistiLLM, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q); default alpha 0.1."""))

skew_rkl = define(TermSpec(
    "skew_rkl", "logit", _divergence(skew_rkl_rows), {"alpha": 0.1}, unit_interval("alpha"), divergence=True,
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
