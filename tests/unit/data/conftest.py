"""Fixtures for the data tests: a tiny byte-level BPE tokenizer trained on pydoc text.

``tiny_tokenizer`` has a ChatML-like chat template and ``<|endoftext|>`` as EOS/pad;
``bos_tokenizer`` also prepends a BOS token to plain text, like Llama tokenizers.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]


def _train() -> Tokenizer:
    from pydoc_data.topics import topics

    lines = [ln for k in sorted(topics) for ln in topics[k].splitlines() if ln.strip()][:1500]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    return tok


@pytest.fixture(scope="session")
def _trained() -> str:
    return _train().to_str()


@pytest.fixture
def tiny_tokenizer(_trained) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def bos_tokenizer(_trained) -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_str(_trained)
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
