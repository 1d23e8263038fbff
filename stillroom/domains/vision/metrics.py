"""Classifier report metrics: accuracy, agreement with the teacher, calibration, KL, CE, speed, confusion.

Every function takes logits ``[N, C]`` (any float dtype; computed in fp32) and labels ``[N]``.
The expected calibration error is torchmetrics' multiclass calibration error (top-1 confidence,
``n_bins`` equal-width bins, L1): ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from stillroom.eval.speed import SPEED_ROUNDS, SPEED_WARMUP, Timed, interleaved_rates
from stillroom.models.precision import autocast

ECE_BINS = 15


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """fp32 logits ``[N, C]`` of ``images`` ``[N, C_in, H, W]`` in eval mode, ``batch_size`` at a time (on the CPU)."""
    was_training = model.training
    model.eval()
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-1 confidence (torchmetrics ``multiclass_calibration_error``, L1 norm)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = logits.float().softmax(-1)
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[-1], n_bins=n_bins, norm="l1"))


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """The reliability diagram's data: top-1 confidences of ``logits`` ``[N, C]`` binned into ``n_bins``
    equal-width bins of ``[0, 1]`` (the ECE's bins: ``torch.bucketize(conf, edges, right=True) - 1``), per bin
    ``accuracy`` (fraction whose top-1 class is the label), mean ``confidence`` and ``count`` (0 and 0 in an
    empty bin), plus the ``edges`` ``[n_bins + 1]``. ``sum_b count_b / N * |accuracy_b - confidence_b|`` is
    the ECE, except that torchmetrics keeps confidences of exactly 1.0 in a bin of their own; here they
    belong to the last bin, where the diagram shows them."""
    probs = logits.float().softmax(-1)
    confidence, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).float()
    mean = lambda v: torch.bincount(index, weights=v, minlength=n_bins) / count.clamp(min=1)  # noqa: E731
    return {"edges": edges.tolist(), "accuracy": mean(correct).tolist(), "confidence": mean(confidence).tolist(),
            "count": count.long().tolist()}


def kl_teacher_model(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` KL(p_teacher || p_model) in nats; a class the teacher gives probability 0 contributes 0."""
    t_logp = F.log_softmax(teacher_logits.float(), -1)
    s_logp = F.log_softmax(logits.float(), -1)
    t_p = t_logp.exp()
    return torch.where(t_p > 0, t_p * (t_logp - s_logp), torch.zeros_like(t_p)).sum(-1)


def class_accuracies(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     minority: list[int] | None = None) -> dict[str, float | list]:
    """``per_class_accuracy`` ``[num_classes]`` (recall of each class; ``None`` for a class with no image),
    ``balanced_accuracy`` (their mean over the classes present: each class weighs the same, however rare), and
    with ``minority`` classes ``minority_accuracy`` (the mean over those present)."""
    per_class = [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else None
                 for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    out: dict[str, float | list] = {"per_class_accuracy": per_class,
                                    "balanced_accuracy": sum(present) / len(present) if present else float("nan")}
    if minority:
        rare = [per_class[c] for c in minority if c < num_classes and per_class[c] is not None]
        out["minority_accuracy"] = sum(rare) / len(rare) if rare else float("nan")
    return out


def classifier_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                       minority: list[int] | None = None) -> dict[str, float | int]:
    """``accuracy``, ``heldout_ce`` (nats per image), ``ece``, ``examples``; with the teacher's logits also
    ``top1_agreement`` (same top-1 class) and ``kl_teacher_student`` (mean KL(teacher || model)); and
    :func:`class_accuracies`' ``per_class_accuracy``, ``balanced_accuracy`` (and ``minority_accuracy``)."""
    logits = logits.float()
    pred = logits.argmax(-1)
    out: dict[str, float | int] = {
        "accuracy": float((pred == labels).float().mean()),
        "heldout_ce": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits, labels),
        "examples": int(labels.numel()),
        **class_accuracies(pred, labels, logits.shape[-1], minority),
    }
    if teacher_logits is not None:
        out["top1_agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
        out["kl_teacher_student"] = float(kl_teacher_model(teacher_logits, logits).mean())
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts: row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def interleaved_images_per_s(models: Mapping[str, tuple[torch.nn.Module, torch.Tensor]], *, device: torch.device,
                             precision: str = "fp32", rounds: int = SPEED_ROUNDS, warmup: int = SPEED_WARMUP,
                             min_seconds: float = 0.05) -> dict[str, float]:
    """Forward throughput (images/s; eval mode, no grad, modes restored) of each named ``(model, batch)``
    (``batch`` ``[B, C, H, W]``), timed together by :func:`~stillroom.eval.speed.interleaved_rates`:
    every model warmed up, then timed in turn round after round, as many passes a round as take
    ``min_seconds``; each model's best round."""
    timed, modes = {}, {}
    for name, (model, images) in models.items():
        modes.setdefault(model, model.training)
        model.eval()
        x = images.to(device)

        def step(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        timed[name] = Timed(step, items=len(x))
    try:
        with torch.no_grad(), autocast(precision, device):
            return interleaved_rates(timed, rounds=rounds, warmup=warmup, min_round_s=min_seconds)
    finally:
        for model, was_training in modes.items():
            model.train(was_training)


def images_per_s(model: torch.nn.Module, images: torch.Tensor, *, device: torch.device, precision: str = "fp32",
                 repeats: int = SPEED_ROUNDS, min_seconds: float = 0.05) -> float:
    """One model's :func:`interleaved_images_per_s` on one batch ``images`` ``[B, C, H, W]`` (``repeats``
    rounds after the warm-up); to compare models, time them together with that function instead."""
    return interleaved_images_per_s({"model": (model, images)}, device=device, precision=precision, rounds=repeats,
                                    min_seconds=min_seconds)["model"]
