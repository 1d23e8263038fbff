"""Domain sections of the config tree: settings that only one kind of model has.

``DOMAINS`` is the one list of domain names (``RunConfig.domain``): each maps to its
section class, or ``None`` for a domain whose settings are the core sections alone
(``lm``: causal language models). :mod:`stillroom.domains` implements each.

``classifier`` (:class:`ClassifierConfig`): image classifiers, distilled from a classifier
teacher that is loaded from a folder or trained in the run's cache (:mod:`stillroom.domains.vision`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict


class DomainSection(Strict):
    """Settings of one domain; ``domain`` is the ``RunConfig.domain`` value that uses them."""

    domain: ClassVar[str]


CLASSIFIER_DATASETS = ("digits",)
"""Data sets of the classifier domain (``stillroom.domains.vision.data.DATASETS`` loads each; a test keeps
the two in step)."""


class ClassifierArch(Strict):
    """An image classifier built from config in plain torch (:mod:`stillroom.domains.vision.models`)."""

    kind: Literal["mlp", "cnn"] = Field(
        "mlp",
        description="mlp: flatten the image, then Linear + ReLU per `hidden` width, then Linear to the classes. "
        "cnn: per `channels` entry a 3x3 Conv2d (padding 1) + ReLU, followed by 2x2 max-pooling while the feature "
        "map is larger than 2x2, then flatten and Linear to the classes.",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [32], description="Hidden widths of an mlp, input side first ([]: a linear model)."
    )
    channels: list[int] = Field(
        default_factory=lambda: [8, 16], description="Output channels of a cnn's conv layers, input side first."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability after every hidden ReLU (mlp) "
                           "or before the final Linear (cnn); 0: none.")

    @model_validator(mode="after")
    def _its_own_fields(self) -> "ClassifierArch":
        if any(w < 1 for w in self.hidden) or any(c < 1 for c in self.channels):
            raise ValueError("hidden widths and channels must be >= 1")
        unused = {"mlp": "channels", "cnn": "hidden"}[self.kind]
        if _changed(self, unused):  # a dump carries both fields at their defaults: that one still loads
            raise ValueError(f"`{unused}` is set, but kind is {self.kind!r}: it is used only by kind "
                             f"{'cnn' if self.kind == 'mlp' else 'mlp'}")
        if self.kind == "cnn" and not self.channels:
            raise ValueError("a cnn needs at least one entry in `channels`")
        return self


def _changed(section: Strict, name: str) -> bool:
    """``name`` was given and differs from its default (a dumped config repeats the defaults)."""
    return name in section.model_fields_set and getattr(section, name) != type(section).model_fields[name].get_default(
        call_default_factory=True)


_TRAINING = ("arch", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "seed")


class ClassifierTeacherConfig(Strict):
    """The classifier teacher: a saved folder to load, or an architecture trained here (and cached)."""

    path: str | None = Field(
        None,
        description="A classifier folder (model.safetensors + config.json, as stillroom saves students and cached "
        "teachers) to load as the teacher; `~` is expanded. null: train `arch` here with cross-entropy on the "
        "training split through the training loop, once: it is saved in <cache_dir>/classifiers/<hash of these "
        "settings, the data and the seed>/ and later runs load it from there.",
    )
    arch: ClassifierArch = Field(
        default_factory=lambda: ClassifierArch(kind="mlp", hidden=[256, 256]),
        description="Architecture of a teacher trained here.",
    )
    steps: int = Field(300, ge=1, description="Optimizer steps of a teacher trained here.")
    batch_size: int = Field(64, ge=1, description="Images per optimizer step of a teacher trained here.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine decay to 10%).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay of the matrices.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    seed: int | None = Field(None, description="Seed of its initialisation and data order (null: the run's seed).")

    @model_validator(mode="after")
    def _path_or_training(self) -> "ClassifierTeacherConfig":
        given = [k for k in _TRAINING if _changed(self, k)]
        if self.path is not None and given:
            raise ValueError(f"give `path` (a saved teacher) or its training settings ({', '.join(given)}), not both")
        return self


class ClassifierConfig(DomainSection):
    """Settings of ``domain: classifier``: the data set, the teacher and the student (image classifiers)."""

    domain: ClassVar[str] = "classifier"
    dataset: Literal["digits"] = Field(
        "digits",
        description="digits: scikit-learn's 8x8 handwritten digits (1797 grey images, 10 classes; ships with "
        "scikit-learn, no download). Pixels are scaled to [0, 1].",
    )
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Deterministic held-out split: an image is held out when the hash of its data set and index "
        "falls below this fraction (the same split for every seed, the teacher's training included).",
    )
    teacher: ClassifierTeacherConfig = Field(default_factory=ClassifierTeacherConfig)
    student: ClassifierArch = Field(
        default_factory=ClassifierArch, description="Architecture of the student (randomly initialised from the seed)."
    )
    eval_batch_size: int = Field(
        256, ge=1, description="Images per forward pass in the held-out metrics and the images/s measurement "
        "(every held-out image is evaluated)."
    )


DOMAINS: dict[str, type[DomainSection] | None] = {
    "lm": None,
    "classifier": ClassifierConfig,
}
