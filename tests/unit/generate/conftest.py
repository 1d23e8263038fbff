"""Fixtures of the generate tests: tiny random Llama target/draft pairs (built by generate_models)."""

from __future__ import annotations

import pytest
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

