"""Tiny random Llama target/draft pairs that share a vocabulary (imported by the generate tests).

A module of its own, not ``conftest``: with several test folders in one pytest run, ``from conftest
import ...`` can resolve to another folder's conftest (tests/unit/data has one).
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_llama(vocab: int, layers: int, seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A copy of ``model`` with Gaussian noise on every weight: a draft that agrees with it part of the time."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out.eval()


def drop_layers(model: LlamaForCausalLM, keep: int) -> LlamaForCausalLM:
    """A copy of ``model`` with only its first ``keep`` decoder layers (shares embeddings and head)."""
    out = copy.deepcopy(model)
    out.model.layers = out.model.layers[:keep]
    out.config.num_hidden_layers = keep
    return out.eval()
