"""What the generative report measures: samples of every model against the data, the exact density and the
teacher, with the cost of drawing them.

Every row draws ``eval.samples_per_class`` samples per class from the same noise (``eval.seed``), so rows
differ only by their model and sampler. The teacher samples with ``teacher.sample_steps`` steps and guidance
``teacher.guidance`` (the reference), and again at each of ``eval.teacher_steps`` (rows ``teacher_<n>step``:
what the teacher gives at a student's budget); students sample with ``student.steps``. Point toys with
``eval.steer_scale > 0`` add :data:`STEER_ROWS`: the teacher unconditional (null label), and the same steered
towards each sample's class by the toy's exact class posterior (steered sampling, :class:`~.sampling.Steer`).

Point toys (:func:`point_metrics`), each per class then averaged over classes:
``swd_data`` / ``mmd_data`` (sliced Wasserstein distance and RBF-MMD^2 to the held-out data),
``swd_teacher`` / ``mmd_teacher`` (to the teacher's reference samples), ``mode_precision`` and ``mode_recall``
against the exact mixture, ``variance`` (mean per-dimension variance: DMD's collapse indicator). Every row:
``nfe`` (network evaluations per sample, guidance counting two), ``samples_per_s`` (best of 3 timed draws of
one batch: 1024 points or 128 images), ``params``. Each row's samples are kept in ``<run>/samples/<row>.safetensors`` and drawn together
in ``samples.png`` (points: a scatter per row; images: a grid, one row per model, one column per class).

Images (:func:`image_row_metrics`), in the penultimate features of a classifier trained here once on the
training images (:func:`~.image_metrics.feature_classifier`): ``frechet_distance`` to the held-out images,
k-NN ``precision`` / ``recall``, and ``class_accuracy`` (samples the classifier assigns to their intended class).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from stillroom.config.generative import GenerativeConfig
from stillroom.domains.generative.data import GenSplits, balanced_labels
from stillroom.domains.generative.models import Denoiser
from stillroom.domains.generative.sampling import Steer, sample

Log = Callable[[str], None]
SAMPLES_DIR = "samples"
PLOT = "samples.png"


STEER_ROWS = ("teacher_uncond", "teacher_steered")
"""Rows of ``eval.steer_scale > 0`` (point toys): the teacher unconditional, and steered by the exact posterior."""


def sampler_settings(sec: GenerativeConfig, row: str, toy=None) -> dict:
    """``{"steps", "guidance", "stochastic"}`` (and the student's ``fractions``, a steered row's ``steer``) of
    report row ``row``; ``toy``: the point toy whose exact posterior steers :data:`STEER_ROWS`."""
    if row in STEER_ROWS:
        scale = sec.eval.steer_scale if row == "teacher_steered" else 0.0
        loss = posterior_loss(toy, sec.eval.steer_std)
        return {"steps": sec.teacher.sample_steps, "guidance": 1.0, "stochastic": False, "steer": Steer(loss, scale)}
    if row == "teacher":
        return {"steps": sec.teacher.sample_steps, "guidance": sec.teacher.guidance, "stochastic": False}
    if row.startswith("teacher_") and row.endswith("step"):
        return {"steps": int(row[len("teacher_"):-len("step")]), "guidance": sec.teacher.guidance, "stochastic": False}
    return {"steps": sec.student.steps, "guidance": 1.0, "stochastic": sec.student.stochastic,
            "fractions": sec.student.fractions}


def posterior_loss(toy, std: float):
    """``loss(x0 [B, D], targets [B]) -> [B]``: ``-log p(target | x0)`` under ``toy``'s exact class posterior at
    mode standard deviation ``std`` (the recognition model of a steered row)."""
    def loss(x0: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -toy.class_log_posterior(x0, std).gather(1, targets.long()[:, None]).squeeze(1)

    return loss


def draw(model: Denoiser, sec: GenerativeConfig, row: str, classes: int, toy=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples [N, ...], labels [N])`` of row ``row`` from the evaluation noise."""
    labels = balanced_labels(sec.eval.samples_per_class * classes, classes)
    gen = torch.Generator().manual_seed(sec.eval.seed)
    return sample(model, labels, generator=gen, **sampler_settings(sec, row, toy)), labels


def nfe(settings: dict) -> int:
    return settings["steps"] * (1 if settings["guidance"] == 1.0 else 2)


