"""The fast chunk of the chunked and fused paths: the common terms' values and gradients in closed form, on
buffers reused by every chunk of a call, and the output head's matmuls.

Why: on a CPU, each fresh ``[rows, V]`` fp32 temporary larger than glibc's mmap threshold (32 MiB at most: a
``[256, 49152]`` chunk is 48 MiB) is new memory from the kernel, and its page faults cost several times the op
itself (measured on a 2-core Xeon: an fp32 subtraction of ``[256, 49152]`` takes 12.4 ms into a new tensor,
2.7 ms into an existing one). Autograd through the per-row math of :mod:`stillroom.losses.terms` allocates a
dozen such temporaries per chunk, forward and backward. Here every ``[n, V]`` quantity lives in a named buffer
of a :class:`Workspace` allocated once per call, and each term writes its gradient with respect to the student's
logits straight into one buffer (``grad``). Log-softmaxes run in place in PyTorch's own kernel, which works a row
at a time while the row is in cache (a 256k row is 1 MiB): copy, log-softmax and exp of a bf16 ``[64, 256000]``
chunk took 17 ms against 24 ms as separate max / subtract / exp / sum / divide passes (quiet 2-core Xeon):

* ``ce``: value ``-log q1(y)``, gradient ``q1 - onehot(y)`` (``q1``: the student's softmax at temperature 1);
* ``forward_kl``: ``sum p (log p - log q)``, gradient ``(q - p) / T``; ``soft_ce``: ``-sum p log q``, the same;
* ``reverse_kl``: ``sum q (log q - log p)``, gradient ``q * (log q - log p - value) / T``;
* ``jsd``: ``beta KL(p||m) + (1 - beta) KL(q||m)``, gradient ``(1 - beta) q * (d - KL(q||m)) / T`` with
  ``d = log q - log m`` (the terms through ``m`` cancel);
* a top-k teacher (any divergence on the K + 1 bins; :mod:`stillroom.losses.closed_bins`): the term's kernel
  on the ``[N, K+1]`` bins with autograd (small), its bin gradient ``h`` spread onto the vocabulary in closed form:
  ``dF/ds_j = h_j - q_j H`` for a top-k id, ``q_j (h_tail / q_tail - H)`` for the rest, ``H = sum_b h_b``.

Divergences are clamped at 0 like the kernels, and a row whose raw value rounds below 0 gets no gradient (the
clamp's). A chunk with a non-finite logit goes back to the autograd kernels (:class:`Fallback`), which handle
padded vocabularies and banned tokens.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch


class Fallback(Exception):
    """This chunk needs the autograd kernels (an edge case the closed forms do not cover)."""


class Workspace:
    """Named ``[rows, V]`` buffers, allocated on first use and reused by every chunk of a call and by the next
    call of the same shape (:meth:`for_call`): a fresh buffer's first touch costs its page faults again."""

    _last: "Workspace | None" = None

    def __init__(self, rows: int, cols: int, device: torch.device):
        self.rows, self.cols, self.device = rows, cols, device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._kept: dict[tuple[str, torch.dtype], torch.UntypedStorage] = {}

    @classmethod
    def for_call(cls, rows: int, cols: int, device: torch.device) -> "Workspace":
        """The workspace of the previous call when its shape and device match, else a new one that replaces it
        (one workspace is kept per process: its buffers are at most the loss's own peak, ~8 ``[rows, V]``)."""
        last = cls._last
        if last is None or (last.rows, last.cols, last.device) != (rows, cols, device):
            cls._last = last = cls(rows, cols, device)
        return last

    def shaped(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``name`` of exactly ``shape`` (contents undefined), e.g. the head cast to its matmul dtype: used
        only inside one call's forward, so the next call may overwrite it."""
        buf = self._buffers.get((name, dtype))
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[(name, dtype)] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def recycled(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of ``shape`` (contents undefined) for a ``[V, D]`` result that outlives the call (the head
        gradient's partial sum, held by the graph until backward), on storage kept here: a later call reuses it
        once no tensor holds it any more; while one does (a graph not yet freed), a fresh one is made and kept
        instead. At a 256k vocabulary each fresh ``[V, D]`` tensor costs 0.15-1 s of page faults on a CPU, as
        much as the loss itself (docs/BENCHMARKS.md), so a steady loop should touch none."""
        key = (name, dtype)
        kept = self._kept.get(key)
        if kept is not None and kept.nbytes() == math.prod(shape) * dtype.itemsize and storage_unshared(kept):
            return torch.empty(0, dtype=dtype, device=self.device).set_(kept, 0, shape)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self._kept[key] = out.untyped_storage()
        return out

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The first ``n`` rows of the ``[rows, V]`` buffer ``name`` (contents undefined)."""
        return self.shaped(name, (self.rows, self.cols), dtype)[:n]


def storage_unshared(storage: torch.UntypedStorage) -> bool:
    """Whether ``storage`` is referenced by nothing but the one Python object passed in (no tensor uses it)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is reused
    return use_count is not None and use_count(storage._cdata) == 1


def log_softmax_into(x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``x`` ``[n, V]`` fp32 logits become log-probabilities, ``probs`` (a buffer) the probabilities;
    returns ``(x, probs)``. PyTorch's kernel reads each row whole before writing it, so ``out=x`` is safe. (Its
    ``dtype=`` path straight from bf16 logits measured slower than this fp32 copy first: 36.5 vs 17 ms.)"""
    torch.log_softmax(x, -1, out=x)
    return x, torch.exp(x, out=probs)


class Head:
    """The output head of the fused path, cast once to the dtype its matmuls run in: ``matmul_dtype``, what
    autocast would use for the head in the plain path (bf16 under bf16 autocast, whose last hidden state is still
    fp32), so the fused path's head costs what the plain path's does; ``None`` keeps the weight's own dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, matmul_dtype: torch.dtype | None,
                 ws: "Workspace | None" = None):
        self.dtype = matmul_dtype or weight.dtype
        if ws is not None and weight.dtype != self.dtype:  # the cast into a buffer kept for the next call
            self.weight = ws.shaped("head", tuple(weight.shape), self.dtype).copy_(weight.detach())
        else:
            self.weight = weight.detach().to(self.dtype)  # [V, D]; a view when no cast is needed
        self.bias = None if bias is None else bias.detach().to(self.dtype)

    def logits(self, x_nd: torch.Tensor) -> torch.Tensor:
        """``[n, D] -> [n, V]`` in the matmul dtype (no graph)."""
        return torch.nn.functional.linear(x_nd.to(self.dtype), self.weight, self.bias)

    def logits_buffer(self, x_nd: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """The chunk's logits ``[n, V]`` in the matmul dtype, in a workspace buffer (no graph)."""
        out = ws.get("z_matmul", x_nd.shape[0], self.dtype)
        torch.mm(x_nd.to(self.dtype), self.weight.t(), out=out)
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def backward(self, grad_nv: torch.Tensor, x_nd: torch.Tensor, need: list[bool], grad_w: "HeadGrad | None",
                 ws: Workspace | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of one chunk from the gradient of its logits ``[n, V]``: ``(d x [n, D] or None, d bias [V]
        or None)``; ``d weight`` is added into ``grad_w``."""
        if grad_nv.dtype == self.dtype:
            g = grad_nv
        elif ws is not None:
            g = ws.get("grad_matmul", grad_nv.shape[0], self.dtype).copy_(grad_nv)
        else:
            g = grad_nv.to(self.dtype)
        gx = g @ self.weight if need[0] else None
        if need[1]:
            grad_w.add(g, x_nd.to(self.dtype))
        gb = grad_nv.sum(0) if need[2] else None
        return gx, gb


class HeadGrad:
    """The head weight's gradient ``[V, D]``, summed over chunks by ``addmm_`` into a buffer of the matmul dtype.
    A bf16 buffer is added into the fp32 sum every ``flush_every`` chunks, so a bf16 running sum is rounded at
    most that many times (the plain path's autocast rounds its single product once). With a workspace ``ws``
    the partial and fp32 sums live on storage recycled across steps (:meth:`Workspace.recycled`)."""

    def __init__(self, dtype: torch.dtype, flush_every: int = 8, ws: Workspace | None = None):
        self.dtype, self.flush_every, self.ws = dtype, flush_every, ws
        self.part: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.pending = 0

    def _new(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``[V, D]`` tensor (contents undefined), recycled when there is a workspace."""
        if self.ws is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return self.ws.recycled(name, shape, dtype)

    @property
    def _shape(self) -> tuple[int, int]:
        return tuple(self.part.shape)

    def add(self, g_nv: torch.Tensor, x_nd: torch.Tensor) -> None:
        if self.dtype != torch.float32 and self.pending == self.flush_every:
            self._flush()
        if self.part is None:
            self.part = self._new("head_grad_part", (g_nv.shape[1], x_nd.shape[1]), g_nv.dtype, g_nv.device)
        if self.pending == 0:
            torch.mm(g_nv.t(), x_nd, out=self.part)
        else:
            self.part.addmm_(g_nv.t(), x_nd)
        self.pending += 1

    def _flush(self) -> None:
        if self.total is None:
            self.total = self._new("head_grad_total", self._shape, torch.float32, self.part.device).copy_(self.part)
        else:
            self.total.add_(self.part)
        self.pending = 0

    def scaled(self, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``factor`` times the sum, as a new fp32 tensor (the sum itself is kept: backward may run again), on
        recycled storage: autograd makes it the weight's ``.grad`` as it is (a tied embedding adds its rows into
        it: :class:`stillroom.losses.TiedHeadGrad`), and ``zero_grad`` frees it for the next step."""
        if self.part is None:
            return torch.zeros_like(like, dtype=torch.float32)
        out = self._new("head_grad_out", self._shape, torch.float32, self.part.device).copy_(self.part)
        if self.total is not None:
            out.add_(self.total)
        return out.mul_(factor)


class ClosedChunk:
    """One chunk of ``n`` rows for the closed forms: the student's raw logits ``z`` ``[n, V]`` (any float dtype,
    only read), the teacher's rows, the targets ``[n]``, ``loss_temperature`` ``T``; shared quantities computed
    once into fp32 workspace buffers; ``grad`` ``[n, V]`` fp32 collects d(weighted sum)/dz."""

    def __init__(self, ws: Workspace, z_nv: torch.Tensor, teacher, target_n: torch.Tensor | None, temperature: float,
                 want_grad: bool = True):
        self.ws, self.z, self.teacher, self.target_n, self.T = ws, z_nv, teacher, target_n, temperature
        self.n = z_nv.shape[0]
        self.grad = ws.get("grad", self.n) if want_grad else None  # None: values only (evaluation)
        self._blank = want_grad  # nothing written into ``grad`` yet (its contents are undefined until then)

    def add_grad(self, x_nv: torch.Tensor, k_n: torch.Tensor) -> None:
        """``grad += x * k[:, None]``; the first term writes ``x * k`` instead (no zeroing pass first)."""
        if self._blank:
            torch.mul(x_nv, k_n.unsqueeze(1), out=self.grad)
            self._blank = False
        else:
            self.grad.addcmul_(x_nv, k_n.unsqueeze(1))

    def written_grad(self) -> torch.Tensor | None:
        """``grad`` once every term has added to it (zeros when none wrote; None for values only)."""
        if self._blank:
            self.grad.zero_()
            self._blank = False
        return self.grad

    def buffer(self, name: str) -> torch.Tensor:
        return self.ws.get(name, self.n)

    @cached_property
    def student(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log q, q)`` ``[n, V]`` fp32 at ``T``, from an fp32 copy of ``z``."""
        logq = self.buffer("logq").copy_(self.z)
        if self.T != 1.0:
            logq.div_(self.T)
        return log_softmax_into(logq, self.buffer("q"))

    @cached_property
    def student_t1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log q1, q1)`` at temperature 1 (hard-label CE)."""
        if self.T == 1.0:
            return self.student
        return log_softmax_into(self.buffer("logq1").copy_(self.z), self.buffer("q1"))

    @cached_property
    def teacher_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p, p)`` ``[n, V]`` of the (single) dense teacher at ``T``."""
        logp = self.buffer("logp").copy_(self.teacher.dense[0])
        if not all_finite(logp):  # checked on the fp32 copy
            raise Fallback("a non-finite teacher logit")
        if self.T != 1.0:
            logp.div_(self.T)
        return log_softmax_into(logp, self.buffer("p"))


def _clamped(raw_n: torch.Tensor, coef_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A divergence's clamped values and its coefficient without the rows the clamp cuts off."""
    keep = raw_n >= 0
    return raw_n.clamp_min(0.0), coef_n * keep


# ---------------------------------------------------------------- the terms (value [n]; coef * d value / dz into c.grad)

def ce(c: ClosedChunk, coef_n: torch.Tensor) -> torch.Tensor:
    """Hard-label CE at temperature 1; target -100 counts 0."""
    if c.target_n is None:
        raise ValueError("loss term 'ce' needs target_ids [B, T]")
    if not isinstance(c.target_n, torch.Tensor):
        raise Fallback("mixed targets")
    logq1, q1 = c.student_t1
    target = c.target_n.long()
    valid = target != -100
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    k = (coef_n * valid).to(q1.dtype)
    if c.grad is not None:
        c.add_grad(q1, k)
        c.grad.scatter_add_(1, safe, -k.unsqueeze(1))
    return torch.where(valid, -logq1.gather(1, safe).squeeze(1), torch.zeros_like(k))


def forward_kl(c: ClosedChunk, coef_n: torch.Tensor) -> torch.Tensor:
    logq, q = c.student
    logp, p = c.teacher_dense
    tmp = c.buffer("tmp0")
    torch.sub(logp, logq, out=tmp).mul_(p)
    value, k = _clamped(tmp.sum(-1), coef_n / c.T)
    if c.grad is not None:
        c.add_grad(torch.sub(q, p, out=tmp), k)
    return value


def soft_ce(c: ClosedChunk, coef_n: torch.Tensor) -> torch.Tensor:
    logq, q = c.student
    logp, p = c.teacher_dense
    tmp = c.buffer("tmp0")
    value = -torch.mul(p, logq, out=tmp).sum(-1)
    if c.grad is not None:
        c.add_grad(torch.sub(q, p, out=tmp), coef_n / c.T)
    return value


def reverse_kl(c: ClosedChunk, coef_n: torch.Tensor) -> torch.Tensor:
    logq, q = c.student
    logp, _ = c.teacher_dense
    d, tmp = c.buffer("tmp0"), c.buffer("tmp1")
    torch.sub(logq, logp, out=d)
    raw = torch.mul(d, q, out=tmp).sum(-1)
    value, k = _clamped(raw, coef_n / c.T)
    if c.grad is not None:
        c.add_grad(d.sub_(raw.unsqueeze(1)).mul_(q), k)
    return value


def jsd(c: ClosedChunk, coef_n: torch.Tensor, *, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return forward_kl(c, coef_n)
    if beta == 1.0:
        return reverse_kl(c, coef_n)
    logq, q = c.student
    logp, p = c.teacher_dense
    a, logu = c.buffer("tmp0"), c.buffer("tmp1")
    # m = (1 - beta) u, u = q + beta / (1 - beta) p (one pass): log m = log u + log(1 - beta), a constant that
    # leaves the gradient and adds to the value (p and q sum to 1). Where p and q both underflow, u = 0 and the
    # sums come out NaN: only then is log u clamped to fp32's smallest normal and the sums redone (adding 0 there).
    torch.add(q, p, alpha=beta / (1.0 - beta), out=logu).log_()
    for _ in range(2):
        kl_pm = torch.sub(logp, logu, out=a).mul_(p).sum(-1)
        qd = torch.sub(logq, logu, out=a).mul_(q)  # q (log q - log u)
        kl_qm = torch.sum(qd, -1)
        if all_finite(kl_pm + kl_qm):
            break
        logu.clamp_min_(math.log(torch.finfo(logu.dtype).tiny))
    value, k = _clamped(beta * kl_pm + (1.0 - beta) * kl_qm - math.log1p(-beta), coef_n * ((1.0 - beta) / c.T))
    if c.grad is not None:  # k q (d - KL(q||m)), d = log q - log m: the same with log u for log m
        c.add_grad(qd, k)
        c.grad.addcmul_(q, (-k * kl_qm).unsqueeze(1))
    return value


def all_finite(x: torch.Tensor) -> bool:
    """No ``inf`` or NaN in ``x``: its sum is finite (one read; bf16 sums run in fp32 and share its range, which
    logits never sum past; ``sum(dtype=float32)`` would copy the whole chunk first: 39 ms against 1.5 ms at
    ``[64, 256000]``). fp16's range is too small for the sum, so its entries are checked one by one."""
    return bool(torch.isfinite(x).all() if x.dtype == torch.float16 else torch.isfinite(x.sum()))


def run_chunk(plan, ws: Workspace, head: Head | None, x: torch.Tensor, rows: slice | torch.Tensor,
              keep: torch.Tensor | None, stats: list, want_grad: bool = True):
    """One chunk through the closed forms: ``(total, parts, d total / d logits [n, V])``, or None when the chunk
    needs the autograd kernels (a non-finite logit, or a case the closed forms leave out)."""
    x_rows = x[rows].detach()
    z = head.logits_buffer(x_rows, ws) if head is not None else x_rows  # raw logits, read by ClosedChunk.student
    if not all_finite(z):
        return None
    teacher = plan.teacher.take(rows)
    weight_n = plan.weight_flat[rows].float() if plan.weight_flat is not None else torch.ones_like(z[:, 0])
    if keep is not None:
        weight_n = weight_n * keep
    target = plan.target_flat[rows] if plan.target_flat is not None else None
    chunk = ClosedChunk(ws, z, teacher, target, plan.loss_temperature, want_grad)
    try:
        total, parts = evaluate(plan.terms, chunk, weight_n, stats)
    except Fallback:
        return None
    return total, parts, chunk.written_grad()


def usable(plan) -> bool:
    """Whether every term of ``plan`` has a closed form here (else the call runs the autograd kernels): fp32
    math, at most one dense teacher or a top-k one, no cross-tokenizer teacher, no batch statistics, plain
    target ids."""
    teacher = plan.teacher
    if plan.dtype != torch.float32 or teacher.cross is not None or len(teacher.dense) > 1:
        return False
    if any(t.prepass is not None for t in plan.terms):
        return False
    if plan.target_flat is not None and not isinstance(plan.target_flat, torch.Tensor):
        return False
    for t in plan.terms:
        if t.uses_teacher and not teacher.present:
            return False
        if t.uses_teacher and teacher.topk is not None:
            if not t.on_bins:
                return False
        elif t.closed_form is None:
            return False
    return True


def evaluate(terms, c: ClosedChunk, weight_n: torch.Tensor, stats: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted sum and per-term (scaled, unweighted) sums of one chunk, as ``Plan.evaluate`` gives them;
    ``weight_n`` ``[n]`` is each row's token weight (0 for a row that does not count). The gradient of the
    weighted sum with respect to the raw logits is left in ``c.grad``."""
    parts = []
    for term, s in zip(terms, stats):
        coef = weight_n * (term.weight * term.scale)
        if term.uses_teacher and c.teacher.topk is not None:
            values = term.on_bins(c, coef, term.kernel, s)
        else:
            values = term.closed_form(c, coef)
        values = torch.where(weight_n != 0, values * weight_n, torch.zeros_like(values))
        parts.append(term.scale * values.sum())
    total = sum(t.weight * p for t, p in zip(terms, parts))
    return total, parts
