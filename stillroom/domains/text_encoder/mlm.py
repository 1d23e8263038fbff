"""BERT's masked-language-model objective as a player of the one loop: deterministic masks, the loss, the encoder.

Masks (:func:`mlm_mask`) are BERT's: each non-special token of a sequence is selected with probability
``mask_prob`` (0.15); a selected token becomes ``[MASK]`` (80%), a random vocabulary id (10%) or stays (10%),
and is predicted. Every random number is drawn from one generator per sequence seeded from ``(seed, step,
uid)`` over the sequence's own length (not the padded width), so the same text at the same step is masked the
same whatever batch it lands in, and a resumed run masks exactly as the uninterrupted one. A sequence whose
draw selects nothing gets its least-noise token selected, so every sequence has a target.

:func:`mlm_loss` is a per-sequence mean of the cross-entropy over its selected tokens, summed over sequences,
with one count per sequence (``(sum, B)``), like the MAE loss's per-image mean (:func:`~stillroom.domains.
vision.mae.mae_loss`): ``sum / B`` then adds to the [CLS] regression's ``(1/B) sum ||.||^2`` exactly as the
paper's objective does. (BERT's own loss is a mean over the batch's masked tokens; the two are equal when
every sequence has the same number of them.) The output head runs only at the selected positions (``[M, V]``
logits, not ``[B, T, V]``); :func:`full_logits_mlm_loss` is the plain path it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.train.clocked import ClockedObjective, StepClock

ENCODER_PREFIX = "bert."
"""Names of the encoder's weights in a ``BertForMaskedLM`` (the head's start with ``cls.``; the decoder matrix is
tied to ``bert.embeddings.word_embeddings.weight``)."""


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs from the tokenizer and model: ``[MASK]``'s id, the vocabulary size (random tokens) and
    the special ids never selected ([CLS], [SEP], [PAD], ...)."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15

    @classmethod
    def of(cls, tokenizer, vocab_size: int, mask_prob: float = 0.15) -> "MaskSpec":
        return cls(int(tokenizer.mask_token_id), int(vocab_size), tuple(sorted(tokenizer.all_special_ids)), mask_prob)


def mask_sequence(ids_t: torch.Tensor, uid: str, seed: int, step: int, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked ids [T], selected [T] bool)`` of one unpadded sequence (see the module docstring)."""
    n = len(ids_t)
    g = torch.Generator().manual_seed(derive_seed(seed, "mlm-mask", step, uid))
    select_u, action_u = torch.rand(n, generator=g), torch.rand(n, generator=g)
    random_ids = torch.randint(spec.vocab_size, (n,), generator=g)
    candidate = ~torch.isin(ids_t.cpu(), torch.tensor(spec.special_ids, dtype=ids_t.dtype))
    selected = candidate & (select_u < spec.mask_prob)
    if not selected.any() and candidate.any():
        selected[torch.where(candidate, select_u, torch.inf).argmin()] = True
    masked = ids_t.cpu().clone()
    masked[selected & (action_u < 0.8)] = spec.mask_id
    swap = selected & (action_u >= 0.8) & (action_u < 0.9)
    masked[swap] = random_ids[swap]
    return masked.to(ids_t.device), selected.to(ids_t.device)


