"""Config sections of masked-autoencoder pre-training: the ``mae`` domain and its methods ``dmae`` and
``self_distill_fpt`` (spec sections 1 and 8; docs/methods/dmae.md, docs/methods/self_distill_fpt.md).

``domain: mae`` trains a ``ViTMAEForPreTraining`` (the student) with its own MAE loss on a classifier data
set's images (labels are read only by the report's linear probe). ``method: sft`` is plain MAE
pre-training (and the baseline: ``baseline: true``); ``dmae`` adds feature distillation from a frozen MAE
teacher on the same visible patches; ``self_distill_fpt`` regresses the student's unmasked [CLS] onto a
further-pre-trained teacher's (or, the L2-SP ablation, pulls its weights to theta_0).

These sections import :mod:`stillroom.config.core` only (``config.domains`` and ``config.methods``
register them), so the method sections follow ``MethodSection``'s contract (``method`` + ``check_run``)
without subclassing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class MaeArch(Strict):
    """A small ViTMAE (:func:`stillroom.domains.vision.hf_models.build_vit_mae`): encoder and decoder sizes; the
    MLP width is 4x the token width."""

    patch_size: int = Field(2, ge=1, description="Side of the square patches (must divide the square images).")
    hidden_size: int = Field(32, ge=1, description="Encoder token width (a multiple of `heads`).")
    layers: int = Field(4, ge=1, description="Encoder blocks.")
    heads: int = Field(2, ge=1, description="Encoder attention heads.")
    decoder_hidden_size: int = Field(32, ge=1, description="Decoder token width.")
    decoder_layers: int = Field(2, ge=1, description="Decoder blocks.")
    decoder_heads: int = Field(2, ge=1, description="Decoder attention heads.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "MaeArch":
        for width, heads, name in ((self.hidden_size, self.heads, ""), (self.decoder_hidden_size, self.decoder_heads,
                                                                          "decoder_")):
            if width % heads:
                raise ValueError(f"{name}hidden_size={width} is not a multiple of {name}heads={heads}")
        return self


class MaeTeacherConfig(Strict):
    """The frozen MAE teacher of ``dmae`` / ``self_distill_fpt``: an MAE folder, or MAE-pre-trained here once
    (through the one loop, from ``init_path`` or from scratch) and cached under ``<cache_dir>/mae_teachers/``."""

    path: str | None = Field(None, description="A ViTMAEForPreTraining folder (save_pretrained); null: train one "
                             "here with the settings below and cache it.")
    init_path: str | None = Field(None, description="Start the teacher trained here from this MAE folder instead of "
                                  "`arch` (self_distill_fpt: theta_0, so the teacher is its further pre-training).")
    arch: MaeArch = Field(default_factory=lambda: MaeArch(hidden_size=64, layers=6, heads=4),
                          description="Architecture of a teacher trained here from scratch (spec 1.7: d 64, depth 6).")
    steps: int = Field(600, ge=1, description="Optimizer steps of a teacher trained here.")
    batch_size: int = Field(128, ge=1, description="Images per step of a teacher trained here.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up then cosine).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay of the matrices.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    seed: int | None = Field(None, description="Seed of its initialisation, masks and data order (null: the run's).")


class MaeConfig(Strict):
    """``domain: mae``: MAE pre-training of a small ViTMAE student on a classifier data set's images."""

    domain: ClassVar[str] = "mae"

    dataset: Literal["digits", "mnist", "shapes"] = Field("digits", description="The images (labels: probe only).")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of images held out by hash (digits).")
    student: MaeArch = Field(default_factory=MaeArch, description="The student built here (spec 1.7: d 32, depth 4).")
    student_path: str | None = Field(None, description="Start the student from this ViTMAEForPreTraining folder "
                                     "(self_distill_fpt: theta_0) instead of building `student`.")
    teacher: MaeTeacherConfig = Field(default_factory=MaeTeacherConfig)
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="Fraction of patches masked per image (training and the "
                              "held-out MAE loss).")
    norm_pix_loss: bool = Field(False, description="Reconstruct per-patch normalised pixels (MAE's norm_pix_loss).")
    shift: int = Field(0, ge=0, le=4, description="Light augmentation: translate each training image by up to this "
                       "many pixels each way (zero-filled), drawn per (seed, step, image).")
    eval_batch_size: int = Field(256, ge=1, description="Images per forward when evaluating.")
    probe_images_per_class: int | None = Field(None, ge=1, description="Labelled training images per class the "
                                               "linear probe fits on (null: all training images).")
    probe_c: float = Field(1.0, gt=0, description="Inverse L2 strength of the probe's LogisticRegression.")
    probe_max_iter: int = Field(1000, ge=10, description="LogisticRegression iterations of the probe.")


