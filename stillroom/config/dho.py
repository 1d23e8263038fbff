"""Settings of method ``dho``: dual-head semi-supervised distillation (Kang et al. 2025, spec section 4).

:class:`SemiSupervisedConfig` says how the classifier domain splits its training images into a few labelled
ones, many unlabelled ones (their labels dropped before anything trains) and a labelled validation split; the
domain applies it for any method section that carries a ``semi_supervised`` field
(:mod:`stillroom.domains.vision.semi_supervised`). :class:`DhoConfig` holds DHO's own settings
(:mod:`stillroom.methods.dho`). This module imports :mod:`stillroom.config.core` and the loss registry only (``config.methods``
registers the section).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict
from stillroom.losses import get_term

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
"""The official few-shot script's alpha grid: 0, 0.05, ..., 1."""
BETA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
"""The official few-shot script's beta grid (the KD head's inference temperature)."""


class SemiSupervisedConfig(Strict):
    """A semi-supervised view of the training split: per class, ``val_per_class`` labelled validation images
    (never trained on), ``labels_per_class`` labelled training images, and the rest unlabelled (their labels are
    replaced by -1 before any batch is built, so no loss can read them). Drawn per class from a seeded
    permutation: the same images for the same seed."""

    labels_per_class: int = Field(5, ge=1, description="Labelled training images per class (the spec's CPU "
                                  "experiment: 5 per class, 50 digits).")
    val_per_class: int = Field(10, ge=0, description="Labelled validation images per class, set apart from the "
                               "training images (the (alpha, beta) search reads them); 0: none (then "
                               "dho.mixture must be fixed).")
    unlabelled_per_class: int | None = Field(
        None, ge=0, description="Unlabelled training images per class (null: every remaining training image). The "
        "images left over are not used by the run (e.g. a teacher's own pool).")
    seed: int | None = Field(None, description="Seed of the per-class draw (null: the run's seed).")


class DhoConfig(Strict):
    """DHO (Kang et al. 2025) on a classifier: a CE head and a KD head on one backbone (docs/methods/dho.md).

    The CE head learns the labelled images' labels; the KD head learns the teacher through ``loss.terms`` (DHO's:
    ``[{name: forward_kl}]`` with ``loss.loss_temperature: 2`` and ``scale_by_temperature_squared: true``) on
    labelled and unlabelled images; ``L = ce_weight * mean_labelled CE + (1 - ce_weight) * (mean_labelled KD +
    mean_unlabelled KD)``. At inference ``p = alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta)``."""

    method: ClassVar[str] = "dho"

    semi_supervised: SemiSupervisedConfig = Field(default_factory=SemiSupervisedConfig,
                                                  description="How the training images are split.")
    ce_weight: float = Field(0.5, ge=0.0, le=1.0, description="lambda: weight of the labelled cross-entropy; "
                             "1 - lambda on the KD term (the official few-shot script: 0.5).")
    heads: Literal["dual", "single"] = Field(
        "dual", description="dual: DHO's two linear heads (the student's last layer has 2 x classes outputs: the CE "
        "head first, then the KD head). single: the ablation, both losses on one head (single-head KD).")
    labelled_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each micro-batch drawn from the labelled images (the rest from "
        "the unlabelled ones; the official code draws a labelled and an unlabelled batch of equal size).")
    mixture: Literal["search", "fixed"] = Field(
        "search", description="search: after the last step, pick (alpha, beta) on the validation split from "
        "alpha_grid x beta_grid (best accuracy, ties to the lower validation NLL); fixed: use alpha and beta.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the CE head's probabilities at inference "
                         "(mixture: fixed; with search, the value before the search).")
    beta: float = Field(1.0, gt=0.0, description="Temperature of the KD head at inference (mixture: fixed; beta < 1 "
                        "sharpens it).")
    alpha_grid: list[float] = Field(default_factory=lambda: list(ALPHA_GRID),
                                    description="Alphas the search tries (official: 0, 0.05, ..., 1).")
    beta_grid: list[float] = Field(default_factory=lambda: list(BETA_GRID),
                                   description="Betas the search tries (official: 0.5, 0.75, 1, 1.25, 1.5, 2, 4).")
    teacher_cache: bool = Field(
        True, description="Keep each training image's teacher logits after its first forward (the frozen teacher gives "
        "an image the same logits every epoch; a CLIP teacher is slower than the student): the same numbers as running "
        "the teacher on every batch (parity-tested), each image run once. Batches of crop views always run it.")
    gradient_cosine_every: int = Field(
        0, ge=0, description="Every this many steps, the cosine between the gradients of the CE and the KD term "
        "with respect to the shared features (the heads' input) is measured and logged as dho/grad_cos (its running "
        "mean in dho.json); 0: never. A diagnostic: it costs two extra backward passes to the features.")

    @model_validator(mode="after")
    def _grids(self) -> "DhoConfig":
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid) or not self.alpha_grid:
            raise ValueError(f"dho.alpha_grid={self.alpha_grid}: give at least one alpha, each in [0, 1]")
        if any(b <= 0 for b in self.beta_grid) or not self.beta_grid:
            raise ValueError(f"dho.beta_grid={self.beta_grid}: give at least one beta, each > 0")
        if self.mixture == "search" and self.semi_supervised.val_per_class == 0:
            raise ValueError("dho.mixture=search picks (alpha, beta) on the validation split, but "
                             "dho.semi_supervised.val_per_class is 0: set it >= 1, or set dho.mixture: fixed")
        if self.heads == "single" and self.mixture == "search":
            raise ValueError("dho.heads=single has one head and nothing to mix: set dho.mixture: fixed")
        return self

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier":
            raise ValueError(f"method=dho distils image classifiers; set domain: classifier (got {run.domain!r})")
        names = [t.name for t in run.loss.terms]
        specs = [get_term(name) for name in names]
        if "ce" in names or not any(s.uses_teacher for s in specs) or any(s.kind != "logit" for s in specs):
            raise ValueError(f"method=dho: loss.terms {names} are the KD head's terms and must be logit "
                             "terms against the teacher only (DHO's: [{name: forward_kl}] with loss.loss_temperature: "
                             "2 and scale_by_temperature_squared: true); the labels' cross-entropy is the CE head's, "
                             "weighted by dho.ce_weight")
        sec = run.classifier
        if sec.teacher_source != "online":
            raise ValueError("method=dho runs the teacher on every batch (a soft-label store holds the training "
                             "images before the semi-supervised split): set classifier.teacher_source: online")
        if sec.augment.mix != "none":
            raise ValueError("method=dho reads one label per labelled image: set classifier.augment.mix: none")
        if run.train.micro_batch_size < 2:
            raise ValueError("method=dho draws labelled and unlabelled images into every micro-batch: set "
                             "train.micro_batch_size >= 2")
