"""The ``sampled`` store signal: ``k`` tokens drawn from the teacher per position, their frequencies as its
distribution (``teacher.store.signal: sampled``; docs/STORE.md, "Sampled stores").

Why: a top-k store keeps the teacher's k most likely tokens and lumps the rest into one tail bin, so the
student's tail is only pushed towards the right total, never the right shape; the bias does not shrink with
training (measured in docs/BENCHMARKS.md, "Store size": k = 16 ends 16% above online KD in held-out KL). Draws
``x_1 .. x_k ~ p_T`` (the teacher at the loss temperature, with replacement) give ``p_hat(v) = #{i: x_i = v} / k``
with ``E[p_hat] = p_T``. Forward KL and soft cross-entropy are linear in the teacher's distribution, so their
gradient with respect to the student's logits, ``(q - p_hat) / T``, is an unbiased estimate of the dense one
(the sparse-logit-sampling argument of Anshumann et al., 2025). Divergences that are not linear in ``p``
(reverse KL, JSD, TVD, ...) are not unbiased under sampling and are refused with a sampled store.

Storage: only the ids, sorted ascending (repeats adjacent), ``2 k`` bytes per position at V <= 65,536; no
log-probabilities, no tail. Reading turns each row into top-k-shaped tensors the loss engine already takes:
the first slot of each distinct id holds ``log(count / k)``, its repeats and the tail ``-inf`` (zero mass,
which every divergence kernel skips).

``topk_sampled`` keeps the teacher's top ``k`` exactly (as a ``topk`` store) and estimates only the tail with
``tail_draws`` draws from the teacher renormalised outside the top k (:func:`draw_tail`, :func:`with_tail_draws`):
the head carries most of the mass without variance. ``draw: allocated`` shares a sequence's ``T x tail_draws`` draws
out over its positions where they lower the error most (:func:`allocate_draws`): about a third less squared error
than the same draws spread evenly, for one more byte per position (each position's count).

Draws are seeded per sequence (:func:`sequence_generator`), so a resumed store is byte-identical.

One sequence's row of any signal (``topk`` too) is made by :func:`row_signal` and read back into the loss's
shape by :func:`loss_rows`: the store writer, the store reader and the online teacher's memo
(:mod:`stillroom.teachers.memo`) share them.
"""

from __future__ import annotations

import hashlib

import torch

NEG_INF = float("-inf")


