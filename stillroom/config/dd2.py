"""Config section of ``method: dd2`` (Distilled Decoding 2, Liu et al. 2025; spec 12; docs/methods/dd2.md).

This module imports :mod:`stillroom.config.core` only (``config.methods`` registers the section).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class Dd2Config(Strict):
    """``method: dd2`` (domain autoregressive): GTS initialisation, then a guidance network (FCS, denoising score
    matching on the generator's samples) and the one-step generator (CSD against the teacher's analytic
    conditional score) as two players. Times follow rectified flow, ``q^t = (1 - t) q + t eps``."""

    method: ClassVar[str] = "dd2"

    gts_steps: int = Field(300, ge=0, description="Steps of the GTS stage (fit the teacher's analytic score on "
                           "teacher-sampled sequences; its network initialises generator and guidance); 0: no GTS, "
                           "both start from their random initialisation (the spec's arm B).")
    gts_lr: float = Field(3e-3, gt=0, description="Peak learning rate of the GTS stage (warm-up, then cosine).")
    gts_batch_size: int = Field(256, ge=1, description="Teacher-sampled sequences per GTS step.")
    generator_loss: Literal["sid", "dmd"] = Field("sid", description="sid: SiD's alpha = 1 loss (f_real - f_fake) . "
                                                  "(f_fake - q), gradients through q and q^t; dmd: DMD's direction "
                                                  "(f_fake - f_real) / mean|q - f_real| applied through the proxy "
                                                  "loss.")
    guidance_lr: float | None = Field(None, gt=0, description="Learning rate of the guidance network (null: "
                                      "train.lr).")
    guidance_updates: int = Field(1, ge=1, description="Guidance (FCS) updates per generator (CSD) update.")
    t_min: float = Field(0.02, gt=0, lt=1, description="Smallest noise level t drawn for FCS, CSD and GTS.")
    t_max: float = Field(0.98, gt=0, le=1, description="Largest noise level t drawn.")

    @model_validator(mode="after")
    def _time_range(self) -> "Dd2Config":
        if self.t_min >= self.t_max:
            raise ValueError(f"dd2.t_min={self.t_min} must be below dd2.t_max={self.t_max}")
        return self

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "autoregressive":
            raise ValueError(f"method=dd2 distils autoregressive token generators; set domain: autoregressive "
                             f"(got {run.domain!r})")
        if run.baseline:
            raise ValueError("method=dd2: baseline: true has no cross-entropy baseline to train for a one-step "
                             "generator; the report's `teacher_independent` row (each position from the "
                             "teacher's marginal) is the baseline: set baseline: false")
