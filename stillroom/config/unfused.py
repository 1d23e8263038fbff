"""Config section of ``method: unfused`` (spec section 7; docs/methods/unfused.md) and its SimCLR-lite teacher.

This module imports :mod:`stillroom.config.core` and :mod:`stillroom.config.domains` only
(:mod:`stillroom.config.methods` registers the section), so :class:`UnfusedConfig` follows
``MethodSection``'s contract (``method`` + ``check_run``) without subclassing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict
from stillroom.config.domains import ClassifierArch

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class SimclrConfig(Strict):
    """The self-supervised teacher of ``method: unfused`` when ``unfused.teacher_path`` is null: SimCLR-lite,
    trained here once on the training images without their labels and cached in
    <cache_dir>/ssl_teachers/<hash of these settings, the data and the seed>/ (:mod:`stillroom.methods.simclr`).
    The encoder is a classifier of `arch` whose `embedding_dim` outputs are the embedding."""

    arch: ClassifierArch = Field(
        default_factory=lambda: ClassifierArch(kind="mlp", hidden=[256]),
        description="The encoder's layers before its output (an mlp [256] with embedding_dim 128 is the spec's "
        "MLP 64-256-128).")
    embedding_dim: int = Field(128, ge=2, description="Width of the embedding the encoder outputs (NT-Xent and the "
                               "pseudo-label features use it).")
    steps: int = Field(300, ge=1, description="Optimizer steps of the SimCLR training (AdamW, warm-up, cosine).")
    batch_size: int = Field(128, ge=2, description="Images per step; each gives two views, and the other 2B - 2 "
                            "views of the batch are its negatives.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature tau.")
    shift: int = Field(1, ge=0, description="Views: random translation by up to this many pixels each way "
                       "(zero-filled).")
    noise: float = Field(0.1, ge=0, description="Views: standard deviation of the Gaussian noise added to pixels.")
    erase: int = Field(3, ge=0, description="Views: side of the square patch set to 0 at a random place (0: none).")
    seed: int | None = Field(None, description="Seed of its initialisation, data order and views (null: the run's).")


class UnfusedConfig(Strict):
    """UNFUSED (Seth et al. 2023) on a classifier: a self-supervised teacher's features on the training images
    -> PCA (whitened) -> L2 norm -> k-means: cluster ids are the pseudo-labels of a fresh student trained with
    multi-exit self-distillation (:mod:`stillroom.methods.unfused`); then fine-tune it on few labels with an
    ordinary run (``classifier.student_path``). ``loss.terms`` must be ``[{name: ce}]``: the method's own loss
    replaces them (L = L_CE + L_KL + L_MSE over the exits, see `alpha`, `beta`, `gamma`)."""

    method: ClassVar[str] = "unfused"

    teacher_path: str | None = Field(
        None, description="A saved encoder folder (model.safetensors + config.json of a stillroom classifier whose "
        "outputs are the features) to cluster; `~` is expanded. null: train `ssl` here and cache it.")
    ssl: SimclrConfig = Field(default_factory=SimclrConfig, description="The SimCLR-lite teacher trained here.")
    pca_dim: int = Field(32, ge=1, description="PCA components kept (at most the feature width and image count).")
    whiten: bool = Field(True, description="Scale each PCA component to unit variance (eigen_power -0.5).")
    clusters: int = Field(32, ge=2, description="k of k-means: the number of pseudo-classes.")
    kmeans_iters: int = Field(20, ge=1, description="Most k-means (Lloyd) iterations (one k-means++ start).")
    exits: list[str] = Field(
        default_factory=lambda: ["layer.0", "layer.1"],
        description="Taps of the student (models/taps.py names: layer.i is the i-th Linear/Conv2d of a stillroom "
        "mlp/cnn, taken after its ReLU) that each get an exit head.")
    embedding: str = Field("layer.2", description="Tap of the student's final embedding q (after its ReLU); the "
                           "final pseudo-label classifier C is a Linear on it.")
    projector: Literal["linear", "mlp1", "mlp2"] = Field(
        "mlp1", description="Kind of each exit head P_i (models/projectors.py), output = `clusters` logits.")
    alpha: float = Field(0.7, ge=0, description="Weight of each exit's CE on the pseudo-labels (the final head's "
                         "CE has weight 1).")
    beta: float = Field(0.3, ge=0, description="Weight of each KL(softmax(z) || softmax(z_i)) (batchmean).")
    gamma: float = Field(0.003, ge=0, description="Weight of each 2 - 2 cos(z_i, z) between exit and final logits.")
    detach_target: bool = Field(
        True, description="Stop the gradient through the final logits z where they are the target of the KL and "
        "cosine terms; false: the released code (gradients flow into both sides).")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier":
            raise ValueError(f"method=unfused trains image classifiers; set domain: classifier (got {run.domain!r})")
        terms = [t.name for t in run.loss.terms]
        if terms != ["ce"]:
            raise ValueError(f"method=unfused trains on pseudo-labels with its own multi-exit loss and needs "
                             f"loss.terms to be exactly one 'ce' term; loss.terms are {terms}. Set loss.terms: "
                             "[{name: ce}]")
        if not self.exits:
            raise ValueError("unfused.exits is empty: give at least one tap (e.g. [layer.0, layer.1])")
        if self.embedding in self.exits:
            raise ValueError(f"unfused.embedding={self.embedding!r} is also in unfused.exits; an exit must be an "
                             "earlier layer than the final embedding")
        if self.teacher_path is not None and _changed_ssl(self):
            raise ValueError("unfused: give `teacher_path` (a saved encoder) or `ssl` settings, not both")


def _changed_ssl(section: "UnfusedConfig") -> bool:
    return "ssl" in section.model_fields_set and section.ssl != SimclrConfig()
