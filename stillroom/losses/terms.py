"""Logit-level loss terms: the public functions and their registration.

Every term has the signature ``term(student_logits, teacher, mask, **params) -> (sum, count)``:

* ``student_logits``: ``[B, T, V]`` (any float dtype; math runs in fp32, fp64 if given fp64);
* ``teacher``: dense logits ``[B, T, V]``, a :class:`~stillroom.teachers.signal.TeacherSignal`
  (dense or top-k with tail mass), or a list of dense logits (their probabilities are averaged);
* ``mask``: ``[B, T]`` bool, True where a token counts. Positions are already aligned.

It returns the fp32 scalar **sum** over counted tokens and the ``int`` count (``mask.sum()``);
it never averages. Shared keyword parameters: ``loss_temperature`` (T divides both logits
before the softmax; default 1), ``scale_by_temperature_squared`` (multiply divergences by
T^2, Hinton's gradient-scale convention; default off) and ``chunk_tokens`` (None: one plain
autograd pass; an int: the bounded-memory chunked path).
"""

from __future__ import annotations

import math

import torch

from stillroom.losses import functional as Fn
from stillroom.losses.engine import (
    LogitTerm,
    Plan,
    TeacherLike,
    TeacherRows,
    chunked_loss,
    compute_dtype,
    counted_rows,
    plain_loss,
)
from stillroom.losses.registry import TermSpec, get_term, register, resolve_params

# ---------------------------------------------------------------- kernels


def _check_unit(name: str, key: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"loss term {name!r}: {key}={value} must lie in [0, 1]")
    return value


def _divergence(fn):
    def kernel(ctx, _stats):
        return fn(*ctx.pair).clamp_min(0.0)

    return kernel


def make_logit_term(name: str, params: dict, *, key: str | None = None, weight: float = 1.0,
                    loss_temperature: float = 1.0, scale_by_temperature_squared: bool = False,
                    taid_t: float | None = None) -> LogitTerm:
    """Bind a registered logit term to its (validated) parameters.

    ``taid_t``: the current interpolation t of a TAID term (its recipe params configure the
    schedule; without a schedule t = ``t_start``).
    """
    spec = get_term(name)
    if spec.kind != "logit":
        raise ValueError(f"loss term {name!r} is a {spec.kind} term, not a logit term")
    p = resolve_params(name, params)
    scale = loss_temperature**2 if (spec.divergence and scale_by_temperature_squared) else 1.0
    prepass = finish = None
    if name == "ce":

        def kernel(ctx, _stats):
            if ctx.target_n is None:
                raise ValueError("loss term 'ce' needs target_ids [B, T]")
            return torch.nn.functional.nll_loss(ctx.s_logp_t1, ctx.target_n.long(), ignore_index=-100,
                                                reduction="none")

    elif name in ("forward_kl", "reverse_kl", "tvd"):
        kernel = _divergence(getattr(Fn, name))
    elif name == "jsd":
        beta = _check_unit(name, "beta", p["beta"])
        kernel = _divergence(lambda lp, lq: Fn.jsd(lp, lq, beta))
    elif name in ("skew_kl", "skew_rkl"):
        alpha = _check_unit(name, "alpha", p["alpha"])
        fn = getattr(Fn, name)
        kernel = _divergence(lambda lp, lq: fn(lp, lq, alpha))
    elif name == "soft_ce":

        def kernel(ctx, _stats):
            return Fn.soft_ce(*ctx.pair)

    elif name == "taid":
        t = _check_unit(name, "t", p["t_start"] if taid_t is None else taid_t)

        def kernel(ctx, _stats):
            if ctx.teacher.topk is not None:
                raise ValueError("loss term 'taid' needs dense teacher logits (its target interpolates logits)")
            return Fn.taid(ctx.t_logp, ctx.s_logp, t).clamp_min(0.0)

    elif name == "tvd_pp":
        eps, weighting, scope = float(p["eps"]), p["weighting"], p["scope"]
        if weighting not in ("expectation", "unweighted"):
            raise ValueError(f"loss term 'tvd_pp': weighting={weighting!r}; valid: 'expectation', 'unweighted'")
        if scope not in ("position", "batch"):
            raise ValueError(f"loss term 'tvd_pp': scope={scope!r}; valid: 'position', 'batch'")

        def kernel(ctx, stats):
            return Fn.tvd_pp(*ctx.pair, eps=eps, weighting=weighting, stats=stats)

        if scope == "batch":

            def prepass(ctx):
                return Fn.tvd_pp_stats(*ctx.pair)

            def finish(s):
                total, n = float(s[0]), float(s[1])
                mu = total / max(n, 1.0)
                var = (total - total * total / n) / (n - 1.0) if n > 1 else 0.0
                return mu, math.sqrt(max(var, 0.0))

    else:  # pragma: no cover - every registered logit term is handled above
        raise AssertionError(name)
    return LogitTerm(key=key or name, kernel=kernel, weight=weight, scale=scale, prepass=prepass, finish=finish)


