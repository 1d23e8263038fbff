"""Image metrics of generated samples, in the feature space of a classifier trained here on the same data.

Generated and real images are ``[N, C, H, W]`` in [-1, 1] (the generative domain's range); the feature
classifier is a vision-domain classifier (:func:`stillroom.domains.vision.teacher.classifier_teacher`) that
reads [0, 1], so :func:`to_unit_range` maps ``x -> (x + 1) / 2`` (clamped: a sample may overshoot) first.

* :func:`classifier_features`: the classifier's penultimate activations, the input of its last ``nn.Linear``
  (the head), taken with a forward pre-hook;
* :func:`frechet_distance`: ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` (FID's formula, in
  this classifier's feature space);
* :func:`precision_recall`: Kynkaanniemi et al. (2019) k-NN manifolds: precision is the fraction of fake
  features inside the real manifold (the union of balls around each real feature, radius its distance to its
  k-th nearest real neighbour), recall the fraction of real features inside the fake manifold;
* :func:`class_accuracy`: the fraction of generated images the classifier assigns to their intended class;
* :func:`sample_grid_png`: a PNG grid, one row per model (teacher at 1/4/50 steps, student, baseline), one
  column per class, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from stillroom.config.domains import ClassifierTeacherConfig
from stillroom.domains.vision.data import ImageSplits
from stillroom.eval.plots import save_png
from stillroom.train.distributed import Topology

FEATURE_BATCH = 512
"""Images per classifier forward when features or predictions are computed."""
DISTANCE_ROWS = 1024
"""Query rows per block of the k-NN distance matrices (bounds memory to ``DISTANCE_ROWS x N`` floats)."""


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> [0, 1] (the vision domain's range), clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def feature_classifier(tc: ClassifierTeacherConfig, splits: ImageSplits, *, heldout_fraction: float, seed: int,
                       cache_dir: str | None, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    """The frozen feature classifier of the metrics: the vision domain's classifier teacher ``tc`` trained with
    cross-entropy on ``splits.train`` (images in [0, 1]) through the loop, once, and cached (or loaded from
    ``tc.path``). Build ``splits`` with :func:`stillroom.domains.vision.data.build_image_splits` on the same data
    set and held-out fraction as the generator, so the classifier never sees the held-out images."""
    from stillroom.domains.vision.teacher import classifier_teacher

    model, origin = classifier_teacher(tc, splits, heldout_fraction=heldout_fraction, seed=seed, cache_dir=cache_dir,
                                       device=device, topology=Topology(), log=log)
    log(f"image metrics: feature classifier {origin}")
    return model.eval().requires_grad_(False)


def _head(classifier: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``classifier`` (its output head), whose input is the penultimate feature."""
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"feature classifier {type(classifier).__name__} has no nn.Linear head; the image metrics "
                         "read the input of its last Linear layer as the feature")
    return linears[-1]


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, *,
                        batch_size: int = FEATURE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, F], logits [N, K])`` fp32 on the CPU of ``images [N, C, H, W]`` in [-1, 1]: features are
    the input of the classifier's head, computed on the classifier's device, ``batch_size`` at a time."""
    device = next(classifier.parameters()).device
    seen: list[torch.Tensor] = []
    handle = _head(classifier).register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1)))
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        for i in range(0, len(images), batch_size):
            seen.clear()
            out = classifier(to_unit_range(images[i:i + batch_size]).to(device))
            feats.append(seen[-1].float().cpu())
            logits.append(out.float().cpu())
    finally:
        handle.remove()
        classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images [N, C, H, W]`` in [-1, 1] the classifier assigns to their intended ``labels [N]``."""
    _, logits = classifier_features(classifier, images)
    return float((logits.argmax(-1) == labels.cpu()).float().mean())


