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
the head carries most of the mass without variance.

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
        raise ValueError(f"draw {draw!r}; valid: systematic, multinomial")
    cdf = probs_tv.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    points = (torch.rand(probs_tv.shape[0], 1, generator=generator, dtype=torch.float64)
              + torch.arange(k, dtype=torch.float64)) / k
    ids = torch.searchsorted(cdf, points, right=True)
    last = probs_tv.shape[-1] - 1 - (probs_tv.flip(-1) > 0).to(torch.int8).argmax(-1, keepdim=True)
    return torch.minimum(ids, last)  # a point at the very top of a CDF rounded below 1: the last drawable token


def frequencies(ids_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs [n, k] fp32, tail [n] fp32)`` of sorted draws ``ids_nk``: ``log(count / k)`` at the first slot
    of each distinct id, ``-inf`` at its repeats and in the tail (the draws cover all the mass they estimate)."""
    n, k = ids_nk.shape
    counts = (ids_nk.unsqueeze(-1) == ids_nk.unsqueeze(-2)).sum(-1).float()  # [n, k]: each slot's id count
    repeat = torch.zeros((n, k), dtype=torch.bool, device=ids_nk.device)
    repeat[:, 1:] = ids_nk[:, 1:] == ids_nk[:, :-1]
    logprobs = (counts / k).log().masked_fill(repeat, NEG_INF)
    return logprobs, torch.full((n,), NEG_INF, device=ids_nk.device)


def draw_tail(logits_tv: torch.Tensor, head_ids_tk: torch.Tensor, draws: int, loss_temperature: float,
              generator: torch.Generator, draw: str = "multinomial") -> torch.Tensor:
    """``[T, draws]`` int64 ids drawn with replacement from the teacher's distribution renormalised outside its
    head ``head_ids_tk`` (the ``topk_sampled`` signal: the head is kept exactly, the tail estimated), sorted.
    A row whose tail holds no fp32 mass draws its first non-head token (its tail mass is then 0 anyway)."""
    probs = torch.softmax(logits_tv.detach().float().cpu() / loss_temperature, dim=-1)
    rest = probs.scatter(-1, head_ids_tk.long().cpu(), 0.0)
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
    return (torch.cat([ids_nk, draws_nd], dim=1), torch.cat([logprobs_nk, tail_n[:, None] + drawn_lp], dim=1),
            torch.full_like(tail_n, NEG_INF))


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