def sequence_generator(seed: int, uid: str) -> torch.Generator:
    """The CPU generator of one sequence's draws: seeded from the store seed and the sequence's uid."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_tokens(logits_tv: torch.Tensor, k: int, loss_temperature: float, generator: torch.Generator,
                draw: str = "multinomial") -> torch.Tensor:
    """``[T, k]`` int64 ids drawn from ``softmax(logits / T)`` per row, sorted ascending (:func:`draw_from`).

    Sampling runs in fp32 on the CPU with an explicit generator, whatever device and dtype the logits came from,
    so the same seed gives the same draws everywhere.
    """
    probs = torch.softmax(logits_tv.detach().float().cpu() / loss_temperature, dim=-1)
    return draw_from(probs, k, generator, draw)


def draw_from(probs_tv: torch.Tensor, k: int, generator: torch.Generator, draw: str) -> torch.Tensor:
    """``[T, k]`` sorted ids drawn from each row of ``probs_tv`` ``[T, V]`` (rows need not sum to 1).

    ``systematic``: one offset ``u ~ U[0, 1)`` per row and the points ``(u + j) / k``, ``j = 0 .. k-1``, looked up
    in the row's normalised CDF. Each token's expected count is exactly ``k p_v`` (unbiased, as independent
    draws), but its count is ``floor(k p_v)`` or ``ceil(k p_v)``: less variance per position than
    ``multinomial`` (``k`` independent draws with replacement, the default: it measured better on held-out KL in
    docs/BENCHMARKS.md, "Sampled signals", for the one draw of the store measured). Zero-probability tokens are
    never drawn by either.
    """
    if draw == "multinomial":
        return torch.multinomial(probs_tv, k, replacement=True, generator=generator).sort(dim=-1).values
    if draw != "systematic":
        raise ValueError(f"draw {draw!r}; valid: multinomial, systematic (allocated: the topk_sampled tail only)")
    cdf = probs_tv.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    points = (torch.rand(probs_tv.shape[0], 1, generator=generator, dtype=torch.float64)
              + torch.arange(k, dtype=torch.float64)) / k
    ids = torch.searchsorted(cdf, points, right=True)
    last = probs_tv.shape[-1] - 1 - (probs_tv.flip(-1) > 0).to(torch.int8).argmax(-1, keepdim=True)
    return torch.minimum(ids, last)  # a point at the very top of a CDF rounded below 1: the last drawable token


MAX_ALLOCATED = 255
"""The most draws ``allocated`` gives one position (its count is stored in one byte)."""


def allocate_draws(rest_tv: torch.Tensor, budget: int) -> torch.Tensor:
    """``[T]`` int64 draw counts for one sequence's positions, at most ``budget`` in all (``draw: allocated``).

    ``rest_tv`` ``[T, V]``: the teacher's probabilities outside the head (zero on the head ids). ``d`` draws from
    position t's tail (mass ``m_t``, renormalised ``q_t``) leave ``E||p_hat - p||^2 = a_t / d`` with
    ``a_t = m_t^2 (1 - sum q_t^2) = m_t^2 - sum rest_t^2``; the sequence's total ``sum_t a_t / d_t`` under
    ``sum_t d_t = budget`` is least at ``d_t ∝ sqrt(a_t)`` (a Lagrange multiplier): more draws where the tail is
    heavy and spread, few where the teacher is sure. Every position whose tail holds mass gets at least one draw
    (so each stays unbiased), none more than :data:`MAX_ALLOCATED`, one with no tail mass none:
    ``clip(lam sqrt(a_t), 1, MAX)`` with ``lam`` found by bisection, floored, the rest by largest remainder.
    Draws beyond what can lower the error (every tail a single token) are not spent.
    """
    rest = rest_tv.double()
    mass = rest.sum(-1)
    live = mass > 0
    share = (mass.square() - rest.square().sum(-1)).clamp_min(0).sqrt()
    spread = live & (share > 0)
    if int(live.sum()) > budget:
        raise ValueError(f"{budget} draws cannot give each of {int(live.sum())} positions with tail mass one")
    budget = min(int(budget), int(live.sum()) + (MAX_ALLOCATED - 1) * int(spread.sum()))

    def ideal(lam: float) -> torch.Tensor:
        return (lam * share).clamp(1.0, float(MAX_ALLOCATED)) * live

    low, high = 0.0, 1.0
    while float(ideal(high).sum()) < budget and high < 1e300:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if float(ideal(mid).sum()) < budget else (low, mid)
    target = ideal(high)
    counts = target.floor().long()
    missing = budget - int(counts.sum())
    if missing > 0:
        room = (target - counts).masked_fill(~spread | (counts >= MAX_ALLOCATED), -1.0)
        counts[room.topk(min(missing, int((room >= 0).sum()))).indices] += 1
    return counts


def draw_allocated(rest_tv: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    """``[T, W]`` int64: independent draws from each row of ``rest_tv`` (need not sum to 1), as many per row as
    :func:`allocate_draws` gives it, sorted, then ``-1`` up to the widest row's count ``W`` (at least 1)."""
    counts = allocate_draws(rest_tv, budget)
    width = max(1, int(counts.max()))
    safe = rest_tv.clone()
    empty = safe.sum(-1) <= 0
    safe[empty, 0] = 1.0  # drawn from, never kept (its count is 0)
    drawn = torch.multinomial(safe, width, replacement=True, generator=generator)
    kept = torch.arange(width) < counts[:, None]
    big = torch.iinfo(torch.int64).max
    drawn = drawn.masked_fill(~kept, big).sort(dim=-1).values
    return drawn.masked_fill(drawn == big, -1)