def image_metrics(classifier: nn.Module, fake_images: torch.Tensor, fake_labels: torch.Tensor,
                  real_images: torch.Tensor, k: int = 3) -> dict[str, float]:
    """The report's numbers of generated ``fake_images [N, C, H, W]`` (intended classes ``fake_labels [N]``)
    against held-out ``real_images [M, C, H, W]``, all in [-1, 1]: ``frechet_distance``, ``precision``,
    ``recall`` (k-NN manifolds) and ``class_accuracy``, in the classifier's penultimate feature space."""
    fake_feats, fake_logits = classifier_features(classifier, fake_images)
    real_feats, _ = classifier_features(classifier, real_images)
    precision, recall = precision_recall(real_feats, fake_feats, k=k)
    accuracy = float((fake_logits.argmax(-1) == fake_labels.cpu()).float().mean())
    return {"frechet_distance": frechet_distance(real_feats, fake_feats), "precision": precision, "recall": recall,
            "class_accuracy": accuracy}


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a [N, F]`` and ``feats_b [M, F]`` (N, M >= 2):
    ``||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^{1/2})``. The last trace is computed as
    ``sum sqrt(eig(S C_b S))`` with ``S = C_a^{1/2}`` from a symmetric eigen-decomposition: ``S C_b S`` is
    symmetric PSD and similar to ``C_a C_b``, so there is no complex residue to discard (the eigenvalues are
    clamped at 0 against round-off). In float64."""
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature widths differ ({a.shape[1]} vs {b.shape[1]})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    sqrt_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(_symmetric(sqrt_a @ cov_b @ sqrt_a)).clip(min=0)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())
    return max(value, 0.0)


def _as_float64(feats: torch.Tensor, name: str) -> np.ndarray:
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"frechet_distance: {name} must be [N, F] with N >= 2 (got {list(feats.shape)})")
    return feats.detach().cpu().double().numpy()


def _symmetric(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = np.linalg.eigh(_symmetric(cov))
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of the k-NN manifolds (see the module docstring) of ``real_feats [N, F]`` and
    ``fake_feats [M, F]``; each set needs more than ``k`` points. A point on a ball's boundary counts as inside."""
    for name, feats in (("real_feats", real_feats), ("fake_feats", fake_feats)):
        if feats.dim() != 2 or feats.shape[0] <= k:
            raise ValueError(f"precision_recall: {name} must be [N, F] with N > k={k} (got {list(feats.shape)})")
    real, fake = real_feats.detach().float(), fake_feats.detach().float().to(real_feats.device)
    precision = _inside_manifold(fake, real, _knn_radii(real, k)).float().mean()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def _knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """``[N]``: each point's distance to its k-th nearest other point of ``feats [N, F]``."""
    radii = []
    for i in range(0, len(feats), DISTANCE_ROWS):
        d = torch.cdist(feats[i:i + DISTANCE_ROWS], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest distance is the point itself (0)
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``[M]`` bool: whether each of ``points [M, F]`` lies within ``radii[j]`` of some ``centres[j]``."""
    inside = []
    for i in range(0, len(points), DISTANCE_ROWS):
        d = torch.cdist(points[i:i + DISTANCE_ROWS], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def sample_grid_png(images_by_row: dict[str, torch.Tensor], path: Path, *,
                    column_names: list[str] | None = None) -> Path:
    """A PNG of one row per entry of ``images_by_row`` (name -> ``[K, C, H, W]`` in [-1, 1], one image per
    column, e.g. one per class), written to ``path`` atomically (temp file + rename). Grey images (C = 1) are
    drawn in grey, C = 3 in colour. Every row needs the same number of images (``column_names``: their titles)."""
    if not images_by_row:
        raise ValueError(f"sample_grid_png({path}): no rows to draw")
    widths = {name: int(t.shape[0]) for name, t in images_by_row.items()}
    columns = max(widths.values())
    if len(set(widths.values())) != 1 or (column_names is not None and len(column_names) != columns):
        raise ValueError(f"sample_grid_png({path}): every row needs the same number of images (got {widths}"
                         f"{'' if column_names is None else f', {len(column_names)} column names'})")
    rows = len(images_by_row)
    fig = Figure(figsize=(0.9 * columns + 1.4, 0.9 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for r, (name, images) in enumerate(images_by_row.items()):
        for c, image in enumerate(to_unit_range(images.detach().cpu())):
            _draw(axes[r][c], image)
            if r == 0 and column_names is not None:
                axes[r][c].set_title(column_names[c], fontsize=8)
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)
    return path


def _draw(ax, image_chw: torch.Tensor) -> None:
    """One ``[C, H, W]`` image in [0, 1] on ``ax``, without ticks."""
    if image_chw.shape[0] == 1:
        ax.imshow(image_chw[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image_chw.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
