"""Tiny random Llama target/draft pairs that share a vocabulary (imported by the generate tests).

A module of its own, not ``conftest``: with several test folders in one pytest run, ``from conftest
import ...`` can resolve to another folder's conftest (tests/unit/data has one).
"""

from __future__ import annotations

import copy

import torch
from helpers import tiny_llama
from transformers import LlamaForCausalLM


def make_llama(vocab: int, layers: int, seed: int, hidden: int = 32) -> LlamaForCausalLM:
    """helpers.tiny_llama as the generate tests have it: an untied head, 256 positions, pad id 0 and no
    BOS/EOS (generation runs to max_new_tokens)."""
    return tiny_llama(vocab, layers, hidden, seed, tie=False, max_positions=256, bos=None, eos=None, pad=0)


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
