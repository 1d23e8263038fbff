"""The small VLM: a transformers ``LlavaForConditionalGeneration`` built here, and what the LM domain asks of one.

A LLaVA model replaces each ``<image>`` token of ``input_ids`` with one projected patch feature of the image
(``pixel_values [B, 3, S, S]``), so a prompt holds exactly :func:`image_token_count` image tokens. Everything
here reads the standard LLaVA config (``vision_config``, ``text_config``, ``image_token_index``,
``vision_feature_select_strategy``), so a real LLaVA folder works the same as the tiny one built from
:class:`~stillroom.config.vlm.VlmArch`; both save and load as plain Hugging Face folders
(``LlavaForConditionalGeneration.from_pretrained`` needs no stillroom).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Sequence

import torch

from stillroom.config.vlm import VlmArch
from stillroom.data.images import ImageRef

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


def is_vlm(model: torch.nn.Module | None) -> bool:
    """True for a LLaVA-style model: its config has a vision tower and an image token."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and hasattr(config, "image_token_index")


def build_vlm(arch: VlmArch, tokenizer, image_size: int, *, seed: int) -> torch.nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` of ``arch`` for ``image_size``-pixel images.

    The vocabulary, BOS/EOS/pad and image token ids come from ``tokenizer``
    (:func:`stillroom.domains.vl.vlm_tokenizer.train_tokenizer`).
    """
    from transformers import CLIPVisionConfig

    if image_size % arch.patch_size:
        raise ValueError(f"vlm.teacher.arch.patch_size={arch.patch_size} must divide the image size {image_size}")
    vision = CLIPVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=arch.mlp_ratio * arch.vision_hidden,
                              num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                              image_size=image_size, patch_size=arch.patch_size)
    return _llava(vision, arch, tokenizer, seed, feature_layer=-1)


def vlm_from_clip(arch: VlmArch, tokenizer, clip, *, seed: int) -> torch.nn.Module:
    """A LLaVA whose vision tower is a copy of ``clip``'s image tower (LLaVA's start from a pretrained CLIP).

    ``clip``: an :class:`~stillroom.domains.vl.clip_model.ImageTextModel` (``CLIPModel`` or
    ``VisionTextDualEncoderModel``); the LLaVA's ``vision_config`` is the CLIP's (its image size and patch size,
    so ``(image_size / patch_size)^2`` image tokens), the projector and decoder come from ``arch`` (seeded
    random init); ``arch``'s vision fields are unused. The images must be normalised with the CLIP's mean/std
    (:func:`write_preprocessor` with ``clip.mean_c`` / ``clip.std_c``) for the tower to see what it was trained on.
    The projector reads the penultimate layer's patch tokens (``vision_feature_layer -2``, LLaVA's choice): the
    last layer's patch outputs feed nothing the contrastive loss sees (only its [CLS] token is pooled).
    """
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig.from_dict(copy.deepcopy(clip.model.config.vision_config.to_dict()))
    model = _llava(vision, arch, tokenizer, seed, feature_layer=-2 if vision.num_hidden_layers > 1 else -1)
    # both image-text classes hold a CLIPVisionModel, the class of LLaVA's tower: the same parameter names
    model.model.vision_tower.load_state_dict(clip.model.vision_model.state_dict())
    return model.to(clip.device)


def _llava(vision, arch: VlmArch, tokenizer, seed: int, *, feature_layer: int) -> torch.nn.Module:
    """The LLaVA of the ``vision`` tower config and ``arch``'s decoder, seeded, float32, token ids of ``tokenizer``;
    the projector reads the tower's hidden states of ``feature_layer``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden,
                       intermediate_size=arch.mlp_ratio * arch.hidden, num_hidden_layers=arch.layers,
                       num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                       max_position_embeddings=arch.max_positions, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    n_patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=feature_layer,
                         image_seq_length=n_patches, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def image_token_count(config) -> int:
    """Image tokens one image fills: ``(image_size / patch_size)^2`` patches, plus CLS with strategy ``full``."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def image_ref(model: torch.nn.Module, path: str, folder: str | Path | None = None) -> ImageRef:
    """How ``model``'s vision tower reads ``path``: its image size, and the mean/std of the folder's
    ``preprocessor_config.json`` (``image_mean`` / ``image_std``) when there is one, else CLIP's."""
    mean, std = CLIP_MEAN, CLIP_STD
    config_file = Path(folder) / PREPROCESSOR_FILE if folder is not None else None
    if config_file is not None and config_file.is_file():
        pre = json.loads(config_file.read_text())
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return ImageRef(path=path, size=int(model.config.vision_config.image_size), mean=mean, std=std)


def write_preprocessor(folder: Path, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                       std: Sequence[float] = CLIP_STD) -> None:
    """The image settings of a VLM saved here (read back by :func:`image_ref`; a CLIP image processor's keys):
    OpenAI CLIP's mean/std, or those of the CLIP whose tower the VLM starts from."""
    settings = {"image_processor_type": "CLIPImageProcessor", "image_mean": [float(v) for v in mean],
                "image_std": [float(v) for v in std], "size": {"shortest_edge": image_size},
                "crop_size": {"height": image_size, "width": image_size}, "do_resize": True,
                "do_center_crop": True, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=1))


def vlm_student(teacher: torch.nn.Module, changes: dict, *, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the teacher's class from its config with ``changes``.

    ``changes`` may set top-level LLaVA fields and nested ``text_config`` / ``vision_config`` fields, e.g.
    ``{text_config: {num_hidden_layers: 1, hidden_size: 64}}``; the vocabulary, token ids and image size stay
    the teacher's (the student shares its tokenizer and images). Unknown keys are refused with the nearest.
    """
    cfg = copy.deepcopy(teacher.config)
    for key, value in changes.items():
        if key in ("text_config", "vision_config"):
            if not isinstance(value, dict):
                raise ValueError(f"student.from_config.{key} must be a mapping of {key} fields, got {value!r}")
            _apply(getattr(cfg, key), value, f"student.from_config.{key}", frozen=("vocab_size", "image_size"))
        else:
            _apply(cfg, {key: value}, "student.from_config", frozen=("image_token_index",))
    text = cfg.text_config
    resized = {"hidden_size", "num_attention_heads"} & set(changes.get("text_config", {}))
    if resized and "head_dim" not in changes.get("text_config", {}) and hasattr(text, "head_dim"):
        text.head_dim = text.hidden_size // text.num_attention_heads
    torch.manual_seed(seed)
    return type(teacher)(cfg).float()


def _apply(config, changes: dict, where: str, frozen: tuple[str, ...]) -> None:
    known = set(config.to_dict())
    for key, value in changes.items():
        if key in frozen:
            raise ValueError(f"{where}.{key} cannot change: the student shares the teacher's tokenizer and images")
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=3)
            raise ValueError(f"{where}.{key}: not a field of {type(config).__name__}"
                             + (f"; did you mean {', '.join(near)}?" if near else ""))
        setattr(config, key, value)
