"""How logit-level terms are evaluated: plain, chunked and fused paths.

All three paths evaluate the same per-row kernels (:class:`LogitTerm`) on the counted rows only (``mask``), in
fp32 (fp64 when the student logits are fp64, for gradcheck), and return ``(weighted sum, per-term sums)``.

* plain: one pass over all counted rows with ordinary autograd (the reference).
* chunked: ``chunk_tokens`` rows at a time inside a custom autograd Function. Each chunk's gradient is computed
  immediately (Liger-style) and only the gradient buffer of the *input* survives the chunk, so at most one
  chunk of ``[chunk_tokens, V]`` fp32 temporaries is alive, forward and backward.
* fused: the same Function, but the input is the last hidden state ``[B, T, D]`` and the output head; the
  chunk's logits are computed, used and dropped, so ``[B, T, V]`` never exists. Gradients for the hidden state
  ``[B, T, D]`` and the head weight ``[V, D]`` are accumulated chunk by chunk from each chunk's logit gradient
  (two matmuls in the head's matmul dtype, the one bf16 autocast would use in the plain path), so backward
  never recomputes the head.

In the chunked and fused paths the common terms (CE, forward and reverse KL, JSD, soft CE, and any divergence
on a top-k teacher's bins) skip autograd: :mod:`stillroom.losses.closed_form` writes each chunk's logit gradient
in closed form into buffers reused by every chunk; the kernels above stay the reference and the fallback.

Backward only scales the stored gradients by the incoming scalar gradient: the result is a sum (linear in each
chunk's contribution)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from stillroom.losses import closed_form
from stillroom.losses.closed_form import Head, HeadGrad, all_finite  # noqa: F401 (all_finite: re-exported)
from stillroom.losses.sparse import student_bins, teacher_bins
from stillroom.teachers.signal import (  # noqa: F401 (TeacherLike, sanitize_logits: re-exported)
    NEG_INF, TeacherChunk, TeacherLike, TeacherRows, sanitize_logits,
)


class ChunkContext:
    """What kernels see for one chunk of ``N`` counted rows; shared work is computed once.

    ``z``: student logits ``[N, V]`` divided by ``loss_temperature``, in the compute dtype.
    """

    def __init__(self, z_nv: torch.Tensor, teacher: TeacherChunk, target_n: torch.Tensor | None,
                 loss_temperature: float, dtype: torch.dtype, weight_n: torch.Tensor | None = None):
        self.raw = z_nv
        self.weight_n = weight_n
        self.teacher = teacher
        self.target_n = target_n
        self.temperature = loss_temperature
        self.dtype = dtype

    @cached_property
    def excluded(self) -> torch.Tensor:
        """``[N, V]`` bool: entries infinite in the student's *or* a dense teacher's logits.

        Such an entry (vocabulary padding, a banned token) is removed from both distributions,
        which are renormalised over the remaining support; values stay finite.
        """
        pad = torch.isinf(self.raw)
        for t in self.teacher.dense or []:
            pad = pad | torch.isinf(t)
        return pad

    @cached_property
    def z(self) -> torch.Tensor:
        z = self.raw.to(self.dtype)
        if self.any_excluded:
            z = z.masked_fill(self.excluded, float("-inf"))
        return z / self.temperature if self.temperature != 1.0 else z

    @cached_property
    def any_excluded(self) -> bool:
        """Whether :attr:`excluded` holds any entry, decided from one sum per tensor: the mask itself
        (``isinf`` goes through an ``abs`` copy of ``[N, V]``) is built only when it does."""
        return not all(all_finite(t) for t in [self.raw, *(self.teacher.dense or [])])

    @cached_property
    def s_logp(self) -> torch.Tensor:
        """``[N, V]`` student log-probs at ``loss_temperature``."""
        return torch.log_softmax(self.z, dim=-1)

    @cached_property
    def s_logp_t1(self) -> torch.Tensor:
        """``[N, V]`` student log-probs at temperature 1 (for hard-label CE)."""
        if self.temperature == 1.0:
            return self.s_logp
        return torch.log_softmax(sanitize_logits(self.raw.to(self.dtype)), dim=-1)

    @cached_property
    def t_logp(self) -> torch.Tensor:
        """``[N, V]`` dense teacher log-probs at ``loss_temperature`` (ensemble: log of mean probs)."""
        if self.teacher.dense is None or not self.teacher.dense:
            raise ValueError("this term needs dense teacher logits (a top-k teacher is not enough)")
        logps = []
        for t in self.teacher.dense:
            t = t.to(self.dtype)
            if self.any_excluded:
                t = t.masked_fill(self.excluded, float("-inf"))
            logps.append(torch.log_softmax(t / self.temperature if self.temperature != 1.0 else t, dim=-1))
        if len(logps) == 1:
            return logps[0]
        # log(n) computed on the CPU as before (bit-identical), then moved to the rows' device.
        n = torch.tensor(float(len(logps)), dtype=self.dtype, device="cpu").log().to(logps[0].device)
        return torch.logsumexp(torch.stack(logps), dim=0) - n

    def for_term(self, term: "LogitTerm") -> "ChunkContext":
        """The context ``term`` sees: this one, or with a cross-tokenizer teacher and a term that compares
        token by token, both distributions on the matched tokens only (:attr:`matched`)."""
        if self.teacher.cross is None or not term.uses_teacher or term.vocab_free:
            return self
        return self.matched

    @cached_property
    def matched(self) -> "ChunkContext":
        """Student logits ``[N, M]`` at the matched student ids beside the teacher's at the same tokens: every
        divergence then compares the two distributions renormalised over the shared tokens."""
        cross = self.teacher.cross
        return ChunkContext(self.raw[:, cross.matched_student], TeacherChunk(dense=[cross.matched_logits]),
                            self.target_n, self.temperature, self.dtype, self.weight_n)

    @cached_property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) log-probs on the comparison support: ``[N, V]`` or top-k ``[N, K+1]`` bins."""
        if self.teacher.topk is not None:
            ids, lp, tail = self.teacher.topk
            q_bins = student_bins(self.s_logp, ids, all_finite=not self.any_excluded)
            return teacher_bins(lp, tail, self.dtype, empty_tail_n=torch.isneginf(q_bins[:, -1])), q_bins
        if self.teacher.dense is None:
            raise ValueError("this term needs a teacher, but none was given")
        return self.t_logp, self.s_logp


