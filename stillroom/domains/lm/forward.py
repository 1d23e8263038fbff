"""How a causal-LM student runs on a batch during training: one module, what DDP wraps."""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch
from stillroom.models import decoder_body


class SlicedHead(torch.nn.Module):
    """The output head restricted to the first ``vocab`` rows (padding rows dropped), sharing storage."""

    def __init__(self, head: torch.nn.Linear, vocab: int):
        super().__init__()
        self.head = head
        self.vocab = vocab

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight[: self.vocab]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.head.bias is None else self.head.bias[: self.vocab]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class StudentForward(torch.nn.Module):
    """The student's forward pass on a :class:`Batch` as one module.

    Returns a dict: ``hidden`` (last hidden state after the final norm ``[B, T, D]``, fused
    path: the loss applies the head chunk by chunk) or ``logits`` (``[B, T, V]`` sliced to the
    shared vocabulary, plain path), plus ``hs_<i>`` hidden states and ``att_<i>`` attentions
    the loss terms ask for.
    """

    def __init__(self, model: torch.nn.Module, *, fused: bool, hidden_layers: list[int], vocab: int,
                 attentions: bool = False):
        super().__init__()
        self.model = model
        self.body = decoder_body(model) if fused else None  # found once, not per batch
        self.fused = fused
        self.hidden_layers = hidden_layers
        self.vocab = vocab
        self.attentions = attentions

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                      output_hidden_states=bool(self.hidden_layers), output_attentions=self.attentions)
        if self.fused:
            out = self.body(**kwargs)
            result = {"hidden": out.last_hidden_state}
        else:
            out = self.model(**kwargs)
            result = {"logits": out.logits[..., : self.vocab]}
        for i in self.hidden_layers:
            result[f"hs_{i}"] = out.hidden_states[i]
        if self.attentions:
            for i, a in enumerate(out.attentions):
                result[f"att_{i}"] = a
        return result