def mlm_mask(input_ids_bt: torch.Tensor, attention_mask_bt: torch.Tensor, uids: list[str], seed: int, step: int,
             spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked ids [B, T], selected [B, T] bool)``: :func:`mask_sequence` per row over its attended length."""
    masked, selected = input_ids_bt.clone(), torch.zeros_like(input_ids_bt, dtype=torch.bool)
    for b, uid in enumerate(uids):
        n = int(attention_mask_bt[b].sum())
        masked[b, :n], selected[b, :n] = mask_sequence(input_ids_bt[b, :n], uid, seed, step, spec)
    return masked, selected


def mlm_loss(logits_mv: torch.Tensor, targets_m: torch.Tensor, rows_m: torch.Tensor,
             batch_size: int) -> tuple[torch.Tensor, int]:
    """``(sum over sequences of the mean CE over its selected tokens, B)``: ``logits_mv`` at the ``M`` selected
    positions, ``targets_m`` their original ids, ``rows_m`` the sequence each belongs to."""
    ce_m = F.cross_entropy(logits_mv.float(), targets_m, reduction="none")
    per_row = torch.zeros(batch_size, device=ce_m.device).index_add(0, rows_m, ce_m)
    count = torch.zeros(batch_size, device=ce_m.device).index_add(0, rows_m, torch.ones_like(ce_m))
    return (per_row / count.clamp_min(1)).sum(), batch_size


def full_logits_mlm_loss(model: nn.Module, masked_bt: torch.Tensor, attention_mask_bt: torch.Tensor,
                         original_bt: torch.Tensor, selected_bt: torch.Tensor) -> tuple[torch.Tensor, int]:
    """:func:`mlm_loss` through the model's full ``[B, T, V]`` logits (the plain path; tests only)."""
    logits_btv = model(input_ids=masked_bt, attention_mask=attention_mask_bt).logits
    rows, cols = selected_bt.nonzero(as_tuple=True)
    return mlm_loss(logits_btv[rows, cols], original_bt[rows, cols], rows, masked_bt.shape[0])


def encode_cls(model: nn.Module, input_ids_bt: torch.Tensor, attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """``[B, d]``: the final (post-LayerNorm) [CLS] vector of the encoder on the unmasked sequences."""
    return model.bert(input_ids=input_ids_bt, attention_mask=attention_mask_bt).last_hidden_state[:, 0]


class MlmForward(nn.Module):
    """The player's forward: the batch masked by :func:`mlm_mask` at the clock's step; returns ``logits`` ``[M, V]``
    (the head at the selected positions only), ``targets`` ``[M]``, ``rows`` ``[M]``, and the unmasked
    ``input_ids`` / ``attention_mask`` ``[B, T]`` (what the [CLS] regression and a teacher read)."""

    def __init__(self, model: nn.Module, spec: MaskSpec, seed: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.seed = seed
        self.clock = StepClock()

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The unmasked ``(input_ids, attention_mask)`` of ``batch`` (what a teacher's [CLS] reads)."""
        return batch.input_ids, batch.attention_mask

    def forward(self, batch: Any) -> dict[str, Any]:
        masked, selected = mlm_mask(batch.input_ids, batch.attention_mask, batch.uids, self.seed,
                                    int(self.clock.step), self.spec)
        hidden_btd = self.model.bert(input_ids=masked, attention_mask=batch.attention_mask).last_hidden_state
        rows, cols = selected.nonzero(as_tuple=True)
        return {"logits": self.model.cls(hidden_btd[rows, cols]), "targets": batch.input_ids[rows, cols],
                "rows": rows, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


@dataclass
class MlmObjective(ClockedObjective):
    """The MLM loss alone (plain further pre-training; the baseline of ``self_distill_fpt``). ``extra``: more
    objective state a method adds (theta_0's anchors); the clock always comes along."""

    forward: MlmForward

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        total, count = mlm_loss(outputs["logits"], outputs["targets"], outputs["rows"], len(batch.uids))
        return LossResult(total=total, count=count, parts={"mlm": float(total.detach())})


@torch.no_grad()
def heldout_mlm_loss(model: nn.Module, examples: list, spec: MaskSpec, seed: int, batch_size: int,
                     pad_id: int = 0) -> float:
    """Mean cross-entropy per masked held-out token (nats; BERT's token mean, not the training loss's per-sequence
    mean) under masks fixed per text by ``(seed, "eval" step -1, uid)``, in eval mode."""
    from stillroom.domains.text_encoder.data import collate_text

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate_text(examples[i:i + batch_size], pad_id).to(device)
        masked, selected = mlm_mask(batch.input_ids, batch.attention_mask, batch.uids, seed, -1, spec)
        hidden_btd = model.bert(input_ids=masked, attention_mask=batch.attention_mask).last_hidden_state
        rows, cols = selected.nonzero(as_tuple=True)
        ce = F.cross_entropy(model.cls(hidden_btd[rows, cols]).float(), batch.input_ids[rows, cols], reduction="sum")
        total, count = total + float(ce), count + len(rows)
    model.train(was)
    return total / max(count, 1)
