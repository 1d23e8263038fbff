"""Speculative decoding with the real SmolLM2-135M-Instruct teacher (slow: loads and dequantizes a GGUF)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import smollm2_gguf

from stillroom.generate.speculative import autoregressive_generate, speculative_generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    folder, name = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def test_real_model_greedy_parity_and_sampling(smollm2):
    target, tok = smollm2
    draft = copy.deepcopy(target)  # a layer-dropped draft: first 8 of 30 layers
    draft.model.layers = draft.model.layers[:8]
    draft.config.num_hidden_layers = 8
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    reference = autoregressive_generate(target, prompt, max_new_tokens=12).tokens
    assert "Paris" in tok.decode(reference)
    assert speculative_generate(target, draft, prompt, gamma=3, max_new_tokens=12).tokens == reference
    # The model as its own draft accepts everything.
    self_draft = speculative_generate(target, target, prompt, gamma=3, max_new_tokens=12)
    assert self_draft.tokens == reference and self_draft.stats.acceptance_rate == 1.0
    sampled = speculative_generate(
        target, draft, prompt, gamma=3, max_new_tokens=12, greedy=False, generator=torch.Generator().manual_seed(0)
    )
    assert len(sampled.tokens) == 12 and 1.0 <= sampled.stats.block_efficiency <= 4.0