@torch.no_grad()
def samples_per_s(model: Denoiser, settings: dict, classes: int, batch: int = 1024) -> float:
    """Samples per second of one batch of ``batch`` samples (best of 3 after a warm-up)."""
    labels = balanced_labels(batch, classes)
    gen = torch.Generator().manual_seed(0)
    sample(model, labels[:8], generator=gen, **settings)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sample(model, labels, generator=gen, **settings)
        best = min(best, time.perf_counter() - t0)
    return batch / max(best, 1e-9)


def point_metrics(x: torch.Tensor, labels: torch.Tensor, data: GenSplits, reference: torch.Tensor | None,
                  ref_labels: torch.Tensor | None, projections: int) -> dict[str, float]:
    """The point-toy metrics of samples ``x [N, D]`` with ``labels [N]`` (see the module docstring)."""
    from stillroom.domains.generative.toy_metrics import (
        mode_precision, mode_recall, output_variance, rbf_mmd2, sliced_wasserstein,
    )

    held_x, held_labels = data.heldout_tensors()
    row: dict[str, float] = {}
    for suffix, ref_x, ref_l in (("data", held_x, held_labels), ("teacher", reference, ref_labels)):
        if ref_x is None:
            continue
        swd, mmd = [], []
        for c in range(data.num_classes):
            a, b = x[labels == c], ref_x[ref_l == c]
            swd.append(sliced_wasserstein(a, b, projections=projections, seed=c))
            mmd.append(rbf_mmd2(a, b))
        row[f"swd_{suffix}"] = sum(swd) / len(swd)
        row[f"mmd_{suffix}"] = sum(mmd) / len(mmd)
    row["mode_precision"] = mode_precision(x, labels, data.toy)
    row["mode_recall"] = mode_recall(x, labels, data.toy)
    row["variance"] = output_variance(x)
    return row


def image_row_metrics(classifier, x: torch.Tensor, labels: torch.Tensor, data: GenSplits) -> dict[str, float]:
    from stillroom.domains.generative.image_metrics import image_metrics

    return image_metrics(classifier, x, labels, data.heldout_tensors()[0])


def feature_classifier_for(sec: GenerativeConfig, data: GenSplits, *, seed: int, cache_dir: str | None,
                           device: torch.device, log: Log):
    """The report's frozen feature classifier of an image run (trained once on the training images, cached)."""
    from stillroom.config.domains import ClassifierTeacherConfig
    from stillroom.domains.generative.image_metrics import feature_classifier

    tc = ClassifierTeacherConfig(steps=sec.eval.feature_classifier_steps, seed=0)
    return feature_classifier(tc, data.images, heldout_fraction=sec.heldout_fraction, seed=seed, cache_dir=cache_dir,
                              device=device, log=log)


def plot_images(run_dir: Path, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], class_names: list[str]) -> None:
    """``samples.png``: per row (model), the first sample of each class."""
    from stillroom.domains.generative.image_metrics import sample_grid_png

    order = sorted(rows, key=lambda r: (ROW_ORDER.index(r) if r in ROW_ORDER else 1, r))
    grid = {}
    for row in order:
        x, labels = rows[row]
        firsts = [int((labels == c).nonzero()[0]) for c in range(len(class_names))]
        grid[row] = x[firsts]
    sample_grid_png(grid, run_dir / PLOT, column_names=class_names)


def keep_samples(run_dir: Path, row: str, x: torch.Tensor, labels: torch.Tensor) -> None:
    folder = run_dir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{row}.tmp"
    save_file({"x": x.contiguous(), "labels": labels.contiguous()}, str(tmp))
    tmp.replace(folder / f"{row}.safetensors")


def kept_samples(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rows = {}
    for path in sorted((run_dir / SAMPLES_DIR).glob("*.safetensors")):
        t = load_file(str(path))
        rows[path.stem] = (t["x"], t["labels"])
    return rows


ROW_ORDER = ("teacher", "student_before", "student_after", "baseline")


def plot_points(run_dir: Path, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], held: tuple) -> None:
    """``samples.png``: one scatter per row (data first), coloured by class; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(rows, key=lambda r: (ROW_ORDER.index(r) if r in ROW_ORDER else 1, r))
    panels = [("data (held-out)", *held)] + [(r, *rows[r]) for r in order]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (title, x, labels) in zip(axes[0], panels):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=labels.numpy(), s=1, cmap="tab10", vmin=0, vmax=9)
        ax.set_title(title, fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = run_dir / f".{PLOT}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(run_dir / PLOT)