@dataclass
class LogitTerm:
    """One logit-level term bound to its arguments, weight and ``loss_temperature``
    (built from its spec by :func:`stillroom.losses.logit.bind`).

    ``kernel(ctx, stats) -> [N]`` per-row values; ``prepass(ctx) -> [S]`` optional sufficient
    statistics summed over all chunks before the main pass (no gradient), handed to the kernel as
    ``stats`` after ``finish(stats_sum)``.
    """

    key: str
    kernel: Callable[[ChunkContext, object], torch.Tensor]
    weight: float = 1.0
    scale: float = 1.0
    prepass: Callable[[ChunkContext], torch.Tensor] | None = None
    finish: Callable[[torch.Tensor], object] | None = None
    temperature: float = 1.0
    """``loss_temperature`` the term was bound with (terms evaluated in one pass share it)."""
    uses_teacher: bool = True
    vocab_free: bool = False
    """Compares ranked probabilities, not tokens (``uld``): it sees a cross-tokenizer teacher whole."""
    closed_form: Callable | None = None
    """``closed_form(chunk, coef_n) -> [N]``: the values, and ``coef_n * d value / d logits`` written into
    ``chunk.grad`` (:mod:`stillroom.losses.closed_form`); None: the autograd kernel only."""
    on_bins: Callable | None = None
    """With a top-k teacher the kernel reads only ``ctx.pair`` (the K + 1 bins), so the closed-form chunk can
    spread its bin gradient onto the vocabulary: :func:`stillroom.losses.closed_bins.on_bins`; None: it cannot."""


