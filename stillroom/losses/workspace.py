"""Buffers reused across the chunks of a loss call and across steps.

Why: on a CPU, each fresh ``[rows, V]`` fp32 temporary larger than glibc's mmap threshold (32 MiB at most: a
``[256, 49152]`` chunk is 48 MiB) is new memory from the kernel, and its page faults cost several times the op
itself; a fresh ``[V, D]`` head-sized tensor at a 256k vocabulary (563 MiB in fp32) costs 0.15-1 s of them
(docs/BENCHMARKS.md). A :class:`Workspace` keeps named buffers between calls so a steady loop touches fresh memory
only when a shape changes.
"""

from __future__ import annotations

import math

import torch


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
        much as the loss itself (docs/BENCHMARKS.md), so a steady loop should touch none.

        Not used for the gradient handed to autograd: autograd adds a tied embedding's gradient into that one in
        place only when nothing else holds its storage, so a kept one would cost a fresh sum instead."""
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

