"""A small language model for the text form of the scene questions (``stillroom vqa-lm``).

The text questions (:func:`stillroom.domains.vl.vqa.text_record`) use a few dozen words, so a byte-level BPE
tokenizer trained on them (:func:`stillroom.domains.vl.vlm_tokenizer.train_tokenizer`, the VLM's) keeps the
embedding and head small and every word one or two tokens; a 49k-token tokenizer would dominate a model of 64
hidden units. The folder written is a plain ``LlamaForCausalLM`` + tokenizer that any recipe loads as
``teacher.model.path`` or ``student.model.path``: CoMD's and LLaVA-MoD's text recipes start their teacher from
it (``method: sft`` on ``stillroom vqa-data --format text``) and build smaller students from its config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from stillroom.config.scenes import SCENE_CELLS, SCENE_COLOURS, SCENE_SHAPES, ScenesConfig, VqaLmConfig
from stillroom.domains.vl.vqa import FAMILIES, LEVELS, NUMBER_WORDS, instance, text_record

TOKENIZER_SCENES = 60
"""Scenes per (family, level) whose questions train the tokenizer: every word of every template appears."""


def vocabulary_texts() -> list[str]:
    """Prompts and answers of every family and level over the largest scene settings (all shapes and
    colours), plus the number words: what the tokenizer must encode compactly. Deterministic."""
    cfg = ScenesConfig(shapes=SCENE_SHAPES, colours=SCENE_COLOURS, max_objects=SCENE_CELLS)
    rng = np.random.default_rng(0)
    texts = list(NUMBER_WORDS)
    for family in FAMILIES:
        for level in LEVELS:
            for _ in range(TOKENIZER_SCENES):
                record = text_record(*instance(cfg, rng, family, level))
                texts += [record["prompt"], record["completion"]]
    return texts


def build_vqa_lm(cfg: VqaLmConfig):
    """``(model, tokenizer)``: a random ``LlamaForCausalLM`` (seeded by ``cfg.seed``) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillroom.domains.vl.vlm_tokenizer import train_tokenizer

    tokenizer = train_tokenizer(vocabulary_texts(), cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.mlp_ratio * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)  # building a model leaves the caller's random state alone
    return model, tokenizer


def write_vqa_lm(cfg: VqaLmConfig) -> Path:
    """``stillroom vqa-lm``: save :func:`build_vqa_lm` to ``cfg.out`` (temporary folder + rename)."""
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; delete it or choose another folder for the model")
    model, tokenizer = build_vqa_lm(cfg)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote a {cfg.layers}-layer, {cfg.hidden}-wide Llama ({n_params / 1e6:.2f}M parameters, vocabulary "
          f"{len(tokenizer)}) to {out}")
    return out
