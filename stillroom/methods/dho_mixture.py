"""DHO's inference mixture: the (alpha, beta) grid search on the validation split, and ``dho.json``.

``p = alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta)`` is evaluated for every pair of
``dho.alpha_grid x dho.beta_grid`` on the labelled validation images (one backbone forward: both heads' logits
are computed once). The pair with the highest validation accuracy wins; ties (frequent with a hundred
validation images) go to the lower validation NLL of the mixture, then to the earlier pair of the grid. The
choice is written into the model (:meth:`~stillroom.domains.vision.dual_head.DualHeadClassifier.set_mixture`),
so the saved student predicts with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stillroom.config.dho import DhoConfig
from stillroom.domains.vision.data import ImageExample
from stillroom.domains.vision.dual_head import DualHeadClassifier, mixture_log_probs
from stillroom.domains.vision.metrics import expected_calibration_error
from stillroom.files import write_atomic

REPORT_JSON = "dho.json"


@torch.no_grad()
def head_logits(model: DualHeadClassifier, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_ce [N, C], z_kd [N, C])`` fp32 on the CPU of ``images`` ``[N, C_in, H, W]`` (eval mode, then the
    model's mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce, kd = [], []
    for i in range(0, len(images), batch_size):
        z_ce, z_kd = model.heads(images[i : i + batch_size].to(device))
        ce.append(z_ce.float().cpu()), kd.append(z_kd.float().cpu())
    model.train(was_training)
    return torch.cat(ce), torch.cat(kd)


def grid_scores(z_ce_nc: torch.Tensor, z_kd_nc: torch.Tensor, labels_n: torch.Tensor, alphas: list[float],
                betas: list[float]) -> list[dict]:
    """Per ``(alpha, beta)`` of the grid (alpha-major): accuracy and mean NLL of the mixture on ``labels_n``."""
    rows = []
    for alpha in alphas:
        for beta in betas:
            logp = mixture_log_probs(z_ce_nc, z_kd_nc, alpha, beta)
            rows.append({"alpha": float(alpha), "beta": float(beta),
                         "accuracy": float((logp.argmax(-1) == labels_n).float().mean()),
                         "nll": float(F.nll_loss(logp, labels_n))})
    return rows


def best_pair(rows: list[dict]) -> dict:
    """The row with the highest accuracy; ties to the lower NLL, then to the earlier row."""
    return min(enumerate(rows), key=lambda kv: (-kv[1]["accuracy"], kv[1]["nll"], kv[0]))[1]


def choose_mixture(model: DualHeadClassifier, validation: list[ImageExample], settings: DhoConfig,
                   batch_size: int) -> dict:
    """Search the grid on ``validation``, set the winner in ``model``; returns it with the grid's rows."""
    images = torch.stack([e.image for e in validation])
    labels = torch.tensor([e.label for e in validation])
    z_ce, z_kd = head_logits(model, images, batch_size)
    rows = grid_scores(z_ce, z_kd, labels, settings.alpha_grid, settings.beta_grid)
    best = best_pair(rows)
    model.set_mixture(best["alpha"], best["beta"])
    return {**best, "validation_images": len(validation), "grid": rows}


def head_metrics(logits_nc: torch.Tensor, labels_n: torch.Tensor) -> dict:
    """Accuracy and ECE of one prediction (logits or log-probabilities ``[N, C]``)."""
    return {"accuracy": float((logits_nc.argmax(-1) == labels_n).float().mean()),
            "ece": expected_calibration_error(logits_nc, labels_n)}


def heldout_heads(model: DualHeadClassifier, heldout: list[ImageExample], batch_size: int,
                  fixed: tuple[float, float]) -> dict:
    """Held-out accuracy and ECE of the CE head, the KD head (beta 1), the chosen mixture and ``fixed``."""
    images = torch.stack([e.image for e in heldout])
    labels = torch.tensor([e.label for e in heldout])
    z_ce, z_kd = head_logits(model, images, batch_size)
    alpha, beta = model.mixture()
    return {"ce_head": head_metrics(z_ce, labels), "kd_head": head_metrics(z_kd, labels),
            "mixture": {**head_metrics(mixture_log_probs(z_ce, z_kd, alpha, beta), labels),
                        "alpha": alpha, "beta": beta},
            "mixture_fixed": {**head_metrics(mixture_log_probs(z_ce, z_kd, *fixed), labels),
                              "alpha": fixed[0], "beta": fixed[1]}}


def write_report(ctx: Any, run_dir: Path, search: dict | None, cosines: list[float]) -> dict:
    """``dho.json``: the split's sizes, the search, each head on the held-out images, the gradient cosine."""
    data, settings, model = ctx.data, ctx.cfg.dho, ctx.model
    report: dict[str, Any] = {
        "heads": settings.heads, "ce_weight": settings.ce_weight, "mixture_rule": settings.mixture,
        "labelled_images": len(data.labelled), "unlabelled_images": len(data.unlabelled),
        "validation_images": len(data.validation), "heldout_images": len(data.heldout),
        "search": None if search is None else {k: v for k, v in search.items() if k != "grid"},
        "search_grid": None if search is None else search["grid"],
        "grad_cos_mean": sum(cosines) / len(cosines) if cosines else None, "grad_cos_measurements": len(cosines),
    }
    if isinstance(model, DualHeadClassifier):
        report["heldout"] = heldout_heads(model, data.heldout, ctx.cfg.classifier.eval_batch_size,
                                          (settings.alpha, settings.beta))
    run_dir = Path(run_dir)
    write_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    if "heldout" in report:
        h = report["heldout"]
        ctx.log(f"dho: held-out accuracy CE head {100 * h['ce_head']['accuracy']:.1f}%, KD head "
                f"{100 * h['kd_head']['accuracy']:.1f}%, mixture {100 * h['mixture']['accuracy']:.1f}% "
                f"({run_dir / REPORT_JSON})")
    return report
