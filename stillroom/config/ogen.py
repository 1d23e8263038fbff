"""``method: ogen`` (Zang et al., ICLR 2024; spec section 6; docs/methods/ogen.md): fine-tune a frozen CLIP's
class prompts on few base-class shots without losing new classes.

The CLIP's towers are frozen. What trains: a prompt residual on the class text features (``w_c = n(e_c + A e_c)``,
``A`` shared, initialised to 0, so it moves new classes' weights too) and, optionally, an image-side linear
adapter. Two regularisers, each a switch (the spec's arms A-D): synthesised features of unknown classes from a
class-conditional generator (1-head attention over the k nearest base classes' text and image features,
trained leave-one-class-out), and self-distillation from a local mean teacher (the mean of the head's last
``w(e) = max(1, floor(e * window_ratio))`` epoch snapshots).

This module imports :mod:`stillroom.config.core` and :mod:`stillroom.config.clip` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.clip import ClipTeacherConfig
from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class OgenConfig(Strict):
    """``method: ogen`` in ``domain: clip``."""

    method: ClassVar[str] = "ogen"

    clip: ClipTeacherConfig = Field(default_factory=ClipTeacherConfig, description="The frozen CLIP: its `path`, or "
                                    "one trained here once and cached (`clip.clip`: its data and model).")
    dataset: Literal["digits", "shapes", "mnist"] = Field("digits", description="The class data set to fine-tune on "
                                                          "(one of `clip.datasets`).")
    base_classes: list[int] | None = Field(None, description="Class indices trained with images (null: the first "
                                           "half); the other classes are new: names only, no images.")
    shots: int = Field(16, ge=1, description="Training images per base class (drawn from the run's seed).")
    image_adapter: bool = Field(False, description="Also train an image-side residual adapter v' = n(v + B v) "
                                "(B initialised to 0).")
    synthesis: bool = Field(True, description="Train with synthesised features of unknown classes as extra classes "
                            "(spec arm C).")
    self_distill: bool = Field(True, description="Add self-distillation from the local mean teacher (spec arm B).")
    unknown_names: list[str] | None = Field(None, description="Class phrases of the unknown classes the generator "
                                            "synthesises (null: the new classes' phrases, as spec 6.6: names known, "
                                            "no images).")
    k_nn: int = Field(3, ge=1, description="Nearest base classes (text cosine) the generator attends over.")
    synthetic_per_step: int | None = Field(None, ge=1, description="Synthesised features per step (null: the "
                                           "micro-batch size).")
    generator_steps: int = Field(300, ge=1, description="Adam steps of the leave-one-class-out generator training "
                                 "(before the prompt training; the generator is then frozen).")
    generator_lr: float = Field(1e-2, gt=0, description="Learning rate of the generator's training.")
    lambda_sd: float = Field(1.0, ge=0, description="Weight of the self-distillation KL.")
    window_ratio: float = Field(0.2, gt=0, le=1, description="Local mean teacher window: the last max(1, floor(e * "
                                "window_ratio)) epoch snapshots at epoch e.")
    sd_temperature: float = Field(1.0, gt=0, description="Temperature of the teacher and student in the KL.")
    eval_every_epochs: int = Field(10, ge=1, description="Base / new / harmonic-mean accuracy logged every N epochs.")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "clip":
            raise ValueError(f"method=ogen fine-tunes a CLIP's prompts; set domain: clip (got {run.domain!r})")
        if run.baseline:
            raise ValueError("method=ogen: baseline: true trains a contrastive CLIP, not a prompt; compare OGEN's arms "
                             "with ogen.synthesis / ogen.self_distill off instead (baseline: false)")
        sec = run.clip
        if sec is not None and self.dataset not in sec.datasets:
            raise ValueError(f"ogen.dataset={self.dataset} must be one of clip.datasets {sec.datasets}: add it there")
        if self.base_classes is not None and (not self.base_classes or min(self.base_classes) < 0
                                              or len(set(self.base_classes)) != len(self.base_classes)):
            raise ValueError(f"ogen.base_classes={self.base_classes}: give distinct non-negative class indices")
