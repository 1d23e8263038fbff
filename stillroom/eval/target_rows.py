"""The logits of a batch's target positions, without the batch's whole ``[B, T, V]`` logits.

Held-out evaluation compares, at every target position, the model's next-token distribution with the
truth and with the teacher's. A model's full logits are ``B x T x V``: with a 256k vocabulary one 4 x 128
batch holds 256 MiB of them in bf16 per model, before any fp32 copy (measured: evaluation then peaked at
5.8x a fused training step, docs/BENCHMARKS.md). Where a model's logits are its output head applied to its
last hidden state (Llama-, Qwen-, Mistral-style and LLaVA-style models), :class:`TargetRows` keeps the
hidden states of the target positions ``[N, H]`` and applies the head a chunk of rows at a time, so at most
``chunk x V`` logits exist; the numbers are the same (the head is the same matmul, under the same autocast).
Any other model (logit soft-capping, no plain head) gives its whole logits once, sliced to the target rows.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F

from stillroom.losses.terms import forward_kl_rows
from stillroom.models import body_of, output_head

ROW_CHUNK = 1024
"""Target rows per fp32 chunk when computing log-softmaxes (bounds peak memory)..."""
CHUNK_BYTES = 64 << 20
"""... and at most this many bytes of each ``[rows, V]`` fp32 temporary (a 256k vocabulary: 64 rows)."""


def slice_vocab(logits_btv: torch.Tensor, vocab_size: int | None, who: str) -> torch.Tensor:
    """The first ``vocab_size`` columns (drops padding rows of an embedding matrix); refuses a wider ``vocab_size``."""
    if vocab_size is None:
        return logits_btv
    if logits_btv.shape[-1] < vocab_size:
        raise ValueError(
            f"{who} logits have {logits_btv.shape[-1]} columns but vocab_size={vocab_size}; "
            "vocab_size must not exceed the model's output width"
        )
    return logits_btv[..., :vocab_size]


class TargetRows:
    """``rows(lo, hi) -> [hi - lo, V]`` logits of target positions ``lo:hi`` (in ``mask_bt.nonzero()`` order).

    ``inputs``: the model's forward arguments for the batch, on its device; ``mask_bt`` ``[B, T]`` bool on the
    same device; ``vocab_size``: keep the first columns only (padding rows of the head); ``where``: names the
    model in errors.
    """

    def __init__(self, model: torch.nn.Module, inputs: dict, mask_bt: torch.Tensor, vocab_size: int | None,
                 where: str) -> None:
        self.vocab_size = vocab_size
        try:
            body, self.head = body_of(model), output_head(model)
        except (TypeError, NotImplementedError, AttributeError):  # logits are not head(last hidden state)
            body = self.head = None
        if body is None:
            out = model(**inputs).logits
            self._check(out.shape, mask_bt, where)
            self.logits_nv, self.hidden_nh = slice_vocab(out, vocab_size, where)[mask_bt], None
        else:
            hidden = body(**inputs, use_cache=False).last_hidden_state
            self._check(hidden.shape, mask_bt, where)
            self.hidden_nh, self.logits_nv = hidden[mask_bt], None
            slice_vocab(self.head.weight.T, vocab_size, where)  # refuses a vocab_size wider than the head
        self.width = self.logits_nv.shape[-1] if self.hidden_nh is None else (vocab_size or self.head.weight.shape[0])
        """``V``: the logit columns every chunk has."""

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if self.hidden_nh is None:
            return self.logits_nv[lo:hi]
        logits = self.head(self.hidden_nh[lo:hi])
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]

    @staticmethod
    def _check(shape: torch.Size, mask_bt: torch.Tensor, where: str) -> None:
        if tuple(shape[:2]) != tuple(mask_bt.shape):
            raise ValueError(f"{where} outputs {tuple(shape)} do not match batch shape {tuple(mask_bt.shape)}")


def weights_version(model: torch.nn.Module) -> tuple[int, int]:
    """Changes whenever a parameter or buffer of ``model`` is written in place or replaced (autograd's version
    counters), so remembered teacher rows are never served for weights that changed."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t._version for t in tensors), hash(tuple(t.data_ptr() for t in tensors))


def rows_key(model: torch.nn.Module, inputs: dict, mask_bt: torch.Tensor, vocab_size: int | None,
              device: torch.device) -> tuple:
    """What a batch's remembered target rows depend on: the inputs' bytes, the mask, the columns kept, the
    autocast state and the weights' version."""
    digest = hashlib.sha1()
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            digest.update(name.encode() + str(value.dtype).encode() + str(tuple(value.shape)).encode())
            digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    digest.update(mask_bt.contiguous().cpu().numpy().tobytes())
    cast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    return digest.hexdigest(), vocab_size, str(cast), weights_version(model)


def token_sums_many(
    models_nv: list[torch.Tensor | Callable[[int, int], torch.Tensor]], targets_n: list[torch.Tensor],
    teacher_nv: torch.Tensor | Callable[[int, int], torch.Tensor] | None,
) -> list[tuple[float, float, int]]:
    """Per model, sums over the same N target rows: (CE nats, KL(teacher || model) nats, top-1 matches).

    ``models_nv`` / ``teacher_nv``: ``[N, V]`` any float dtype, or ``rows(lo, hi)`` giving them a chunk at a time
    (:class:`TargetRows`); upcast to fp32 at most ``CHUNK_BYTES`` of rows at a time (and ``ROW_CHUNK`` rows);
    ``targets_n``: per model ``[N]`` int on its device. The teacher's side of each chunk is computed once for
    every model, and a model that *is* ``teacher_nv`` (the same object) reuses it. KL and matches are 0 when
    ``teacher_nv`` is None.
    """
    def chunks(x):
        return x if callable(x) or x is None else (lambda lo, hi: x[lo:hi])

    width = getattr(models_nv[0], "width", None) or models_nv[0].shape[-1]
    step = max(1, min(ROW_CHUNK, CHUNK_BYTES // (4 * width)))
    t_rows = chunks(teacher_nv)
    sums = [[0.0, 0.0, 0] for _ in models_nv]
    n = targets_n[0].shape[0]
    for start in range(0, n, step):
        stop = min(start + step, n)
        t_logp = None
        if t_rows is not None:
            t_logits = t_rows(start, stop).float()
            t_logp = F.log_softmax(t_logits, dim=-1)
            # KL(p_t || p_s) by the loss library's forward KL (the training loss's math). An entry
            # whose fp32 teacher probability is 0 (-inf logit, or exp underflow) contributes exactly
            # 0, whatever the model gives it (-inf included): marked -inf, which forward_kl_rows skips.
            t_kl = t_logp.masked_fill(t_logp.exp() == 0, float("-inf"))
            t_arg = t_logits.argmax(-1)
        for j, rows in enumerate(models_nv):
            s_logp = t_logp if rows is teacher_nv else F.log_softmax(chunks(rows)(start, stop).float(), dim=-1)
            sums[j][0] += float(F.nll_loss(s_logp, targets_n[j][start:stop], reduction="sum"))
            if t_rows is None:
                continue
            if t_logp.shape != s_logp.shape:
                raise ValueError(f"teacher logits {tuple(t_logp.shape)} vs model logits {tuple(s_logp.shape)} "
                                 "for the same rows; pass vocab_size=<shared vocabulary size> when the widths "
                                 "differ only by padding")
            device = s_logp.device
            sums[j][1] += float(forward_kl_rows(t_kl.to(device), s_logp).sum())
            sums[j][2] += int((t_arg.to(device) == s_logp.argmax(-1)).sum())
    return [tuple(s) for s in sums]
