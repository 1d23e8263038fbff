"""Tiny offline building blocks shared by tests: a tokenizer trained on the fly and random Llama models."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, seed_text: str) -> str:
    from pydoc_data.topics import topics

    text = [v for _, v in sorted(topics.items())][:60]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text + [seed_text], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320, seed_text: str = "") -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed_text)),
        unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def pretrain_briefly(model: LlamaForCausalLM, tok, steps: int = 80, seq_len: int = 32, seed: int = 0) -> LlamaForCausalLM:
    """A few CE steps on bundled prose so the tiny teacher has a real, peaked distribution
    (a random model is nearly uniform, which makes distillation tests vacuous)."""
    from pydoc_data.topics import topics

    text = " ".join(v for _, v in sorted(topics.items())[:40])
    ids = torch.tensor(tok(text)["input_ids"][: 64 * seq_len]).view(-1, seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = ids[torch.randint(0, ids.shape[0], (8,), generator=g)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def save_tiny_teacher(folder: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0, vocab_size: int = 320) -> Path:
    tok = tiny_tokenizer(vocab_size)
    model = pretrain_briefly(tiny_llama(len(tok), layers=layers, hidden=hidden, seed=seed), tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
