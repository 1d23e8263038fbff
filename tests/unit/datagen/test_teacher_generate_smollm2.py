"""Smoke test with the real SmolLM2-135M-Instruct teacher (GGUF, dequantized): chat-templated, batched generation."""

from __future__ import annotations

import pytest
from helpers import smollm2_gguf

from stillroom.data.arithmetic import generate_problems
from stillroom.datagen.store import GenerationStore
from stillroom.datagen.complete import generate_with_teacher
from stillroom.datagen.verifiers import extract_number


@pytest.mark.slow
def test_smollm2_generates_into_store(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    assert tok.chat_template
    items = generate_problems(2, seed=0, levels=(1,))
    with GenerationStore(tmp_path / "g.jsonl") as store:
        stats = generate_with_teacher(model, tok, items, template="{prompt}", n_samples=1, sampling_temperature=0.0,
                                      top_p=1.0, max_new_tokens=24, batch_size=2, store=store,
                                      teacher_id="SmolLM2-135M-Instruct", seed=0)
        assert stats["samples_written"] == 2 and stats["errors"] == 0
        rows = store.read()
    for row in rows:
        # an instruct model answering a chat turn: real text, no template markup echoed back
        assert len(row["text"].split()) >= 3 and "<|im_start|>" not in row["text"]
    assert any(extract_number(r["text"]) is not None for r in rows)