def _need_mae_domain(run: "RunConfig", method: str) -> None:
    if run.domain != "mae":
        raise ValueError(f"method={method} pre-trains masked autoencoders; set domain: mae (got {run.domain!r})")


class DmaeConfig(Strict):
    """``method: dmae`` (Bai et al. 2023): MAE loss + distance between the L2-normalised projected student block-l
    features and the frozen teacher's block-m features on the same visible patches."""

    method: ClassVar[str] = "dmae"

    student_layers: list[int] | None = Field(None, description="Student blocks (0-based) aligned, one per pair; null: "
                                             "the block at `relative_depth` of the student.")
    teacher_layers: list[int] | None = Field(None, description="Teacher blocks (0-based), one per student block; "
                                             "null: the block at `relative_depth` of the teacher.")
    relative_depth: float = Field(0.75, gt=0, le=1, description="Default alignment: block ceil(relative_depth * L) "
                                  "- 1 (0-based) of each network; 0.75 gives the released pair (8 of 12, 17 of 24) "
                                  "and spec 1.7's (2 of 4, 4 of 6).")
    projector: Literal["linear", "mlp1", "mlp2"] = Field("linear", description="Projection head per pair "
                                                         "(build_projector; the released fc-1layer is linear).")
    distance: Literal["l1", "l2"] = Field("l1", description="Mean absolute (l1) or squared (l2) difference over "
                                          "tokens and channels.")
    normalize: bool = Field(True, description="L2-normalise both features per token (the released recipe with a "
                            "projection head).")
    weight: float = Field(1.0, ge=0, description="Weight of each feature term (the released code: 1).")
    teacher_tokens: Literal["visible", "all"] = Field("visible", description="Run the teacher on the student's "
                                                      "visible patches (DMAE) or on all patches and keep the "
                                                      "visible ones (spec ablation C: ~1/(1-mask_ratio) x cost).")

    def check_run(self, run: "RunConfig") -> None:
        _need_mae_domain(run, "dmae")
        if (self.student_layers is None) != (self.teacher_layers is None):
            raise ValueError("dmae.student_layers and dmae.teacher_layers go together: set both or neither")
        if self.student_layers is not None and len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"dmae.student_layers {self.student_layers} and dmae.teacher_layers "
                             f"{self.teacher_layers} must pair up (same length)")
        if self.student_layers is not None and not self.student_layers:
            raise ValueError("dmae.student_layers is empty: give at least one aligned pair, or null for the default")


class SelfDistillFptConfig(Strict):
    """``method: self_distill_fpt`` (Lee et al. 2023): the student starts from theta_0 (``mae.student_path``);
    MAE loss + (1/B) sum ||h_s(x) - sg(h_T(x))||^2 with h the final-layernormed [CLS] of the unmasked image."""

    method: ClassVar[str] = "self_distill_fpt"

    regularizer: Literal["regression", "l2sp"] = Field("regression", description="regression: the [CLS] regression "
                                                      "onto the teacher; l2sp: the ablation, weight * ||theta - "
                                                      "theta_0||^2 over the encoder instead (no teacher).")
    weight: float = Field(1.0, ge=0, description="Weight of the regulariser (the paper: 1 for the regression).")

    def check_run(self, run: "RunConfig") -> None:
        _need_mae_domain(run, "self_distill_fpt")
        sec = run.mae or MaeConfig()  # the domain section may get its defaults after this check
        if sec.student_path is None:
            raise ValueError("method=self_distill_fpt starts the student from theta_0: set mae.student_path to an MAE "
                             "folder (e.g. a `domain: mae, method: sft` run's student/)")
        t = sec.teacher
        if self.regularizer == "regression" and t.path is None and t.init_path is None:
            raise ValueError("method=self_distill_fpt regresses onto the further-pre-trained theta_0: set "
                             "mae.teacher.path (its folder) or mae.teacher.init_path (theta_0, further pre-trained "
                             "here for mae.teacher.steps and cached)")
