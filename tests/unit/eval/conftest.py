"""Tiny offline fixtures for the eval tests: random Llama models, hand-built batches."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from transformers import LlamaForCausalLM

from stillroom.data.batch import Example, collate

VOCAB = 64


def eval_llama(seed: int, vocab_size: int = VOCAB, tie: bool = False) -> LlamaForCausalLM:
    """helpers.tiny_llama as the eval tests have it: 2 layers, an untied head unless asked, 128 positions,
    pad/BOS/EOS ids 0/1/2."""
    return tiny_llama(vocab_size, layers=2, seed=seed, tie=tie, max_positions=128, pad=0, bos=1, eos=2)


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
    return eval_llama


@pytest.fixture
def examples_factory():
    """``factory(n, seed=0, vocab=64)`` -> examples with a 3-token prompt each."""
    return make_examples


@pytest.fixture
def student():
    return eval_llama(1)


@pytest.fixture
def teacher():
    return eval_llama(2)


@pytest.fixture
def batches():
    ex = make_examples(5)
    return [collate(ex[:3], pad_id=0), collate(ex[3:], pad_id=0)]
