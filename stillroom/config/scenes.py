"""Config of the procedural multi-object scenes (:mod:`stillroom.domains.vl.scenes`) and their visual questions
(:mod:`stillroom.domains.vl.vqa`): the shared data of the vision-language methods (issue 14).

A scene is ``image_size x image_size`` RGB: a plain background colour and ``min_objects..max_objects`` filled
shapes, each in its own cell of a 2 x 2 grid, with distinct (shape, colour) pairs, and an exact caption. This
section imports :mod:`stillroom.config.core` only, so data, CLIP, VLM and method sections can all embed it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

SCENE_CELLS = 4
"""Cells of the 2 x 2 grid: at most one object each."""
SCENE_SHAPES = 10
"""Shapes the rasteriser of :mod:`stillroom.domains.vision.shapes` draws."""
SCENE_COLOURS = 8
"""Foreground colours of :mod:`stillroom.domains.vision.shapes` (``FOREGROUNDS``)."""
QA_FAMILIES: tuple[str, ...] = ("colour_of", "shape_at", "count", "exists", "unanswerable")
"""The question families of :mod:`stillroom.domains.vl.vqa` (``vqa.FAMILIES``), named here so config sections
can check them."""


class ScenesConfig(Strict):
    """Procedural scenes of coloured shapes with exact captions and checkable questions. Generated from `seed`
    alone (per split), so the scenes are the same whatever the run's seed unless `seed` is null."""

    image_size: int = Field(32, ge=16, le=128, description="Height and width of the RGB scenes (3 x size x size); "
                            "each object sits in one quarter of the image.")
    shapes: int = Field(5, ge=2, le=SCENE_SHAPES, description="Shapes drawn: the first N of circle, square, "
                        "triangle, cross, ring, star, semicircle, bar, frame, diamond.")
    colours: int = Field(6, ge=2, le=SCENE_COLOURS, description="Object colours: the first N of red, green, blue, "
                         "yellow, magenta, cyan, orange, white.")
    max_objects: int = Field(3, ge=1, le=SCENE_CELLS, description="Most objects in one scene (one per cell of the "
                             "2 x 2 grid, so at most 4).")
    min_objects: int = Field(1, ge=1, le=SCENE_CELLS, description="Fewest objects in one scene.")
    pixel_noise: float = Field(0.02, ge=0.0, le=0.5, description="Standard deviation of Gaussian noise added to "
                               "every pixel (then clipped to [0, 1]).")
    seed: int | None = Field(0, description="Seed of the scene generator (null: the run's seed).")

    @model_validator(mode="after")
    def _objects_fit(self) -> "ScenesConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"scenes.min_objects={self.min_objects} exceeds scenes.max_objects={self.max_objects}; "
                             "lower min_objects or raise max_objects")
        if self.shapes * self.colours < self.max_objects:
            raise ValueError(f"scenes.shapes x scenes.colours = {self.shapes * self.colours} distinct objects "
                             f"cannot fill scenes.max_objects={self.max_objects}")
        return self


class VqaDataConfig(ScenesConfig):
    """``stillroom vqa-data OUT``: write a visual-question data set of procedural scenes (the scene settings are
    this section's other flags). ``format: images`` writes a folder (``images/<id>.png`` + ``records.jsonl`` with
    image/prompt/completion/family/level/caption, or caption pairs with ``per_image: 0``) that the VLM and CLIP
    domains train on; ``format: text`` writes one JSONL of text-only records ("Scene: <caption>\\nQuestion: ...
    \\nAnswer:") that any language model trains on."""

    out: str = Field(description="The folder (format images) or .jsonl file (format text) to write; it must not "
                     "exist yet.")
    format: Literal["images", "text"] = Field("images", description="images: PNG scenes + records.jsonl; text: the "
                                              "scene as its caption in a prompt/completion JSONL.")
    images: int = Field(500, ge=1, description="Scenes generated.")
    per_image: int = Field(5, ge=0, description="Questions per scene (families cycled from a random start, levels "
                           "drawn 1..3); 0 with format images: one caption record per scene (image-text pairs).")
    split: Literal["train", "heldout"] = Field("train", description="Which generator stream: the held-out scenes "
                                               "never coincide with the training ones for the same seed.")
    seed: int = Field(0, description="Seed of the scenes and questions.")

    @model_validator(mode="after")
    def _text_needs_questions(self) -> "VqaDataConfig":
        if self.format == "text" and self.per_image == 0:
            raise ValueError("format text writes questions: set per_image >= 1 (per_image 0 writes caption pairs, "
                             "format images only)")
        return self

    def scenes(self) -> ScenesConfig:
        """The scene settings alone."""
        return ScenesConfig(**{k: getattr(self, k) for k in ScenesConfig.model_fields})


class VqaLmConfig(Strict):
    """``stillroom vqa-lm OUT``: a randomly initialised small Llama with a byte-level BPE tokenizer trained on the
    scene-question vocabulary, saved as a plain Hugging Face folder: the starting point of a text-QA teacher
    (train it with ``method: sft``) or student (docs/methods/comd.md)."""

    out: str = Field(description="The model folder to write; it must not exist yet.")
    hidden: int = Field(64, ge=8, description="hidden_size of the decoder (a multiple of `heads`).")
    layers: int = Field(2, ge=1, description="num_hidden_layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention; divides `heads`).")
    mlp_ratio: int = Field(4, ge=1, description="intermediate_size as a multiple of `hidden`.")
    max_positions: int = Field(256, ge=32, description="max_position_embeddings: the longest prompt + answer.")
    vocab_size: int = Field(512, ge=300, description="Vocabulary of the BPE tokenizer (256 bytes, the special "
                            "tokens and merges learnt from scene questions of every family and level).")
    seed: int = Field(0, description="Seed of the weights (the tokenizer depends on nothing but `vocab_size`).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "VqaLmConfig":
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"vqa-lm: hidden={self.hidden} must be a multiple of heads={self.heads}, and heads a "
                             f"multiple of kv_heads={self.kv_heads}")
        return self
