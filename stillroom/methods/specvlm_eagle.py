"""SpecVLM with EAGLE's feature-level draft head as the trained player (``specvlm.draft: eagle_head``).

The frozen target runs on each micro-batch (its image features are part of the sequence for a VLM) and gives its
last-layer features ``f`` (after the final norm), its first layer's inputs ``e`` (token embeddings; image features
at image tokens) and its logits. The head reads ``f_t`` and ``e_{t+1}`` and predicts ``f^_{t+1}``
(:mod:`stillroom.generate.eagle_head`); the target's frozen LM head turns it into logits for token ``t + 2``. The
run's ``loss.terms`` compare, at head position t (target position t + 1):

* hidden terms (``hidden_smooth_l1``, ``layers: last`` or ``[[head_layers, target_layers]]``): ``f^_{t+1}`` with
  the target's ``f_{t+1}``;
* logit terms (``soft_ce``): the head's logits with the target's logits at position t + 1 (``ce``: the data's
  token t + 2);

counted where the target's position t + 1 counts (``loss_mask[:, 1:]``), so the head learns exactly the
predictions the drafting asks of it. The shipped recipe: 1.0 x Smooth-L1 + 0.1 x soft CE (EAGLE's weights).
Everything else (the loop, accumulation, global normalisation, checkpoints, the acceptance curve) is the run's.
The target's time is part of the step (it runs inside the head's forward: the head's inputs are its outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stillroom.data.batch import model_inputs_for
from stillroom.generate.eagle_head import EagleHead
from stillroom.losses import LossMix, LossResult, StudentOutput
from stillroom.teachers.signal import TeacherSignal


class EagleForward(torch.nn.Module):
    """The head on one batch (what DDP wraps; the target is held outside its children and never trained).

    Returns ``logits`` ``[B, T-1, V]`` (the target's LM head on the predicted features), ``pred`` ``[B, T-1, D]``,
    and the target's ``feat`` ``[B, T-1, D]`` (``f_{t+1}``) and ``t_logits`` ``[B, T-1, V]`` (position t + 1),
    all aligned on head position t."""

    def __init__(self, head: EagleHead, target: torch.nn.Module, vocab: int):
        super().__init__()
        self.head = head
        self._target = (target,)
        self.vocab = vocab

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if batch.position_ids is not None:
            raise ValueError("specvlm.draft=eagle_head: packed documents (data.attention: within_documents) are not "
                             "supported; the head attends causally over a whole row. Set data.pack: false")
        target = self._target[0]
        device = next(self.head.parameters()).device
        with torch.no_grad():
            t_device = next(target.parameters()).device
            out = target(**model_inputs_for(target, batch, t_device), use_cache=False, output_hidden_states=True)
            feat_btd = out.hidden_states[-1].to(device)
            emb_btd = out.hidden_states[0].to(device)
            t_logits_btv = out.logits[..., : self.vocab].to(device)
        pred_btd = self.head(feat_btd[:, :-1], emb_btd[:, 1:])
        lm_head = target.get_output_embeddings()
        weight = lm_head.weight.detach()[: self.vocab].to(device)
        bias = None if lm_head.bias is None else lm_head.bias.detach()[: self.vocab].to(device)
        logits_btv = torch.nn.functional.linear(pred_btd.to(weight.dtype), weight, bias)
        return {"logits": logits_btv, "pred": pred_btd, "feat": feat_btd[:, 1:], "t_logits": t_logits_btv[:, 1:]}


def eagle_mix(loss_cfg, head: EagleHead, target: torch.nn.Module) -> LossMix:
    """The run's loss terms sized for the head (its width is the target's: no projection) and checked: hidden
    terms must pair the head's last layer with the target's last layer; attention terms have nothing to read."""
    text = target.config.get_text_config()
    n_head, n_target = head.config.layers, int(text.num_hidden_layers)
    mix = LossMix(loss_cfg, student_hidden=head.config.hidden_size, teacher_hidden=head.config.hidden_size,
                  student_layers=n_head, teacher_layers=n_target)
    if mix.needs_attentions:
        raise ValueError("specvlm.draft=eagle_head: attention loss terms have no head attention map to compare; "
                         "use soft_ce and hidden_smooth_l1")
    pairs = {(s, t) for m in mix.layer_maps.values() for s, t in m}
    if pairs - {(n_head, n_target)}:
        raise ValueError(f"specvlm.draft=eagle_head: hidden terms compare the head's predicted feature (layer "
                         f"{n_head}) with the target's last feature (layer {n_target}); got layer pairs "
                         f"{sorted(pairs)}: use params: {{layers: last}} (or [[{n_head}, {n_target}]])")
    return mix


@dataclass
class EagleObjective:
    """The head's loss through the run's mix (module docstring); a loop :class:`~stillroom.train.loop.Objective`."""

    forward: EagleForward
    mix: LossMix

    @property
    def state(self) -> torch.nn.Module:
        return self.mix

    def signal(self, batch: Any) -> None:
        return None  # the target runs inside the forward: its outputs are the head's inputs

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        teacher = TeacherSignal(logits_btv=outputs["t_logits"],
                                hidden_states={t: outputs["feat"] for t in self.mix.teacher_hidden_layers})
        student = StudentOutput(logits_btv=outputs["logits"],
                                hidden_states={s: outputs["pred"] for s in self.mix.student_hidden_layers})
        weight = None if batch.target_weight is None else batch.target_weight[:, 1:]
        return self.mix(student, teacher, batch.target_ids[:, 1:], batch.loss_mask[:, 1:], weight)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.mix.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.mix.log_state()


def eagle_player(ctx, head: EagleHead, replace_batches) -> Any:
    """The head's :class:`~stillroom.train.loop.Player` (it replaces the student's: the student is not trained)."""
    from stillroom.train.loop import Player

    target = ctx.teacher_model
    mix = eagle_mix(ctx.cfg.loss, head, target)
    return Player("eagle_head", head, EagleObjective(EagleForward(head, target, ctx.vocab_size), mix),
                  replace_batches=replace_batches)
