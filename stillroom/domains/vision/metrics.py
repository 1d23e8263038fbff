"""Classifier report metrics: accuracy, agreement with the teacher, calibration, KL, CE, speed, confusion.

Every function takes logits ``[N, C]`` (any float dtype; computed in fp32) and labels ``[N]``.
The expected calibration error is torchmetrics' multiclass calibration error (top-1 confidence,
``n_bins`` equal-width bins, L1): ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

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


def kl_teacher_model(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` KL(p_teacher || p_model) in nats; a class the teacher gives probability 0 contributes 0."""
    t_logp = F.log_softmax(teacher_logits.float(), -1)
    s_logp = F.log_softmax(logits.float(), -1)
    t_p = t_logp.exp()
    return torch.where(t_p > 0, t_p * (t_logp - s_logp), torch.zeros_like(t_p)).sum(-1)


def classifier_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                       ) -> dict[str, float | int]:
    """``accuracy``, ``heldout_ce`` (nats per image), ``ece``, ``examples``; with the teacher's logits also
    ``top1_agreement`` (same top-1 class) and ``kl_teacher_student`` (mean KL(teacher || model))."""
    logits = logits.float()
    pred = logits.argmax(-1)
    out: dict[str, float | int] = {
        "accuracy": float((pred == labels).float().mean()),
        "heldout_ce": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits, labels),
        "examples": int(labels.numel()),
    }
    if teacher_logits is not None:
        out["top1_agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
        out["kl_teacher_student"] = float(kl_teacher_model(teacher_logits, logits).mean())
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts: row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def images_per_s(model: torch.nn.Module, images: torch.Tensor, *, device: torch.device, precision: str = "fp32",
                 repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Forward throughput on one batch ``images`` ``[B, C, H, W]`` (eval mode, no grad): one warm-up pass,
    then ``repeats`` timings of as many passes as take ``min_seconds`` (counted in the warm-up); the median."""
    was_training = model.training
    model.eval()
    x = images.to(device)

    def passes(n: int) -> float:
        t0 = time.perf_counter()
        with autocast(precision, device):
            for _ in range(n):
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one = max(passes(1), passes(1), 1e-6)  # the first pass warms up
    n = max(1, math.ceil(min_seconds / one))
    rates = [n * len(x) / max(passes(n), 1e-9) for _ in range(repeats)]
    model.train(was_training)
    return statistics.median(rates)