# ---------------------------------------------------------------- runners


def run_logit_terms(terms: list[LogitTerm], student_logits: torch.Tensor, teacher: TeacherLike | None,
                    mask: torch.Tensor, *, target_ids: torch.Tensor | None = None, loss_temperature: float = 1.0,
                    chunk_tokens: int | None = None, weight_bt: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Evaluate several logit terms in one pass over ``student_logits`` ``[B, T, V]``.

    Returns ``(sum_i weight_i * sum_i, [sum_i], count)``; sums are fp32 scalars. ``weight_bt``
    (``[B, T]`` float, optional) multiplies each counted token's value before the sums.
    """
    _check_mask(student_logits, mask)
    vocab = student_logits.shape[-1]
    rows = counted_rows(mask)
    plan = Plan(terms, rows, TeacherRows(teacher, vocab, loss_temperature),
                target_ids.reshape(-1) if target_ids is not None else None, loss_temperature,
                chunk_tokens or max(rows.numel(), 1), compute_dtype(student_logits), _flat_weight(weight_bt, mask))
    flat = student_logits.reshape(-1, vocab)
    if rows.numel() == 0:
        zero = flat.sum() * 0.0
        return zero.to(plan.dtype), [zero.detach().to(plan.dtype) for _ in terms], 0
    total, parts = plain_loss(plan, flat) if chunk_tokens is None else chunked_loss(plan, flat)
    return total, parts, int(rows.numel())


def run_fused_logit_terms(terms: list[LogitTerm], hidden_btd: torch.Tensor, head: torch.nn.Linear,
                          teacher: TeacherLike | None, mask: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                          loss_temperature: float = 1.0, chunk_tokens: int = 1024,
                          weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Like :func:`run_logit_terms` but from the last hidden state ``[B, T, D]`` and the output head:
    logits are computed ``chunk_tokens`` rows at a time and never materialised as ``[B, T, V]``."""
    _check_mask(hidden_btd, mask)
    vocab = head.weight.shape[0]
    rows = counted_rows(mask)
    plan = Plan(terms, rows, TeacherRows(teacher, vocab, loss_temperature),
                target_ids.reshape(-1) if target_ids is not None else None, loss_temperature,
                chunk_tokens, compute_dtype(hidden_btd), _flat_weight(weight_bt, mask))
    flat = hidden_btd.reshape(-1, hidden_btd.shape[-1])
    if rows.numel() == 0:
        zero = flat.sum() * 0.0 + head.weight.sum() * 0.0
        return zero.to(plan.dtype), [zero.detach().to(plan.dtype) for _ in terms], 0
    total, parts = chunked_loss(plan, flat, head.weight, head.bias)
    return total, parts, int(rows.numel())


def _flat_weight(weight_bt: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    if weight_bt is None:
        return None
    if tuple(weight_bt.shape) != tuple(mask.shape):
        raise ValueError(f"token weights of shape {tuple(weight_bt.shape)} do not match the mask's {tuple(mask.shape)}")
    return weight_bt.reshape(-1)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the student's [B, T] = {tuple(x.shape[:2])}")


def _single(name: str, student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
            chunk_tokens, target_ids=None, taid_t=None, **params) -> tuple[torch.Tensor, int]:
    term = make_logit_term(name, params, loss_temperature=loss_temperature,
                           scale_by_temperature_squared=scale_by_temperature_squared, taid_t=taid_t)
    total, _parts, count = run_logit_terms([term], student_logits, teacher, mask, target_ids=target_ids,
                                           loss_temperature=loss_temperature, chunk_tokens=chunk_tokens)
    return total, count


# ---------------------------------------------------------------- public terms


def ce(student_logits, teacher, mask, *, target_ids, loss_temperature=1.0, scale_by_temperature_squared=False,
       chunk_tokens=None):
    """Cross-entropy on hard labels: sum over counted tokens of -log q(target) (softmax at T = 1).

    ``target_ids`` ``[B, T]``: the token each position predicts, -100 where ignored (contributes 0).
    ``teacher`` is ignored (may be None). ``loss_temperature`` does not apply: CE is on the raw model.
    """
    return _single("ce", student_logits, teacher, mask, loss_temperature, False, chunk_tokens, target_ids=target_ids)


def soft_ce(student_logits, teacher, mask, *, loss_temperature=1.0, scale_by_temperature_squared=False,
            chunk_tokens=None):
    """Soft cross-entropy -sum_v p(v) log q(v) = H(p) + KL(p||q) (not zero at p = q: it is a CE).

    With a list of teachers, p is the average of their probabilities (MEAL V2, Shen & Savvides 2020).
    """
    return _single("soft_ce", student_logits, teacher, mask, loss_temperature, False, chunk_tokens)


def forward_kl(student_logits, teacher, mask, *, loss_temperature=1.0, scale_by_temperature_squared=False,
               chunk_tokens=None):
    """Forward KL(p || q) = sum_v p (log p - log q), p teacher, q student (Hinton et al. 2015)."""
    return _single("forward_kl", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens)


def reverse_kl(student_logits, teacher, mask, *, loss_temperature=1.0, scale_by_temperature_squared=False,
               chunk_tokens=None):
    """Reverse KL(q || p) = sum_v q (log q - log p), mode-seeking (MiniLLM, Gu et al. 2024)."""
    return _single("reverse_kl", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens)


def jsd(student_logits, teacher, mask, *, beta=0.5, loss_temperature=1.0, scale_by_temperature_squared=False,
        chunk_tokens=None):
    """Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    log m by logsumexp. beta = 0 is exactly KL(p||q), beta = 1 exactly KL(q||p) (TRL). Default beta 0.5.
    """
    return _single("jsd", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens, beta=beta)


def tvd(student_logits, teacher, mask, *, loss_temperature=1.0, scale_by_temperature_squared=False,
        chunk_tokens=None):
    """Total variation distance 0.5 sum_v |p - q| (= 1 - speculative acceptance rate)."""
    return _single("tvd", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens)


def skew_kl(student_logits, teacher, mask, *, alpha=0.1, loss_temperature=1.0, scale_by_temperature_squared=False,
            chunk_tokens=None):
    """Skew KL (DistiLLM, Ko et al. 2024): KL(p || alpha p + (1 - alpha) q); default alpha 0.1."""
    return _single("skew_kl", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens, alpha=alpha)


def skew_rkl(student_logits, teacher, mask, *, alpha=0.1, loss_temperature=1.0, scale_by_temperature_squared=False,
             chunk_tokens=None):
    """Skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q); default alpha 0.1."""
    return _single("skew_rkl", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens, alpha=alpha)


def taid(student_logits, teacher, mask, *, t=0.4, loss_temperature=1.0, scale_by_temperature_squared=False,
         chunk_tokens=None):
    """TAID (Shing et al. 2025): KL(p_t || q), p_t = softmax((1 - t) sg(z_s) + t z_T) (dense teacher only).

    ``t`` comes from :class:`~stillroom.losses.schedule.TaidSchedule` in a training run; the recipe
    params of a ``taid`` term configure that schedule: t_start 0.4, t_end 1.0, alpha 5e-4,
    beta 0.99, adaptive True (the official code's defaults).
    """
    return _single("taid", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens, taid_t=t)


def tvd_pp(student_logits, teacher, mask, *, eps=1e-5, weighting="expectation", scope="position",
           loss_temperature=1.0, scale_by_temperature_squared=False, chunk_tokens=None):
    """TVD++ (Goel et al. 2024): value TVD(p, q); gradient -E_q[r_hat grad log q], r = 1[p > q].

    r_hat = (r - mu) / (sigma + eps); ``scope``: "position" (mu, sigma over V per token, default)
    or "batch" (over all counted (token, v) entries); ``weighting``: "expectation" (surrogate
    -sum_v sg(r_hat) q, default) or "unweighted" (-mean_v sg(r_hat) log q, a different objective).
    """
    return _single("tvd_pp", student_logits, teacher, mask, loss_temperature, scale_by_temperature_squared,
                   chunk_tokens, eps=eps, weighting=weighting, scope=scope)


for _fn, _params, _div, _sparse, _teacher in [
    (ce, {}, False, True, False),
    (soft_ce, {}, False, True, True),
    (forward_kl, {}, True, True, True),
    (reverse_kl, {}, True, True, True),
    (jsd, {"beta": 0.5}, True, True, True),
    (tvd, {}, True, True, True),
    (skew_kl, {"alpha": 0.1}, True, True, True),
    (skew_rkl, {"alpha": 0.1}, True, True, True),
    (taid, {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True}, True, False, True),
    (tvd_pp, {"eps": 1e-5, "weighting": "expectation", "scope": "position"}, True, True, True),
]:
    register(TermSpec(_fn.__name__, "logit", _fn, _params, divergence=_div, uses_teacher=_teacher, sparse_ok=_sparse))

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "taid", "tvd_pp"]
"""Registered logit terms that are divergences (zero iff the distributions are equal)."""