@dataclass
class Plan:
    terms: list[LogitTerm]
    rows: torch.Tensor  # [N] indices into the flat [B*T] axis of counted positions
    teacher: TeacherRows
    target_flat: torch.Tensor | None
    loss_temperature: float
    chunk: int
    dtype: torch.dtype
    weight_flat: torch.Tensor | None = None  # [B*T] per-token weights of the rows (None = 1)

    def chunks(self, spans: bool = False):
        """The counted rows, ``chunk`` at a time, as ``(rows, keep=None)``: a ``slice`` of the flat axis when they
        are consecutive (views, no gathers), else an ``[n]`` index tensor. ``spans``: if they fill 90% of their
        range (text: all but each sequence's last), slices of the range, ``keep`` ``[n]`` bool marking them."""
        n = self.rows.numel()
        first = int(self.rows[0]) if n else 0
        span = int(self.rows[-1]) - first + 1 if n else 0  # rows are sorted and distinct
        if span == n or (spans and 10 * n >= 9 * span):
            keep = None
            if span != n:
                keep = torch.zeros(span, dtype=torch.bool, device=self.rows.device)
                keep[self.rows - first] = True
            for i in range(0, span, self.chunk):
                j = min(i + self.chunk, span)
                yield slice(first + i, first + j), None if keep is None else keep[i:j]
            return
        for i in range(0, n, self.chunk):
            yield self.rows[i : i + self.chunk], None

    def context(self, z: torch.Tensor, rows: torch.Tensor | slice) -> ChunkContext:
        target = self.target_flat[rows] if self.target_flat is not None else None
        weight = self.weight_flat[rows].to(self.dtype) if self.weight_flat is not None else None
        return ChunkContext(z, self.teacher.take(rows), target, self.loss_temperature, self.dtype, weight)

    def evaluate(self, ctx: ChunkContext, stats: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Weighted sum and per-term (scaled, unweighted) sums for one chunk; with per-token
        weights each row's value is multiplied by its weight before the sum."""
        parts = [t.scale * self._rows(t, ctx, s).sum() for t, s in zip(self.terms, stats)]
        total = sum(t.weight * p for t, p in zip(self.terms, parts))
        return total, parts

    @staticmethod
    def _rows(term: LogitTerm, ctx: ChunkContext, stats) -> torch.Tensor:
        """``[N]`` values of ``term``, times the per-token weights; a cross-tokenizer teacher's terms count
        only the aligned rows (the others hold placeholder targets)."""
        values = term.kernel(ctx.for_term(term), stats)
        if ctx.weight_n is not None:
            values = values * ctx.weight_n
        cross = ctx.teacher.cross
        if cross is not None and term.uses_teacher:
            values = values * cross.aligned_n.to(values.dtype)
        return values


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def counted_rows(mask_bt: torch.Tensor) -> torch.Tensor:
    return mask_bt.reshape(-1).bool().nonzero().squeeze(1)


def _batch_stats(plan: Plan, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> list:
    stats: list = [None] * len(plan.terms)
    if not any(t.prepass for t in plan.terms):
        return stats
    sums: list = [None] * len(plan.terms)
    with torch.no_grad():
        for rows, _ in plan.chunks():
            ctx = plan.context(logits_of(rows), rows)
            for i, t in enumerate(plan.terms):
                if t.prepass is not None:
                    s = t.prepass(ctx.for_term(t))
                    sums[i] = s if sums[i] is None else sums[i] + s
    for i, t in enumerate(plan.terms):
        if t.prepass is not None:
            stats[i] = t.finish(sums[i])
    return stats


def plain_loss(plan: Plan, logits_flat: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference path: all counted rows at once, ordinary autograd."""
    stats = _batch_stats(plan, lambda rows: logits_flat[rows])
    rows = plan.rows
    every = rows.numel() == logits_flat.shape[0]  # all rows counted: no gather copy
    return plan.evaluate(plan.context(logits_flat if every else logits_flat[rows], rows), stats)


class _ChunkedLoss(torch.autograd.Function):
    """Inputs: ``x`` = logits ``[BT, V]`` (weight None) or hidden ``[BT, D]`` with head ``weight`` ``[V, D]``,
    optional ``bias`` ``[V]``, the head's ``matmul_dtype``, a ``tied`` sink (:class:`stillroom.losses.TiedHeadGrad`:
    the weight's gradient goes there, not to autograd). Outputs: scalar total, ``[n_terms]`` parts (no grad).
    A chunk's logit gradient ``[n, V]`` (closed forms, or autograd through the kernels) gives the fused head's
    gradients by two matmuls (:meth:`Head.backward`): backward never recomputes the head."""

    @staticmethod
    def forward(ctx, plan: Plan, need_grad: bool, x, weight, bias, matmul_dtype, tied):
        fused = weight is not None
        need = [need_grad and t is not None and t.requires_grad for t in (x, weight, bias)]
        vocab = weight.shape[0] if fused else x.shape[1]
        ws = closed_form.Workspace.for_call(plan.chunk, vocab, x.device) if closed_form.usable(plan) else None
        head = Head(weight, bias, matmul_dtype, ws) if fused else None
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_w = HeadGrad(head.dtype, ws=ws) if need[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        stats = _batch_stats(plan, lambda rows: (head.logits(x[rows]) if fused else x[rows]).detach())
        # fp64 running sums on the input's device (chunk results live there).
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        parts = torch.zeros(len(plan.terms), dtype=torch.float64, device=x.device)
        for rows, keep in plan.chunks(spans=ws is not None and plan.teacher.topk is None):
            out = closed_form.run_chunk(plan, ws, head, x, rows, keep, stats, any(need)) if ws is not None else None
            if out is None:
                rows = rows if keep is None else torch.arange(rows.start, rows.stop, device=x.device)[keep]
                out = _autograd_chunk(plan, head, x, rows, any(need), stats)
            chunk_total, chunk_parts, grad_z = out
            if any(need) and grad_z is not None:
                x_rows = x[rows].detach()
                gx, gb = head.backward(grad_z, x_rows, need, grad_w, ws) if fused else (grad_z, None)
                if need[0]:
                    grad_x[rows] = gx.to(grad_x.dtype)
                if need[2]:
                    grad_b += gb
            total += chunk_total.detach().double()
            parts += torch.stack([p.detach().double() for p in chunk_parts])
        ctx.save_for_backward(*(g if g is not None else x.new_empty(0) for g in (grad_x, weight, grad_b)))
        ctx.has, ctx.head_grad, ctx.tied = [grad_x is not None, grad_w is not None, grad_b is not None], grad_w, tied
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias)]
        parts_out = parts.to(plan.dtype)
        ctx.mark_non_differentiable(parts_out)
        return total.to(plan.dtype), parts_out

    @staticmethod
    def backward(ctx, grad_total, _grad_parts):
        grad_x, weight, grad_b = ctx.saved_tensors
        scaled = [grad_x * grad_total.to(grad_x.dtype), ctx.head_grad and ctx.head_grad.scaled(grad_total, weight),
                  grad_b * grad_total.to(grad_b.dtype)]
        grads = [g.to(dt) if has else None for g, has, dt in zip(scaled, ctx.has, ctx.dtypes)]
        if ctx.tied is not None and grads[1] is not None:
            ctx.tied.put(grads[1])
            grads[1] = None
        return None, None, *grads, None, None


def _autograd_chunk(plan: Plan, head, x: torch.Tensor, rows: slice | torch.Tensor, want_grad: bool, stats: list):
    """One chunk through the kernels with autograd from its logits (a leaf): ``(total, parts, grad or None)``."""
    x_rows = x[rows].detach()  # a view for a slice of rows
    with torch.enable_grad():
        z = (head.logits(x_rows) if head is not None else x_rows).requires_grad_(want_grad)
        chunk_total, chunk_parts = plan.evaluate(plan.context(z, rows), stats)
    grad_z = None
    if want_grad and chunk_total.requires_grad:
        (grad_z,) = torch.autograd.grad(chunk_total, z)
    return chunk_total, chunk_parts, grad_z


def chunked_loss(plan: Plan, x: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None,
                 matmul_dtype: torch.dtype | None = None, tied=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chunked (``weight is None``: ``x`` = logits ``[BT, V]``) or fused (``x`` = hidden ``[BT, D]``)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    total, parts = _ChunkedLoss.apply(plan, need_grad, x, weight, bias, matmul_dtype, tied)
    return total, list(parts.unbind(0))


# ---------------------------------------------------------------- runners

def run_logit_terms(terms: list[LogitTerm], student_logits: torch.Tensor, teacher: TeacherLike | None,
                    mask: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                    loss_temperature: float | None = None, chunk_tokens: int | None = None,
                    weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Evaluate several logit terms in one pass over ``student_logits`` ``[B, T, V]``.

    Returns ``(sum_i weight_i * sum_i, [sum_i], count)``; sums are fp32 scalars. ``weight_bt``
    (``[B, T]`` float, optional) multiplies each counted token's value before the sums. The
    temperature is the one the terms were bound with (``loss_temperature``, if given, must equal it).
    """
    vocab = student_logits.shape[-1]
    plan = _plan(terms, student_logits, vocab, teacher, mask, target_ids, loss_temperature, chunk_tokens, weight_bt)
    flat = student_logits.reshape(-1, vocab)
    if plan.rows.numel() == 0:
        return _empty(plan, flat.sum() * 0.0)
    total, parts = plain_loss(plan, flat) if chunk_tokens is None else chunked_loss(plan, flat)
    return total, parts, int(plan.rows.numel())


def run_fused_logit_terms(terms: list[LogitTerm], hidden_btd: torch.Tensor, head: torch.nn.Linear,
                          teacher: TeacherLike | None, mask: torch.Tensor, *, target_ids: torch.Tensor | None = None,
                          loss_temperature: float | None = None, chunk_tokens: int = 256,
                          weight_bt: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Like :func:`run_logit_terms` but from the last hidden state ``[B, T, D]`` and the output head:
    logits are computed ``chunk_tokens`` rows at a time and never materialised as ``[B, T, V]``.

    ``head``: anything with ``weight [V, D]`` and ``bias``; optional: ``matmul_dtype`` (the dtype autocast would
    give the head's matmuls in the plain path) and ``tied`` (:class:`stillroom.losses.OutputHead`)."""
    plan = _plan(terms, hidden_btd, head.weight.shape[0], teacher, mask, target_ids, loss_temperature, chunk_tokens,
                 weight_bt)
    flat = hidden_btd.reshape(-1, hidden_btd.shape[-1])
    if plan.rows.numel() == 0:
        return _empty(plan, flat.sum() * 0.0 + head.weight.sum() * 0.0)
    total, parts = chunked_loss(plan, flat, head.weight, head.bias, getattr(head, "matmul_dtype", None),
                                getattr(head, "tied", None))
    return total, parts, int(plan.rows.numel())


def _plan(terms: list[LogitTerm], x: torch.Tensor, vocab: int, teacher: TeacherLike | None, mask: torch.Tensor,
          target_ids: torch.Tensor | None, loss_temperature: float | None, chunk_tokens: int | None,
          weight_bt: torch.Tensor | None) -> Plan:
    """The plan of one call: counted rows, teacher rows, targets and weights flattened; one temperature."""
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the student's [B, T] = {tuple(x.shape[:2])}")
    if weight_bt is not None and tuple(weight_bt.shape) != tuple(mask.shape):
        raise ValueError(f"token weights of shape {tuple(weight_bt.shape)} do not match the mask's {tuple(mask.shape)}")
    temps = {t.temperature for t in terms}
    if len(temps) > 1:
        raise ValueError(f"logit terms evaluated in one pass share one loss_temperature; got {sorted(temps)}")
    temperature = temps.pop() if temps else (1.0 if loss_temperature is None else loss_temperature)
    if loss_temperature is not None and loss_temperature != temperature:
        raise ValueError(f"loss_temperature={loss_temperature} but the terms were bound with {temperature}")
    rows = counted_rows(mask)
    return Plan(terms, rows, TeacherRows(teacher, vocab, temperature),
                target_ids.reshape(-1) if target_ids is not None else None, temperature,
                chunk_rows(chunk_tokens, vocab) if chunk_tokens else max(rows.numel(), 1), compute_dtype(x),
                weight_bt.reshape(-1) if weight_bt is not None else None)


CHUNK_BYTES = 64 << 20  # per [rows, V] fp32 buffer: 256 rows at V = 49,152, 64 at V = 256,000


def chunk_rows(chunk_tokens: int, vocab: int) -> int:
    """Rows per chunk: ``chunk_tokens``, fewer (a multiple of 16, at least 16) past :data:`CHUNK_BYTES`."""
    return min(chunk_tokens, max(16, CHUNK_BYTES // (4 * vocab) // 16 * 16))


def _empty(plan: Plan, zero: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """No counted row: a zero total still connected to the inputs (their gradient is 0), zero parts."""
    return zero.to(plan.dtype), [zero.detach().to(plan.dtype) for _ in plan.terms], 0
