"""Fixtures of the generate tests: tiny random Llama target/draft pairs (built by generate_models)."""

from __future__ import annotations

import pytest
import torch
from generate_models import drop_layers, make_llama
from transformers import LlamaForCausalLM


@pytest.fixture(scope="module")
def target64() -> LlamaForCausalLM:
    return make_llama(64, layers=4, seed=0)


@pytest.fixture(scope="module")
def draft64(target64) -> LlamaForCausalLM:
    """1-layer draft (the target's first layer) that agrees with the target's argmax about half the time."""
    return drop_layers(target64, 1)


@pytest.fixture(scope="module")
def independent_draft64() -> LlamaForCausalLM:
    return make_llama(64, layers=1, seed=7)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