def frequencies(ids_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs [n, k] fp32, tail [n] fp32)`` of sorted draws ``ids_nk``: ``log(count / d)`` at the first slot
    of each distinct id (``d`` its row's draws: ``k``, or the row's ids >= 0 where ``-1`` pads rows of fewer
    draws, ``draw: allocated``), ``-inf`` at its repeats, on pads and in the tail (the draws cover all the mass
    they estimate)."""
    n, k = ids_nk.shape
    real = ids_nk >= 0
    counts = (ids_nk.unsqueeze(-1) == ids_nk.unsqueeze(-2)).sum(-1).float()  # [n, k]: each slot's id count
    repeat = ~real
    repeat[:, 1:] |= ids_nk[:, 1:] == ids_nk[:, :-1]
    draws = real.sum(-1, keepdim=True).clamp_min(1).float()
    logprobs = (counts / draws).log().masked_fill(repeat, NEG_INF)
    return logprobs, torch.full((n,), NEG_INF, device=ids_nk.device)


def draw_tail(logits_tv: torch.Tensor, head_ids_tk: torch.Tensor, draws: int, loss_temperature: float,
              generator: torch.Generator, draw: str = "multinomial") -> torch.Tensor:
    """``[T, draws]`` int64 ids drawn with replacement from the teacher's distribution renormalised outside its
    head ``head_ids_tk`` (the ``topk_sampled`` signal: the head is kept exactly, the tail estimated), sorted;
    ``draw: allocated``: ``[T, W]``, ``draws`` per position on average, shared out by :func:`allocate_draws`, ``-1``
    after each row's own draws.
    A row whose tail holds no fp32 mass draws its first non-head token (its tail mass is then 0 anyway)."""
    probs = torch.softmax(logits_tv.detach().float().cpu() / loss_temperature, dim=-1)
    rest = probs.scatter(-1, head_ids_tk.long().cpu(), 0.0)
    if draw == "allocated":  # the sequence's len(rows) x draws shared out; a row with no tail mass gets none
        return draw_allocated(rest, rest.shape[0] * draws, generator)
    empty = rest.sum(-1) <= 0
    if bool(empty.any()):
        free = torch.ones_like(rest).scatter(-1, head_ids_tk.long().cpu(), 0.0)
        rest[empty] = torch.zeros_like(rest[empty]).scatter(-1, free[empty].argmax(-1, keepdim=True), 1.0)
    return draw_from(rest, draws, generator, draw)


def with_tail_draws(ids_nk: torch.Tensor, logprobs_nk: torch.Tensor, tail_n: torch.Tensor,
                    draws_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's ``k`` bins plus the tail's mass spread over its draws: ``(ids [n, k + d], log-probs [n, k + d],
    tail [n] = -inf)``; a drawn id's log-prob is ``tail + log(count / d)`` on its first slot, ``-inf`` on repeats.
    ``E[]`` over the draws of the tail part is the exact tail distribution, so terms linear in the teacher's
    distribution stay unbiased with the head exact."""
    drawn_lp, _ = frequencies(draws_nd)
    return (torch.cat([ids_nk, draws_nd.clamp_min(0)], dim=1),  # a pad (-1) reads token 0 with zero mass
            torch.cat([logprobs_nk, tail_n[:, None] + drawn_lp], dim=1), torch.full_like(tail_n, NEG_INF))


