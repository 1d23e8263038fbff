"""Config sections of the ``generative`` domain: class-conditional generators (diffusion and flow denoisers)
distilled into one- and few-step students (issue 15; docs/domains.md, docs/methods/*.md).

``domain: generative`` trains a :class:`~stillroom.domains.generative.models.Denoiser` student on points of a
2-D toy with a known density (``rings``, ``moons``) or on images (``digits`` 8x8, ``mnist`` 28x28). The
teacher is a denoiser folder, or trained here once on the data (denoising loss with condition dropout, so
classifier-free guidance works) and cached. ``method: sft`` trains the student as a denoiser on the data
(the baseline); the distillation methods have their own sections.

This module imports :mod:`stillroom.config.core` only (``config.domains`` registers the section).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

POINT_DATASETS = ("rings", "moons")
IMAGE_DATASETS = ("digits", "mnist")


class ConventionConfig(Strict):
    """The time convention of a denoiser trained or built here (:mod:`stillroom.domains.generative.conventions`)."""

    name: Literal["edm", "rf", "flow_clean"] = Field("edm", description="edm: t is sigma, x_t = x0 + sigma eps; rf: "
                                                     "t = 1 noise, x_t = (1-t) x0 + t eps; flow_clean: t = 1 clean, "
                                                     "x_t = t x0 + (1-t) eps.")
    sigma_min: float = Field(0.002, gt=0, description="edm: the smallest noise level (u = 0).")
    sigma_max: float = Field(80.0, gt=0, description="edm: the largest noise level (u = 1; the prior's scale).")
    rho: float = Field(7.0, gt=0, description="edm: Karras et al.'s schedule exponent between the two.")
    sigma_data: float = Field(0.5, gt=0, description="edm: the data's standard deviation (preconditioning).")


class DenoiserArch(Strict):
    """A denoiser built here: ``mlp`` for points (spec 10.6: 4 x 128, SiLU) or ``unet`` (diffusers'
    UNet2DModel) for images."""

    kind: Literal["mlp", "unet", "twinflow"] = Field("mlp", description="mlp (points), unet (images) or twinflow "
                                                     "(points: TwinFlow's any-step network, a student of method "
                                                     "twinflow; its mlp fields are the mlp's).")
    width: int = Field(128, ge=1, description="mlp: hidden width.")
    depth: int = Field(4, ge=1, description="mlp: hidden layers.")
    time_features: int = Field(32, ge=2, description="mlp: sin/cos features of the time.")
    class_features: int = Field(32, ge=1, description="mlp: class embedding width (one row per class + null).")
    channels: list[int] = Field(default_factory=lambda: [32, 64], description="unet: channels per resolution level "
                                "(the image side must be divisible by 2**(levels - 1)).")
    layers_per_block: int = Field(1, ge=1, description="unet: ResNet layers per level.")

    def as_json(self, sample_shape: tuple[int, ...] | list[int]) -> dict:
        """The architecture as the denoiser kind's ``from_json`` reads it, for samples of ``sample_shape`` (``[D]``
        points: the MLPs take ``D``; ``[C, H, W]`` images: the UNet takes the shape)."""
        if self.kind in ("mlp", "twinflow"):
            return {"dim": sample_shape[0], "width": self.width, "depth": self.depth,
                    "time_features": self.time_features, "class_features": self.class_features}
        return {"channels": list(self.channels), "layers_per_block": self.layers_per_block,
                "sample_shape": list(sample_shape)}


class GenTeacherConfig(Strict):
    """The teacher: a denoiser folder, or trained here once on the training data and cached under
    ``<cache_dir>/generative_teachers/<key>/`` (key: these settings, the data and the seed)."""

    path: str | None = Field(None, description="A denoiser folder (denoiser.json); null: train one here.")
    arch: DenoiserArch = Field(default_factory=DenoiserArch, description="Architecture of a teacher trained here.")
    convention: ConventionConfig = Field(default_factory=ConventionConfig,
                                         description="Time convention of a teacher trained here.")
    steps: int = Field(4000, ge=1, description="Optimizer steps of a teacher trained here.")
    batch_size: int = Field(256, ge=1, description="Samples per step of a teacher trained here.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine to 10%).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="Fraction of training labels replaced by the null "
                                "label (what classifier-free guidance needs).")
    seed: int | None = Field(None, description="Seed of its initialisation and data order (null: the run's).")
    sample_steps: int = Field(50, ge=1, description="Steps of the teacher's reference sampler (the report's teacher "
                              "row and the reference distribution of the `*_teacher` metrics).")
    guidance: float = Field(1.0, ge=0, description="Classifier-free guidance scale of the teacher's reference "
                            "samples (1: none; spec 10.6 uses 2 for the guided target).")


def equal_groups(num_classes: int, members: int) -> list[list[int]]:
    """``members`` groups of consecutive classes, as equal as possible (the first ones one larger)."""
    if not 1 <= members <= num_classes:
        raise ValueError(f"cannot split {num_classes} classes into {members} non-empty groups")
    base, extra = divmod(num_classes, members)
    bounds = [k * base + min(k, extra) for k in range(members + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(members)]


def check_partition(groups: list[list[int]], num_classes: int, where: str) -> None:
    """Refuse ``groups`` unless they are non-empty, disjoint and cover ``0 .. num_classes - 1`` exactly."""
    if not groups or any(not g for g in groups):
        raise ValueError(f"{where}: groups {groups} must be a list of non-empty lists of class ids")
    flat = [c for g in groups for c in g]
    repeated = sorted({c for c in flat if flat.count(c) > 1})
    outside = sorted({c for c in flat if not 0 <= c < num_classes})
    missing = sorted(set(range(num_classes)) - set(flat))
    if repeated or outside or missing:
        raise ValueError(f"{where}: groups {groups} are not a partition of the {num_classes} classes (repeated "
                         f"{repeated}, outside [0, {num_classes}) {outside}, missing {missing}); give every class "
                         "exactly one group")


class RouteConfig(Strict):
    """A routed student (MSD, spec 11): K member denoisers, each owning a group of classes; a sample runs only
    its class's member. Members start as ``student.init`` says (copies of the teacher, or built from
    ``student.arch``: smaller students), or from ``member_paths``."""

    members: int | None = Field(None, ge=1, description="K groups of consecutive classes, as equal as possible "
                                "(give this or `groups`).")
    groups: list[list[int]] | None = Field(None, description="The partition of the classes: one list of class ids "
                                           "per member, disjoint, covering every class (give this or `members`).")
    member_paths: list[str] | None = Field(None, description="One denoiser folder per group to start its member "
                                           "from (e.g. TSM-trained members); overrides student.init.")

    def partition(self, num_classes: int) -> list[list[int]]:
        """The groups, checked against ``num_classes`` (errors name ``generative.student.route``)."""
        where = "generative.student.route"
        if (self.members is None) == (self.groups is None):
            raise ValueError(f"{where}: give exactly one of `members` (equal groups) and `groups` (the partition)")
        groups = self.groups if self.groups is not None else equal_groups(num_classes, self.members)
        check_partition(groups, num_classes, f"{where}.groups")
        if self.member_paths is not None and len(self.member_paths) != len(groups):
            raise ValueError(f"{where}.member_paths: {len(self.member_paths)} folders for {len(groups)} groups; "
                             "give one per group")
        return groups


class GenStudentConfig(Strict):
    """The student: a denoiser sampled in ``steps`` evaluations (1: a one-step generator)."""

    init: Literal["teacher", "scratch"] = Field("teacher", description="teacher: a copy of the teacher (DMD's "
                                                "initialisation); scratch: built from `arch` and the run seed.")
    path: str | None = Field(None, description="Start from this denoiser folder instead (e.g. a TSM-pre-trained "
                             "student); overrides `init`.")
    arch: DenoiserArch = Field(default_factory=DenoiserArch, description="Architecture of a student built from "
                               "scratch (its convention is the teacher's).")
    steps: int = Field(1, ge=1, description="Model evaluations per sample (1: one-step generation).")
    stochastic: bool = Field(False, description="Few-step sampling re-noises with fresh noise between steps "
                             "(DMD2's backward simulation) instead of the deterministic ODE step.")
    fractions: list[float] | None = Field(None, description="The noise fractions the student's sampler visits, one "
                                          "per step: descending, the first 1.0 (pure noise), each in (0, 1] (e.g. a "
                                          "released 2-NFE schedule [1.0, 0.6]); null: evenly spaced, 1, 1 - 1/steps, "
                                          "..., 1/steps. Used by the report's sampler and saved with the student.")
    route: RouteConfig | None = Field(None, description="A routed student: one member per group of classes (MSD); "
                                      "null: one denoiser for every class.")


class GenEvalConfig(Strict):
    """What the report measures on generated samples."""

    samples_per_class: int = Field(1000, ge=10, description="Samples per class each model draws for the metrics.")
    teacher_steps: list[int] = Field(default_factory=lambda: [1, 4], description="Extra teacher rows sampled at "
                                     "these step counts (the teacher row itself uses teacher.sample_steps).")
    projections: int = Field(256, ge=8, description="Random directions of the sliced Wasserstein distance.")
    seed: int = Field(1234, description="Seed of the evaluation noise (the same for every model).")
    steer_scale: float = Field(0.0, ge=0, description="Point toys: > 0 adds rows `teacher_uncond` (the teacher "
                               "with the null label, unconditional) and `teacher_steered` (the same, steered at every "
                               "step towards each sample's class by the toy's exact class posterior with this scale: "
                               "steered sampling, spec 15); 0: no such rows.")
    steer_std: float = Field(0.2, gt=0, description="Mode standard deviation of the posterior that steers (wider "
                             "than the toy's is smoother far from the modes).")
    feature_classifier_steps: int = Field(300, ge=1, description="Images: optimizer steps of the feature "
                                          "classifier trained here once on the training images and cached (the "
                                          "classifier domain's default teacher); the Fréchet distance, precision, "
                                          "recall and class accuracy of samples are measured in its features.")


class ContrastConfig(Strict):
    """Discrete contrastive diffusion's conditional contrastive loss as an auxiliary term (spec 15, low priority):
    per sample, cross-entropy over every class ``c`` of ``-||x0_hat(x_t, t, c) - x0||^2 / (D * temperature)``
    against its own class (``stillroom.domains.generative.engine.condition_contrast``; K extra forwards per
    sample, K the class count)."""

    weight: float = Field(0.0, ge=0, description="Weight of the term beside the denoising loss (0: off).")
    temperature: float = Field(0.1, gt=0, description="Divides the per-class denoising errors (mean over "
                               "dimensions) before the softmax over classes.")


class GenerativeConfig(Strict):
    """``domain: generative``: a class-conditional denoiser student distilled from a denoiser teacher."""

    domain: ClassVar[str] = "generative"

    dataset: Literal["rings", "moons", "digits", "mnist"] = Field("rings", description="rings / moons: 2-D toys "
                                                                 "with known densities; digits (8x8), mnist "
                                                                 "(28x28): images scaled to [-1, 1].")
    classes: int = Field(4, ge=1, le=16, description="rings: number of classes (rings rotated by pi/16 each).")
    modes: int = Field(8, ge=1, le=64, description="rings: Gaussian modes per class.")
    std: float = Field(0.05, gt=0, description="rings / moons: standard deviation of every mode.")
    train_points: int = Field(20000, ge=10, description="rings / moons: training points drawn from the toy.")
    heldout_points: int = Field(4000, ge=10, description="rings / moons: held-out points (the data reference).")
    data_seed: int = Field(0, description="Seed of the toy's draws (independent of the run seed).")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Images: fraction held out by hash (digits).")
    teacher: GenTeacherConfig = Field(default_factory=GenTeacherConfig)
    student: GenStudentConfig = Field(default_factory=GenStudentConfig)
    eval: GenEvalConfig = Field(default_factory=GenEvalConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig, description="The conditional contrastive "
                                     "term of the student's denoising objective (method sft / tsm); off by default.")

    @model_validator(mode="after")
    def _arch_fits_data(self) -> "GenerativeConfig":
        images = self.dataset in IMAGE_DATASETS
        built = [("teacher.arch", self.teacher.arch)] if self.teacher.path is None else []
        if self.student.init == "scratch" and self.student.path is None:
            built.append(("student.arch", self.student.arch))
        for where, arch in built:
            if where == "teacher.arch" and arch.kind == "twinflow":
                raise ValueError("generative.teacher.arch.kind=twinflow: a teacher trained here is a plain flow or "
                                 "diffusion model; set generative.teacher.arch.kind: mlp (method twinflow copies it "
                                 "into its twinflow student)")
            if images and arch.kind in ("mlp", "twinflow"):
                raise ValueError(f"generative.{where}.kind={arch.kind} takes points; dataset {self.dataset} is images: set "
                                 f"generative.{where}.kind: unet")
            if not images and arch.kind == "unet":
                raise ValueError(f"generative.{where}.kind=unet takes images; dataset {self.dataset} is 2-D points: "
                                 f"set generative.{where}.kind: mlp")
        if images and self.eval.steer_scale > 0:
            raise ValueError(f"generative.eval.steer_scale={self.eval.steer_scale}: the steered rows use the exact "
                             f"class posterior of a point toy; dataset {self.dataset} is images: set it to 0")
        fr = self.student.fractions
        if fr is not None and (len(fr) != self.student.steps or fr[0] != 1.0 or any(not 0 < u <= 1 for u in fr)
                               or any(b >= a for a, b in zip(fr, fr[1:]))):
            raise ValueError(f"generative.student.fractions={fr}: give {self.student.steps} noise fraction(s) (one "
                             "per student.steps), strictly descending from 1.0, each in (0, 1]")
        if self.student.route is not None:
            self.student.route.partition(self.num_classes)
            if self.student.route.member_paths is not None and self.student.path is not None:
                raise ValueError("generative.student: give `path` (a whole student) or `route.member_paths` (one "
                                 "folder per member), not both")
        return self

    @property
    def num_classes(self) -> int:
        """The data set's class count (rings: ``classes``; moons 2; digits and mnist 10)."""
        return {"moons": 2, "digits": 10, "mnist": 10}.get(self.dataset, self.classes)
