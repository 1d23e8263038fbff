"""The ``dmd`` section: distribution matching distillation of a generative teacher into a one- or few-step
generator (DMD, DMD2 and Decoupled DMD; spec section 10; docs/methods/dmd.md).

The generator (the student) descends a weighted sum of terms applied to its samples ``x``: ``dm`` (the
teacher's guided prediction against a fake-score critic's), ``ca`` (Decoupled DMD's CFG augmentation),
and the regularisers ``kl`` (mean/variance KL to the data's), ``reg`` (DMD v1's regression to the teacher's
ODE outputs from the same noise) and ``gan`` (DMD2's classifier head on the critic). The critic is a second
player, a trainable copy of the teacher updated ``critic_updates`` times per generator update on detached
generator samples. Noise levels are *noise fractions* ``u`` in [0, 1] (0 clean, 1 pure noise), whatever the
teacher's time convention.

This module imports :mod:`stillroom.config.core` only (``config.methods`` registers the section), so it
follows ``MethodSection``'s contract (``method`` + ``check_run``) without subclassing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


def _range(default: tuple[float, float], what: str):
    return Field(default_factory=lambda: list(default), min_length=2, max_length=2,
                 description=f"[lo, hi] noise fractions (0 clean, 1 pure noise) the {what} re-noises at, drawn "
                 "uniformly per sample.")


class DmdConfig(Strict):
    """Settings of ``method: dmd`` (see the module docstring)."""

    method: ClassVar[str] = "dmd"

    dm_weight: float = Field(1.0, ge=0, description="Weight of the distribution-matching term "
                             "(mu_fake - mu_real) / mean|x - mu_real| (0: off, e.g. CA-only).")
    real_guidance: float = Field(1.0, ge=0, description="Classifier-free guidance of the teacher's (real) "
                                 "prediction in the dm term (1: none; > 1: coupled DMD with CFG).")
    dm_range: list[float] = _range((0.02, 0.98), "dm term")
    ca_weight: float = Field(0.0, ge=0, description="Weight of Decoupled DMD's CFG-augmentation term "
                             "-(ca_guidance - 1)(mu_cond - mu_uncond) / mean|x - mu_cfg| (0: off).")
    ca_guidance: float = Field(2.0, ge=1, description="alpha of the CA term (the teacher's usual CFG scale).")
    ca_range: list[float] = _range((0.02, 0.98), "ca term")
    ca_schedule: Literal["full", "below_input"] = Field(
        "full", description="full: u_CA ~ U(ca_range); below_input: Decoupled DMD's rule for few-step students, "
        "u_CA ~ U(lo, min(hi, u_in)) with u_in the noise fraction of the generator step's input (one-step: = full).")
    kl_weight: float = Field(0.0, ge=0, description="Weight of the mean/variance KL regulariser (0: off).")
    kl_over: Literal["sample", "batch"] = Field(
        "sample", description="sample: spec 10.3's per-sample KL of each sample's mean and variance over its "
        "dimensions (images); batch: the KL of each dimension's mean and variance over the batch (2-D points, "
        "where two coordinates make no variance). Targets are the same statistics of the training data.")
    reg_weight: float = Field(0.0, ge=0, description="Weight of DMD v1's regression: squared L2 from G(z) to the "
                              "teacher's deterministic ODE output from the same noise z (0: off).")
    reg_pairs: int = Field(1024, ge=1, description="Size of the regression buffer of (z, label, teacher output) "
                           "pairs drawn once per run before step 0 from a seeded generator.")
    reg_steps: int = Field(50, ge=1, description="ODE steps of the teacher's regression outputs (guided with "
                           "real_guidance).")
    gan_weight: float = Field(0.0, ge=0, description="Weight of DMD2's non-saturating generator GAN term "
                              "softplus(-D(x)) (0: off; DMD2: 3e-3).")
    gan_d_weight: float = Field(1e-2, ge=0, description="Weight of the classifier head's loss softplus(D(fake)) + "
                                "softplus(-D(real)) in the critic's objective (DMD2: 1e-2; read when gan_weight > 0).")
    gan_width: int = Field(64, ge=1, description="Hidden width of the classifier head on the critic's features.")
    critic_updates: int = Field(5, ge=1, description="Critic updates per generator update (TTUR; DMD2: 5).")
    critic_lr: float | None = Field(None, gt=0, description="Peak learning rate of the critic (null: train.lr); "
                                    "the train schedule scales it.")
    critic_range: list[float] = _range((0.0, 1.0), "critic's denoising loss")
    critic_cond_dropout: float = Field(0.0, ge=0, lt=1, description="Condition dropout of the critic's denoising "
                                       "loss (DMD: none).")
    backward_simulation: bool = Field(True, description="Few-step students: each update draws the step k to train, "
                                      "makes its input by running the current generator (no grad) through steps "
                                      "< k, and backpropagates through step k only (DMD2). false: the whole chain "
                                      "of student.steps steps gets gradients.")

    @model_validator(mode="after")
    def _ranges(self) -> "DmdConfig":
        for name in ("dm_range", "ca_range", "critic_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"dmd.{name}={[lo, hi]}: need 0 <= lo < hi <= 1 (noise fractions)")
        weights = (self.dm_weight, self.ca_weight, self.kl_weight, self.reg_weight, self.gan_weight)
        if not any(w > 0 for w in weights):
            raise ValueError("dmd: every term weight is 0 (dm_weight, ca_weight, kl_weight, reg_weight, gan_weight); "
                             "give one a weight > 0")
        return self

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "generative":
            raise ValueError(f"method=dmd distils generative teachers; set domain: generative (got {run.domain!r})")
        if run.generative.student.fractions is not None:
            raise ValueError("dmd trains the generator at evenly spaced noise fractions of generative.student.steps; "
                             "generative.student.fractions would sample the report at others: leave it null")
        tc = run.generative.teacher
        guided = self.real_guidance != 1.0 or self.ca_weight > 0
        if guided and tc.path is None and tc.cond_dropout == 0:
            raise ValueError("dmd: real_guidance != 1 or ca_weight > 0 read the teacher's unconditional prediction, "
                             "but generative.teacher.cond_dropout is 0 (the teacher never saw the null label); "
                             "set generative.teacher.cond_dropout: 0.1")