def topk_signal(logits_tv: torch.Tensor, k: int, loss_temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [.., K], logprobs [.., K], tail [..])`` of ``log_softmax(logits / T)`` in fp32.

    The tail is the logsumexp of the log-probs outside the top k (exact, ``-inf`` when k = V).
    """
    lp = torch.log_softmax(logits_tv.float() / loss_temperature, dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)
    if k == lp.shape[-1]:
        tail = torch.full(lp.shape[:-1], float("-inf"))
    else:
        tail = torch.logsumexp(lp.scatter(-1, top_ids, float("-inf")), dim=-1)
    return top_ids, top_lp, tail


def row_signal(logits_tv: torch.Tensor, uid: str, *, signal: str, k: int, tail_draws: int,
               loss_temperature: float, draw: str = "multinomial", draw_seed: int = 0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One sequence's stored signal from its teacher logits ``[T, V]``: ``(ids [T, k], log-probs [T, k], tail [T],
    extra)`` as a store row holds it (``sampled``: sorted draws, log-probs and tail unused zeros;
    ``topk_sampled``: the top k, with ``extra["tail_ids"]`` ``[T, tail_draws]``); draws seeded by ``draw_seed`` and
    ``uid`` (:func:`sequence_generator`; another ``draw_seed`` is another realisation of the same store), made as
    ``draw`` says (:func:`draw_from`)."""
    if signal == "sampled":
        ids = draw_tokens(logits_tv, k, loss_temperature, sequence_generator(draw_seed, uid), draw)
        return ids, torch.zeros(ids.shape), torch.zeros(ids.shape[0]), {}
    ids, lp, tail = topk_signal(logits_tv.cpu(), k, loss_temperature)
    if signal != "topk_sampled":
        return ids, lp, tail, {}
    return ids, lp, tail, {"tail_ids": draw_tail(logits_tv, ids, tail_draws, loss_temperature,
                                                 sequence_generator(draw_seed, uid), draw)}


def loss_rows(signal: str, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
              tail_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stored row as the loss engine reads it: ``(ids [T, W], log-probs [T, W], tail [T])`` with ``W`` = k
    (``topk``, ``sampled``: the draws' frequencies) or k + tail_draws (``topk_sampled``)."""
    if signal == "sampled":
        logprobs, tail = frequencies(ids)
    if signal == "topk_sampled":
        return with_tail_draws(ids, logprobs, tail, tail_ids)
    return ids, logprobs, tail


def signal_label(signal: str, logprob_dtype: str, tail_draws: int = 0) -> str:
    """How a log line names a store's signal: ``float16``, ``sampled tokens`` or ``int8 + 16 tail draws``."""
    return {"sampled": "sampled tokens", "topk_sampled": f"{logprob_dtype} + {tail_draws} tail draws"}.get(
        signal, logprob_dtype)


def pack_tail_draws(rows: list[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Shard tensors of ``draw: allocated`` tail draws, from one ``[T, W]`` row per sequence (``-1`` pads, widths
    differing): ``tail_counts [N]`` uint8, each position's draws, and ``tail_ids [sum of counts]`` in ``dtype``,
    every position's draws in order (no pads on disk)."""
    flat = torch.cat([r.reshape(-1) for r in rows])
    counts = torch.cat([(r >= 0).sum(-1) for r in rows])
    return {"tail_counts": counts.to(torch.uint8).contiguous(), "tail_ids": flat[flat >= 0].to(dtype).contiguous()}


def unpack_tail_draws(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """``[hi - lo, W]`` int64 tail draws of token rows ``lo:hi`` of a shard :func:`pack_tail_draws` wrote, ``-1``
    after each row's own (``W``: the widest row's count, at least 1)."""
    counts = tensors["tail_counts"][lo:hi].long()
    start = int(tensors["tail_counts"][:lo].long().sum())
    pool = tensors["tail_ids"][start : start + int(counts.sum())].long()
    width = max(1, int(counts.max())) if counts.numel() else 1
    out = torch.full((hi - lo, width), -1, dtype=torch.long)
    out[torch.arange(width) < counts[:, None]] = pool
    return out
