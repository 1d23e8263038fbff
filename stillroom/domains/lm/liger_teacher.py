"""The teacher source of ``loss.kernel: liger``: the online teacher's last hidden state and head, no logits.

Liger's fused linear divergence projects both models' hidden states through their heads chunk by chunk itself
(:mod:`stillroom.losses.liger`), so the teacher stops before its head. It lives in the language-model domain:
it reads the model's body and head (:mod:`stillroom.models`), which the losses must not import.
"""

from __future__ import annotations

import torch

from stillroom.losses.liger import TeacherHidden
from stillroom.models import decoder_body, output_head
from stillroom.data.batch import model_inputs_for
from stillroom.teachers.signal import OnlineTeacher


class LigerTeacher:
    """A teacher source for ``loss.kernel: liger``: the online teacher's body and head (no ``[B, T, V]`` logits)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, output_device: torch.device | str):
        self.model, self.body, head = model, decoder_body(model), output_head(model)
        self.weight = head.weight[:vocab_size].detach().to(output_device)
        self.bias = None if head.bias is None else head.bias[:vocab_size].detach().to(output_device)
        self.device = next(model.parameters()).device
        self.output_device = torch.device(output_device)

    @torch.no_grad()
    def signal(self, batch) -> TeacherHidden:
        out = self.body(**model_inputs_for(self.model, batch, self.device), use_cache=False)
        return TeacherHidden(out.last_hidden_state.to(self.output_device), self.weight, self.bias)


def liger_teacher(cfg, source) -> LigerTeacher:
    """The Liger teacher source in place of the run's online teacher ``source`` (``cfg``: the run config), or
    ``ValueError`` naming the setting when the teacher is not a dense online one with the student's tokenizer."""
    if cfg.teacher.source != "online" or cfg.teacher.tokenizer_mode != "same" or not isinstance(source, OnlineTeacher):
        raise ValueError(f"loss.kernel=liger needs a dense online teacher with the student's tokenizer (got "
                         f"teacher.source={cfg.teacher.source}, teacher.tokenizer_mode={cfg.teacher.tokenizer_mode}); "
                         "use loss.kernel=stillroom with store, remote, ensemble or cross-tokenizer teachers")
    return LigerTeacher(source.model, source.vocab_size, source.output_device)
