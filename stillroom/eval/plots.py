"""Report plots, drawn with matplotlib's object API on the Agg canvas.

No pyplot: nothing global (backend, current figure) is touched, so plotting is
safe from any thread or process and needs no display.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = {"teacher": "#4c4c4c", "student_before": "#9ecae1", "student_after": "#3182bd", "baseline": "#e6550d"}


def read_loss_points(path: Path) -> tuple[list[float], list[float]]:
    """(steps, losses) from a metrics.jsonl: one JSON object per line.

    Lines without numeric ``step`` and ``loss`` (e.g. eval records) are skipped;
    blank lines are ignored; a malformed line raises naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist (expected a metrics.jsonl from a training run)")
    steps: list[float] = []
    losses: list[float] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            step, loss = rec.get("step"), rec.get("loss")
            if isinstance(step, (int, float)) and isinstance(loss, (int, float)) and math.isfinite(loss):
                steps.append(float(step))
                losses.append(float(loss))
    return steps, losses


def _smooth(values: list[float], window: int) -> list[float]:
    """Centered moving average (no lag, unlike an EMA); the window shrinks at the ends."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def save_png(fig: Figure, path: Path) -> None:
    """Atomic PNG write (temp file + rename)."""
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_loss_curves(path: Path, metrics_files: dict[str, Path]) -> None:
    """Training loss vs step, one line per run (raw, plus a centered moving average
    when there are 30 points or more). Each run plots its own objective (a KD
    loss and a CE baseline are not on the same scale)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    drawn = 0
    for i, (label, file) in enumerate(metrics_files.items()):
        steps, losses = read_loss_points(file)
        if not steps:
            continue
        color = _COLORS.get(label) or f"C{i}"
        if len(steps) >= 30:
            window = max(3, len(steps) // 25) | 1
            ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(
                steps, _smooth(losses, window), color=color, linewidth=1.6, label=f"{label} (mean of {window} steps)"
            )
        else:
            ax.plot(steps, losses, color=color, linewidth=1.6, marker="o" if len(steps) < 10 else None, label=label)
        drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each run's objective)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    save_png(fig, Path(path))


def plot_metric_bars(path: Path, models: dict[str, dict], labels: dict[str, str]) -> None:
    """Bars per model for held-out CE, KL(teacher || model) and top-1 agreement."""
    panels = (
        ("heldout_ce", "held-out CE (nats/token)"),
        ("kl_teacher_student", "KL(teacher ‖ model)"),
        ("top1_agreement", "top-1 agreement with teacher"),
    )
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, len(panels))
    for ax, (metric, name) in zip(axes, panels):
        keys = [
            k
            for k, m in models.items()
            if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])
        ]
        vals = [float(models[k][metric]) for k in keys]
        if keys:
            bars = ax.bar(
                range(len(keys)), vals, color=[_COLORS.get(k, "C0") for k in keys], tick_label=[labels.get(k, k) for k in keys]
            )
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
            if metric == "top1_agreement":
                ax.set_ylim(0, 1.08)
        else:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    save_png(fig, Path(path))


def plot_confusion_matrix(path: Path, matrix, classes: list[str], title: str) -> None:
    """``matrix`` ``[C, C]`` (a tensor) (rows: true class) as a PNG heat map with counts, written atomically."""
    m = matrix.cpu().numpy()
    n = len(classes)
    fig = Figure(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), classes)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > top / 2 else "black")
    save_png(fig, Path(path))


def plot_reliability(path: Path, curves: dict[str, dict], eces: dict[str, float], title: str) -> None:
    """Reliability diagrams side by side, one panel per model (``curves``: name -> bins as
    ``stillroom.domains.vision.metrics.reliability_bins`` gives them): per confidence bin, a bar of the
    accuracy of its images at the bin's place, the bin's mean confidence as a dot, the diagonal of perfect
    calibration, and the bin's share of images (a purple bar at the bottom, 0..0.25 of the height);
    ``eces[name]`` (the report's ECE) in the panel's title. Written atomically."""
    fig = Figure(figsize=(3.6 * max(1, len(curves)), 3.9))
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (name, bins) in zip(axes, curves.items()):
        edges = bins["edges"]
        lefts, width = edges[:-1], edges[1] - edges[0]
        total = max(1, sum(bins["count"]))
        shown = [i for i, c in enumerate(bins["count"]) if c]
        ax.bar([lefts[i] for i in shown], [bins["accuracy"][i] for i in shown], width=width, align="edge",
               color=_COLORS.get(name, "C0"), alpha=0.75, edgecolor="black", linewidth=0.5, label="accuracy",
               zorder=2)
        ax.bar(lefts, [0.25 * c / total for c in bins["count"]], width=width, align="edge", color="#9e9ac8",
               edgecolor="#54278f", linewidth=0.5, label="share of images (x0.25)", zorder=3)
        ax.plot([bins["confidence"][i] for i in shown], [bins["accuracy"][i] for i in shown], "k.", markersize=4,
                zorder=4)
        ax.plot([0, 1], [0, 1], linestyle="--", color="#636363", linewidth=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-1 confidence")
        ax.set_title(f"{name}: ECE {eces.get(name, float('nan')):.4f}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy in the bin")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    save_png(fig, Path(path))
