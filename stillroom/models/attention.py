"""Which forward-pass inputs a model gets for a batch: the one place that decides flash-attention varlen.

A batch of packed documents (``data.attention: within_documents``) carries ``position_ids`` restarting at each
document. Eager and SDPA attention read the documents from the block-diagonal 4D mask of
:meth:`~stillroom.data.batch.Batch.model_inputs`; flash-attention cannot take that mask. It runs the documents as
variable-length sequences instead (``flash_attn_varlen_func``): the batch's ``position_ids`` without a mask, plus
the cumulative document lengths over the flattened ``[B * T]`` tokens (``cu_seq_lens_q/k``) and the longest
document (``max_length_q/k``). Hugging Face derives those from the positions only for a batch of one row, so they
are given here for every batch size. The student's forward, the online teacher, the held-out metrics and the
packing probe all call :func:`model_inputs_for`, so they agree.
"""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch
from stillroom.models.lora import unwrap

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""``config._attn_implementation`` values whose packed batches run as varlen sequences."""


def uses_varlen(model: torch.nn.Module) -> bool:
    """True when ``model`` (plain, peft-, DDP- or compile-wrapped) runs flash-attention."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) in FLASH_ATTENTION


def model_inputs_for(model: torch.nn.Module, batch: Batch,
                     device: torch.device | str | None = None) -> dict[str, torch.Tensor | int]:
    """The keyword arguments of ``model``'s forward pass on ``batch``, on ``device`` (``None``: where they are).

    Unpacked batches, and any batch for a model without flash-attention: :meth:`Batch.model_inputs` (ids,
    padding or 4D document mask, positions, pixels). Packed batches for a flash-attention model:
    ``model_inputs(varlen=True)`` (ids and ``position_ids`` ``[B, T]``, no mask) plus ``cu_seq_lens_q/k``
    (``[n_docs + 1]`` int32 offsets into the flattened ``B * T`` tokens; every row starts a document, and a
    row's padding is a document of its own, never counted) and ``max_length_q/k`` (ints).
    """
    varlen = uses_varlen(model) and batch.position_ids is not None
    inputs = batch.model_inputs(varlen=True) if varlen else batch.model_inputs()
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    if varlen:
        positions = inputs["position_ids"].reshape(-1)
        starts = (positions == 0).nonzero().squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
        longest = int(cu.diff().max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return inputs
