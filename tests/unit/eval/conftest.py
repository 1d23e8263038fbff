"""Tiny offline fixtures for the eval tests: random Llama models, hand-built batches."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stillroom.data.batch import Example, collate

VOCAB = 64


def tiny_llama(seed: int, vocab_size: int = VOCAB, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def make_examples(n: int, seed: int = 0, vocab: int = VOCAB) -> list[Example]:
    """Examples of different lengths; the first 3 tokens of each are a prompt (not targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        target = [False] * 3 + [True] * (length - 3)
        out.append(Example(input_ids=ids, target=target, uid=f"ex{i}", n_bytes=4 * (length - 3) + i))
    return out


@pytest.fixture
def llama_factory():
    """``factory(seed, vocab_size=64, tie=False)`` -> a tiny random Llama in eval mode."""
    return tiny_llama


@pytest.fixture
def examples_factory():
    """``factory(n, seed=0, vocab=64)`` -> examples with a 3-token prompt each."""
    return make_examples


@pytest.fixture
def student():
    return tiny_llama(1)


@pytest.fixture
def teacher():
    return tiny_llama(2)


@pytest.fixture
def batches():
    ex = make_examples(5)
    return [collate(ex[:3], pad_id=0), collate(ex[3:], pad_id=0)]
