"""The pipeline with the real SmolLM2 tokenizer and chat template (slow: loads the GGUF)."""

from __future__ import annotations

import pytest
from helpers import smollm2_gguf

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data import build_splits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    folder, name = smollm2_gguf()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_chat_masks_and_pydoc_blocks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = build_splits(
        DataConfig(sources=[DataSource(bundled="instructions", limit=40)], seq_len=1024, heldout_fraction=0.0),
        tok,
        seed=0,
    )
    assert chat.stats["records_skipped"] == 0 and len(chat.train) == 40
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for e in chat.train:
        runs, run = [], []
        for i, f in zip(e.input_ids, e.target):
            if f:
                run.append(i)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        assert runs and all(r[-2] == im_end for r in runs)  # each assistant turn closes with <|im_end|> "\n"
        assert "<|im_start|>" not in tok.decode([i for r in runs for i in r])

    text = build_splits(DataConfig(seq_len=256), tok, seed=0)
    assert len(text.heldout) == 40 and len(text.train) > 250
    assert all(len(e.input_ids) == 256 for e in text.train)
