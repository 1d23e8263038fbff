"""The in-process teacher: runs a HF model on each batch under ``torch.no_grad``.

Memory placement: the teacher can live on another device than the student
(``teacher.device``) and in bf16 weights (``teacher.dtype``); its activations
are freed after each micro-batch because nothing of its graph is kept. The
signal it returns is dense (``[B, T, V]`` logits, moved to the student's device).
"""

from __future__ import annotations

import torch

from stillroom.data.batch import Batch
from stillroom.models.lora import use_eager_attention
from stillroom.teachers.signal import Fingerprint, TeacherSignal


class OnlineTeacher:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        fingerprint: Fingerprint | None = None,
        hidden_layers: list[int] | None = None,
        attentions: bool = False,
        output_device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.hidden_layers = sorted(set(hidden_layers or []))
        self.attentions = attentions
        if attentions:
            use_eager_attention(self.model)
        self.output_device = torch.device(output_device)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def signal(self, batch: Batch) -> TeacherSignal:
        """Dense teacher logits for ``batch``: ``[B, T, V]`` aligned with the student's positions."""
        out = self.model(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            output_hidden_states=bool(self.hidden_layers),
            output_attentions=self.attentions,
            use_cache=False,
        )
        logits_btv = out.logits[..., : self.vocab_size].to(self.output_device)
        hidden = {}
        if self.hidden_layers:
            hidden = {i: out.hidden_states[i].to(self.output_device) for i in self.hidden_layers}
        attentions = {}
        if self.attentions:
            attentions = {i: a.to(self.output_device) for i, a in enumerate(out.attentions)}
        return TeacherSignal(logits_btv=logits_btv, hidden_states=hidden, attentions=attentions, fingerprint=self.fingerprint)
