"""How a causal-LM student runs on a batch during training: one module, what DDP wraps."""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch, model_inputs_for
from stillroom.losses import OutputHead, TiedHeadGrad
from stillroom.models import body_of, output_head


class StudentForward(torch.nn.Module):
    """The student's forward pass on a :class:`Batch` as one module.

    Returns a dict: on the fused path ``hidden`` (last hidden state after the final norm
    ``[B, T, D]``) and ``head`` (the output head's weight ``[V, D]`` and bias restricted to the
    shared vocabulary: the loss applies it chunk by chunk); on the plain path ``logits``
    (``[B, T, V]`` sliced to the shared vocabulary); plus ``hs_<i>`` hidden states and
    ``att_<i>`` attentions the loss terms ask for.
    """

    def __init__(self, model: torch.nn.Module, *, fused: bool, hidden_layers: list[int], vocab: int,
                 attentions: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused
        self.body = body_of(model) if fused else None  # found once, not per batch
        self.head = output_head(model) if fused else None
        self.hidden_layers = hidden_layers
        self.vocab = vocab
        self.attentions = attentions
        self.tied = tied_embedding(model, self.head) if fused else None

    def forward(self, batch: Batch) -> dict:
        kwargs = dict(**model_inputs_for(self.model, batch), use_cache=False,
                      output_hidden_states=bool(self.hidden_layers), output_attentions=self.attentions)
        if self.fused:
            weight, bias = self.head.weight, self.head.bias
            sink = None  # the head's gradient on its way to the tied embedding's backward (whole vocabulary only)
            if self.tied is not None and weight.shape[0] == self.vocab and weight.requires_grad and \
                    torch.is_grad_enabled() and "input_ids" in kwargs:
                sink = TiedHeadGrad()
                kwargs["inputs_embeds"] = _TiedEmbedding.apply(kwargs.pop("input_ids"), weight, sink,
                                                               self.tied.padding_idx)
            out = self.body(**kwargs)
            if weight.shape[0] != self.vocab:  # a slice only when needed: its backward is a zeroed [V, D] copy
                weight, bias = weight[: self.vocab], None if bias is None else bias[: self.vocab]
            hidden = out.last_hidden_state
            result = {"hidden": hidden, "head": OutputHead(weight, bias, autocast_dtype(hidden), sink)}
        else:
            out = self.model(**kwargs)
            result = {"logits": out.logits[..., : self.vocab]}
        for i in self.hidden_layers:
            result[f"hs_{i}"] = out.hidden_states[i]
        if self.attentions:
            for i, a in enumerate(out.attentions):
                result[f"att_{i}"] = a
        return result


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``x``'s device here, or ``None`` when autocast is off."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def tied_embedding(model: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it is a plain ``nn.Embedding`` sharing its weight with the output ``head`` and
    the vocabulary is whole (SmolLM2, Llama 3.2 1B, Gemma, Qwen small: tied), in a text model on one process;
    else None. Its gradient then goes through :class:`_TiedEmbedding`. Left out: a vision-language model
    (its body finds image tokens in ``input_ids``), an embedding that scales, normalises or is sparse, and
    distributed runs (their wrappers hook the weight's gradient themselves)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is not torch.nn.Embedding or emb.weight is not getattr(head, "weight", None):
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return None
    if getattr(getattr(model, "config", None), "vision_config", None) is not None:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        return None
    return emb


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids [B, T], weight [V, D]) -> [B, T, D]`` whose backward adds its rows into the fused loss's
    head gradient (``sink``, filled by the loss's backward, which runs first) and returns that one ``[V, D]``
    gradient for the shared weight: no zeroed ``[V, D]`` of its own and no sum of two (:class:`TiedHeadGrad`).
    Rows of ``padding_idx`` add nothing, as in ``F.embedding``."""

    @staticmethod
    def forward(ctx, ids, weight, sink, padding_idx):
        ctx.save_for_backward(ids)
        ctx.sink, ctx.padding_idx, ctx.shape, ctx.dtype = sink, padding_idx, weight.shape, weight.dtype
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_btd):
        (ids,) = ctx.saved_tensors
        grad = ctx.sink.take()
        if grad is None:  # the loss did not reach the head in this graph
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_btd.device)
        ids, rows = ids.reshape(-1), grad_btd.reshape(-1, grad_btd.shape[-1])
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        return None, grad.index_add_(0, ids, rows.to(grad.dtype)), None, None
