"""How a causal-LM student runs on a batch during training: one module, what DDP wraps."""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch, model_inputs_for
from stillroom.losses import OutputHead
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

    def forward(self, batch: Batch) -> dict:
        kwargs = dict(**model_inputs_for(self.model, batch), use_cache=False,
                      output_hidden_states=bool(self.hidden_layers), output_attentions=self.attentions)
        if self.fused:
            out = self.body(**kwargs)
            weight, bias = self.head.weight, self.head.bias
            if weight.shape[0] != self.vocab:  # a slice only when needed: its backward is a zeroed [V, D] copy
                weight, bias = weight[: self.vocab], None if bias is None else bias[: self.vocab]
            hidden = out.last_hidden_state
            result = {"hidden": hidden, "head": OutputHead(weight, bias, autocast_dtype(hidden))}
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
