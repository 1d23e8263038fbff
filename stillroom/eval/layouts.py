"""How each domain's metrics show in report.md: a :class:`ReportLayout` per domain (:data:`LAYOUTS`).

:func:`resolve_layout` picks one by name, or by a metric only that domain reports.
"""

from __future__ import annotations

from dataclasses import dataclass

# (key, column header, formatter name), in table order; other scalar keys follow, sorted.
_COLUMNS = (
    ("heldout_ce", "CE (nats/tok)", "f4"),
    ("perplexity", "perplexity", "ppl"),
    ("bits_per_byte", "bits/byte", "f4"),
    ("kl_teacher_student", "KL(teacher‖model)", "f4"),
    ("top1_agreement", "top-1 agree", "pct"),
    ("params", "params", "count"),
    ("trainable_params", "trainable", "count"),
    ("tokens_per_s", "fwd tokens/s", "int"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
    ("tokens", "eval tokens", "int"),
)
_DELTA_KEYS = ("heldout_ce", "perplexity", "bits_per_byte")

_CLASSIFIER_COLUMNS = (
    ("accuracy", "accuracy", "pct"),
    ("top1_agreement", "top-1 agree", "pct"),
    ("ece", "ECE", "f4"),
    ("kl_teacher_student", "KL(teacher‖model)", "f4"),
    ("heldout_ce", "CE (nats/image)", "f4"),
    ("params", "params", "count"),
    ("trainable_params", "trainable", "count"),
    ("images_per_s", "fwd images/s", "int"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
    ("examples", "eval images", "int"),
    ("balanced_accuracy", "balanced acc", "pct"),
    ("minority_accuracy", "minority acc", "pct"),
)

_MAE_COLUMNS = (
    ("mae_loss", "MAE loss (held-out)", "f4"),
    ("probe_accuracy", "linear probe", "pct"),
    ("params", "params", "count"),
    ("encoder_params", "encoder", "count"),
    ("teacher_block_tokens", "teacher block-tokens/img", "int"),
    ("images_per_s", "enc images/s", "int"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)

_MLM_COLUMNS = (
    ("mlm_loss", "MLM loss (held-out)", "f4"),
    ("probe_accuracy", "linear probe", "pct"),
    ("params", "params", "count"),
    ("encoder_params", "encoder", "count"),
    ("sequences_per_s", "enc sequences/s", "int"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)

_GENERATIVE_COLUMNS = (
    ("swd_data", "SWD to data", "f4"),
    ("swd_teacher", "SWD to teacher", "f4"),
    ("mmd_data", "MMD² to data", "f4"),
    ("mode_precision", "mode precision", "pct"),
    ("mode_recall", "mode recall", "pct"),
    ("variance", "variance", "f4"),
    ("frechet_distance", "Fréchet dist. (clf feats)", "f4"),
    ("precision", "precision", "pct"),
    ("recall", "recall", "pct"),
    ("class_accuracy", "class accuracy", "pct"),
    ("nfe", "NFE", "int"),
    ("samples_per_s", "samples/s", "int"),
    ("params", "params", "count"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)

_AUTOREGRESSIVE_COLUMNS = (
    ("joint_tv", "joint TV to teacher", "f4"),
    ("pair_tv_12", "TV (q1,q2)", "f4"),
    ("pair_tv_14", "TV (q1,q4)", "f4"),
    ("tv_true", "TV to true joint", "f4"),
    ("teacher_tv_true", "exact TV teacher-true", "f4"),
    ("quality", "Q (true log-lik/seq)", "f4"),
    ("diversity", "D (1-cos bigrams)", "f4"),
    ("modes_hit", "modes hit/cond", "f1"),
    ("nfe", "NFE", "int"),
    ("samples_per_s", "samples/s", "int"),
    ("params", "params", "count"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)


_MASKED_DIFFUSION_COLUMNS = (
    ("accuracy", "accuracy (1 tok/step)", "pct"),
    ("exact_match", "exact (1 tok/step)", "pct"),
    ("threshold_accuracy", "accuracy (threshold)", "pct"),
    ("threshold_exact_match", "exact (threshold)", "pct"),
    ("tokens_per_step", "tokens/step (threshold)", "f4"),
    ("decode_steps", "decode steps (threshold)", "f1"),
    ("params", "params", "count"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)


_CLIP_COLUMNS = (
    ("zero_shot_mean", "zero-shot (mean)", "pct"),
    ("recall1_mean", "recall@1 i->t (mean)", "pct"),
    ("params", "params", "count"),
    ("trainable_params", "trainable", "count"),
    ("images_per_s", "img-tower images/s", "int"),
    ("train_seconds", "train s", "f1"),
    ("steps", "steps", "int"),
)


@dataclass(frozen=True)
class ReportLayout:
    """How one domain's metrics show in report.md.

    ``columns``: ``(metric key, header, format)`` in table order (formats: ``f4``, ``f1``, ``pct``, ``ppl``,
    ``int``, ``count``; other scalar metrics follow, sorted); ``deltas``: metrics shown as model − teacher;
    ``speed``: the forward-throughput metric (the summary's speed ratio); ``ce_unit``: what ``heldout_ce``
    is per; ``plots``: PNG files the domain writes into the run folder before the report (embedded when
    present); ``marker``: a metric only this domain reports (picks the layout when none is named).
    """

    columns: tuple[tuple[str, str, str | None], ...]
    deltas: tuple[str, ...]
    speed: str
    ce_unit: str
    plots: tuple[str, ...] = ()
    marker: str | None = None
    gap_metric: str = "heldout_ce"
    """The metric of the summary's "gap to the teacher closed" (bits per byte when the teacher's tokens differ)."""


LAYOUTS: dict[str, ReportLayout] = {
    "lm": ReportLayout(_COLUMNS, _DELTA_KEYS, speed="tokens_per_s", ce_unit="nats/token"),
    "lm_cross": ReportLayout(_COLUMNS, ("bits_per_byte",), speed="tokens_per_s",
                             ce_unit="nats/token (of the student's tokens)", gap_metric="bits_per_byte"),
    "classifier": ReportLayout(_CLASSIFIER_COLUMNS, ("accuracy", "ece", "heldout_ce"), speed="images_per_s",
                               ce_unit="nats/image", plots=("confusion_matrix.png", "reliability.png"),
                               marker="images_per_s"),
    "mae": ReportLayout(_MAE_COLUMNS, ("mae_loss", "probe_accuracy"), speed="images_per_s", ce_unit="",
                        marker="probe_accuracy"),
    "mlm": ReportLayout(_MLM_COLUMNS, ("mlm_loss", "probe_accuracy"), speed="sequences_per_s", ce_unit="",
                        marker="mlm_loss"),
    "generative": ReportLayout(_GENERATIVE_COLUMNS, (), speed="samples_per_s", ce_unit="",
                               plots=("samples.png",), marker="samples_per_s"),
    "autoregressive": ReportLayout(_AUTOREGRESSIVE_COLUMNS, (), speed="samples_per_s", ce_unit="", marker="joint_tv"),
    "masked_diffusion": ReportLayout(_MASKED_DIFFUSION_COLUMNS, (), speed="tokens_per_step", ce_unit="",
                                     marker="decode_steps"),
    "clip": ReportLayout(_CLIP_COLUMNS, ("zero_shot_mean", "recall1_mean"), speed="images_per_s", ce_unit="",
                         plots=("reliability.png",), marker="recall1_mean"),
}
"""Report layouts by domain name (``RunConfig.domain``)."""


def resolve_layout(layout: "str | ReportLayout | None", models: dict[str, dict]) -> ReportLayout:
    """``layout`` itself, the layout of that name, or (``None``) the first whose ``marker`` the models carry,
    else ``lm``'s."""
    if isinstance(layout, ReportLayout):
        return layout
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"write_report: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        return LAYOUTS[layout]
    for candidate in LAYOUTS.values():
        if candidate.marker is not None and any(candidate.marker in m for m in models.values()):
            return candidate
    return LAYOUTS["lm"]
