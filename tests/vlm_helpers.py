"""Tiny VLM test material: a scene-question folder, a tokenizer trained on it and a randomly initialised LLaVA."""

from __future__ import annotations

from pathlib import Path

from stillroom.config.scenes import ScenesConfig
from stillroom.config.vlm import VlmArch
from stillroom.domains.vl.vlm_data import record_texts
from stillroom.domains.vl.vlm_model import build_vlm
from stillroom.domains.vl.vlm_tokenizer import train_tokenizer
from stillroom.domains.vl.vqa import write_vqa_folder

IMAGE_SIZE = 16
TINY_ARCH = VlmArch(patch_size=8, vision_hidden=16, vision_layers=1, vision_heads=2, hidden=32, layers=2, heads=4,
                    kv_heads=2, mlp_ratio=2, max_positions=64, vocab_size=300)


def write_tiny_vqa(folder: Path, images: int = 6, per_image: int = 2) -> Path:
    """A VQA folder of ``images`` 16-pixel scenes with ``per_image`` questions each; returns records.jsonl."""
    write_vqa_folder(ScenesConfig(image_size=IMAGE_SIZE), folder, n_images=images, split="train", seed=0,
                     per_image=per_image)
    return folder / "records.jsonl"


def tiny_vlm(records: Path, seed: int = 0, arch: VlmArch = TINY_ARCH):
    """``(LlavaForConditionalGeneration, tokenizer)``: 4 image tokens per 16-pixel image, a 2-layer decoder."""
    tokenizer = train_tokenizer(record_texts(records), arch.vocab_size)
    return build_vlm(arch, tokenizer, IMAGE_SIZE, seed=seed), tokenizer
