"""Per-row divergences between two distributions given as log-probabilities.

Everything here works on the last axis: ``logp_nv`` (teacher, ``p``) and
``logq_nv`` (student, ``q``) are ``[N, V]`` log-probabilities (or ``[N, K+1]``
bins of a top-k teacher, see :mod:`stillroom.losses.sparse`) and every function
returns ``[N]`` per-row values. No reduction over rows happens here.

Zero-probability entries (``-inf`` log-probabilities, e.g. padded vocabulary
rows or banned tokens) are handled explicitly so that ``0 * log 0`` is 0 and no
NaN appears in the value *or* the gradient: the inputs are sanitised before the
products (``where`` alone would still leak NaN into the backward pass).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def sanitize_logits(z: torch.Tensor) -> torch.Tensor:
    """Map ``+inf``/``-inf`` logits to ``-inf``: an infinite logit marks an entry that is not
    part of the distribution (vocabulary padding, banned token). NaN is left alone: it is a bug."""
    return z.masked_fill(torch.isinf(z), NEG_INF)


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


def forward_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q), per row."""
    return kl_terms(logp, logq).sum(-1)


def reverse_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p), per row."""
    return kl_terms(logq, logp).sum(-1)


def jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD of GKD: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    beta = 0 is defined as KL(p||q) and beta = 1 as KL(q||p) (TRL's convention; the
    formula itself would vanish at both ends).
    """
    if beta == 0.0:
        return forward_kl(logp, logq)
    if beta == 1.0:
        return reverse_kl(logp, logq)
    logm = log_mix(logp, logq, beta)
    return beta * kl_terms(logp, logm).sum(-1) + (1.0 - beta) * kl_terms(logq, logm).sum(-1)


def tvd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p - q|, per row."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skew_kl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return kl_terms(logp, log_mix(logp, logq, alpha)).sum(-1)


def skew_rkl(logp: torch.Tensor, logq: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) p + alpha q)."""
    return kl_terms(logq, log_mix(logp, logq, 1.0 - alpha)).sum(-1)


def soft_ce(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
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


def taid(logp: torch.Tensor, logq: torch.Tensor, t: float) -> torch.Tensor:
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


def tvd_pp(logp: torch.Tensor, logq: torch.Tensor, *, eps: float = 1e-5, weighting: str = "expectation",
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
    value = tvd(logp, logq).detach()
    return value + (surrogate - surrogate.detach())
