"""The teacher in head mode: its last hidden state and output head instead of ``[B, T, V]`` logits.

Two losses apply the teacher's head themselves, a chunk of rows at a time: Liger's fused linear divergence
(``loss.kernel: liger``, :mod:`stillroom.losses.liger`) and stillroom's own fused path, whose
:class:`~stillroom.teachers.signal.TeacherRows` makes each chunk's teacher logits from the hidden state. The
teacher then stops before its head (:meth:`~stillroom.teachers.signal.OnlineTeacher.with_head`). It lives in the
language-model domain: it reads the model's body and head (:mod:`stillroom.models`), which the losses must not
import.
"""

from __future__ import annotations

import torch

from stillroom.models import body_of, output_head
from stillroom.teachers.signal import OnlineTeacher


def liger_teacher(cfg, source) -> OnlineTeacher:
    """The Liger teacher source in place of the run's online teacher ``source`` (``cfg``: the run config), or
    ``ValueError`` naming the setting when the teacher is not a dense online one with the student's tokenizer."""
    if cfg.teacher.source != "online" or cfg.teacher.tokenizer_mode != "same" or not isinstance(source, OnlineTeacher):
        raise ValueError(f"loss.kernel=liger needs a dense online teacher with the student's tokenizer (got "
                         f"teacher.source={cfg.teacher.source}, teacher.tokenizer_mode={cfg.teacher.tokenizer_mode}); "
                         "use loss.kernel=stillroom with store, remote, ensemble or cross-tokenizer teachers")
    return source.with_head(body_of(source.model), output_head(source.model))


def head_mode_teacher(source, mix) -> object:
    """``source`` in head mode for stillroom's fused loss when that is exact and saves the ``[B, T, V]`` logits:
    a plain online teacher (not remembered, not an ensemble, same tokenizer) on the student's device (elsewhere
    its head would be copied there), a mix of logit terms only (no teacher hidden states or attentions to hand
    over), a head that is a plain ``nn.Linear`` whose output is the logits (no soft-capping or scaling).
    Anything else is returned as it is."""
    if type(source) is not OnlineTeacher or source.hidden_layers or source.attentions or not mix.needs_logits:
        return source
    if torch.empty(0, device=source.output_device).device != source.device:  # ("cuda" resolved to its index)
        return source
    try:
        head = output_head(source.model)
    except (NotImplementedError, TypeError):  # logits post-processed, or not a Linear head
        return source
    if not isinstance(head, torch.nn.Linear):  # a LoRA-wrapped head
        return source
    return source.with_head(body_of(source.model), head)
