"""The ``codsa`` section: conditional data synthesis allocated to under-represented classes (CoDSA).

Read by ``stillroom codsa-data`` (:mod:`stillroom.datagen.codsa`), which fits one generative model per class
on the classifier run's real training images, splits a fixed synthetic volume over the classes by an
allocation policy, samples, labels every sample with the run's teacher and writes the transfer set; and by
``stillroom run`` when ``add_to_training`` is on (the student then trains on the real images plus the
transfer set, through the classifier domain's one data path). Tian & Shen 2025 (arXiv 2504.07426) fine-tune
large generative models; the spec's CPU check uses a per-class Gaussian mixture on PCA features, as here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

POLICIES = ("uniform", "inverse_frequency", "to_balance", "weak_regions")


class CodsaGenerator(Strict):
    """The per-class generator: PCA of the real training images (one basis for all classes), then a Gaussian
    mixture per class in that space; a sample is mapped back to pixels and clipped to [0, 1]."""

    kind: Literal["pca_gmm", "copies"] = Field(
        "pca_gmm", description="pca_gmm: scikit-learn PCA + one GaussianMixture per class (seeded; the spec's quick "
        "choice). copies: the class's real training images drawn with replacement (no synthesis: the control that "
        "separates rebalancing from new samples; the mixture settings are unused).")
    pca_components: int = Field(20, ge=1, description="PCA dimensions the mixtures live in (at most the pixel count "
                                "and the number of real training images).")
    components_per_class: int = Field(3, ge=1, description="Mixture components of a class's model, at most one per "
                                      "`images_per_component` real images of that class (at least 1).")
    images_per_component: int = Field(10, ge=1, description="Real images a class needs per mixture component "
                                      "(a class of 10 images gets 1 component).")
    covariance: Literal["full", "diag"] = Field("full", description="Covariance of each component (scikit-learn's "
                                                "`covariance_type`).")
    reg_covar: float = Field(1e-3, gt=0.0, description="Added to each covariance's diagonal (in PCA units): keeps a "
                             "class of few images from collapsing onto them.")


class CodsaConfig(Strict):
    """Settings of ``stillroom codsa-data`` and of a classifier run that trains on its transfer set."""

    policy: Literal["uniform", "inverse_frequency", "to_balance", "weak_regions"] = Field(
        "to_balance", description="How `volume` is split over the classes (n_c: real training images of class c). "
        "uniform: like the data, v_c proportional to n_c (non-adaptive augmentation). inverse_frequency: v_c "
        "proportional to 1 / n_c. to_balance: water-filling, minority classes first: each class is brought up "
        "toward a common level L, v_c = max(0, L - n_c) (what is left once all are level is shared equally). "
        "weak_regions: v_c proportional to a reference model's cross-validated error on class c plus "
        "`weak_floor` (logistic regression on the PCA features, `weak_folds` folds of the real training "
        "images; the run's held-out images are never read). Every policy makes exactly `volume` samples "
        "(largest-remainder rounding, ties to the lower class index).")
    volume: int = Field(400, ge=1, description="Synthetic images in total, the same for every policy.")
    generator: CodsaGenerator = Field(default_factory=CodsaGenerator)
    label: Literal["teacher", "condition"] = Field(
        "teacher", description="The hard label a synthetic image carries (what the `ce` term reads): teacher: the "
        "teacher's top-1 class; condition: the class the generator was conditioned on. Distillation terms read the "
        "teacher on the synthetic image either way; its log-probabilities are stored with the set.")
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description="Keep only samples whose teacher top-1 "
                                  "probability is at least this (0: keep all); rejected samples are redrawn.")
    max_rounds: int = Field(20, ge=1, description="Draws per class to fill its allocation through the confidence "
                            "filter; a class still short after them is an error naming it.")
    weak_folds: int = Field(5, ge=2, description="weak_regions: cross-validation folds (at most the smallest "
                            "class's image count).")
    weak_floor: float = Field(0.02, ge=0.0, description="weak_regions: added to each class's error, so a class the "
                              "reference model never misses still gets a share.")
    seed: int | None = Field(None, description="Seed of the PCA, the mixtures and the sampling (null: the run's seed).")
    out: str | None = Field(None, description="Folder of the transfer set (transfer_set.safetensors + manifest.json); "
                            "null: <output_dir>/<name>-codsa. `~` is expanded.")
    add_to_training: bool = Field(
        False, description="stillroom run: train the student on the real training images plus the transfer set in "
        "`out` (written by `stillroom codsa-data` with these same settings, checked before step 0); the CE baseline "
        "trains on the real images alone. Classifier domain, online teacher only.")

    def folder(self, cfg: "RunConfig") -> Path:
        """The transfer set's folder (``out``, or ``<output_dir>/<name>-codsa``)."""
        return Path(self.out).expanduser() if self.out else Path(cfg.output_dir).expanduser() / f"{cfg.name}-codsa"

    def settings(self) -> dict:
        """What the transfer set depends on besides the data and the teacher (its manifest repeats it)."""
        return self.model_dump(mode="json", exclude={"out", "add_to_training"})


def check_codsa_run(cfg: "RunConfig") -> None:
    """Refuse, when the recipe loads, training on a transfer set where it cannot be used."""
    if not cfg.codsa.add_to_training:
        return
    if cfg.domain != "classifier":
        raise ValueError(f"codsa.add_to_training needs domain: classifier (the domain is {cfg.domain!r})")
    if cfg.classifier.teacher_source != "online":
        raise ValueError("codsa.add_to_training needs classifier.teacher_source: online (a soft-label store holds "
                         "the real training images only)")
    if getattr(cfg.method_section, "semi_supervised", None) is not None:
        raise ValueError(f"codsa.add_to_training cannot be combined with method {cfg.method!r}'s semi-supervised "
                         "split: use method kd or sft")
