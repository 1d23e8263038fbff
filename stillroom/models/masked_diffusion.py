"""A small masked-diffusion language model and its training objective (LLaDA's, Nie et al. 2025).

The model is a Hugging Face ``BertForMaskedLM``: bidirectional attention (no causal mask), absolute positions,
dropout 0, saved and loaded as a plain folder (``save_pretrained`` / ``AutoModelForMaskedLM``). Its vocabulary
is ``values`` value tokens (ids ``0 .. values-1``), the separator (``values``) and ``[MASK]`` (``values + 1``).

Forward process: an answer token is replaced by ``[MASK]`` with probability ``t``; the model predicts every
masked token at once. Objective (:func:`masked_diffusion_loss`): ``t ~ U(eps, 1)`` per sequence, each answer
token masked with probability ``t``, cross-entropy on the masked tokens weighted ``1 / t``; summed, counted per
answer token (LLaDA divides by the batch's answer length), the ``(sum, count)`` contract of every loss here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def special_ids(values: int) -> tuple[int, int]:
    """``(separator id, [MASK] id)`` of a vocabulary with ``values`` value tokens."""
    return values, values + 1


def build_mdlm(values: int, positions: int, *, hidden_size: int, layers: int, heads: int, intermediate_size: int,
               seed: int) -> nn.Module:
    """A fresh ``BertForMaskedLM`` over ``values + 2`` ids and ``positions`` positions, weights from ``seed``."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=values + 2, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate_size,
                        max_position_embeddings=positions, type_vocab_size=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=special_ids(values)[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config)


def load_mdlm(folder: Path, values: int, positions: int, where: str) -> nn.Module:
    """A ``BertForMaskedLM`` folder with ``values + 2`` ids and at least ``positions`` positions (eval mode)."""
    from transformers import AutoModelForMaskedLM

    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{where}: {folder} has no config.json; give a folder written by save_pretrained (or leave "
                         "masked_diffusion.base.path null to train the base model here)")
    model = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    if model.config.vocab_size != values + 2:
        raise ValueError(f"{where}: the model in {folder} has vocab_size {model.config.vocab_size}; the task needs "
                         f"{values + 2} ({values} value tokens, the separator, [MASK]): set "
                         "masked_diffusion.task.values to match")
    if model.config.max_position_embeddings < positions:
        raise ValueError(f"{where}: the model in {folder} has {model.config.max_position_embeddings} positions; the "
                         f"task's sequences have {positions}: lower masked_diffusion.task.length")
    return model.eval()


def token_logits(model: nn.Module, tokens_bl: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` float32 logits at every position of ``tokens [B, L]`` (bidirectional: every position sees
    every other)."""
    return model(input_ids=tokens_bl).logits.float()


def forward_mask(answer_mask_bl: torch.Tensor, t_b: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` bool: each position of ``answer_mask`` masked independently with probability ``t_b`` of its row
    (uniforms drawn on the CPU from ``generator``, so a step's masks do not depend on the device)."""
    u_bl = torch.rand(answer_mask_bl.shape, generator=generator).to(answer_mask_bl.device)
    return answer_mask_bl & (u_bl < t_b[:, None].to(answer_mask_bl.device))


def masked_diffusion_loss(logits_blv: torch.Tensor, tokens_bl: torch.Tensor, masked_bl: torch.Tensor,
                          t_b: torch.Tensor, answer_mask_bl: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over masked positions of CE / t of its row, number of answer positions)``: LLaDA's objective.

    ``logits [B, L, V]`` of the masked input, ``tokens [B, L]`` the clean sequence, ``masked [B, L]`` the positions
    replaced by ``[MASK]``, ``t [B]`` each row's mask probability, ``answer_mask [B, L]`` the answer positions
    (the count: LLaDA normalises by the answer length, not by how many were masked, so the estimate is unbiased).
    """
    ce_bl = F.cross_entropy(logits_blv.flatten(0, 1), tokens_bl.flatten(), reduction="none").view(tokens_bl.shape)
    weighted_bl = ce_bl * masked_bl / t_b[:, None]
    return weighted_bl.sum(), int(answer_mask_bl.sum())
