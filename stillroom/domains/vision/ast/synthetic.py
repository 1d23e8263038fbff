"""The distilled set: ``ipc`` learnable images per class with fixed labels, and the learnable student lr.

:class:`SyntheticSet` is the player's model: the loop trains and checkpoints its parameters (``images``
``[K, C, H, W]``, ``K = ipc * classes``, class-major; ``lr`` a scalar) and its buffer ``labels`` ``[K]``.
Initialisations (:func:`initial_images`): ``real`` random real images of each class (MTT), ``representative``
the real images nearest the k-means centroids (k = ipc) of a trained expert's logits of each class (AST's
intended version; the released code's 10 clusters would give no image at ipc = 1), ``noise``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from stillroom.data.seeds import derive_seed


class SyntheticSet(nn.Module):
    """``images`` ``[K, C, H, W]`` (standardised pixels), ``lr`` ``[]`` and ``labels`` ``[K]`` int64 (a buffer)."""

    def __init__(self, images_kchw: torch.Tensor, labels_k: torch.Tensor, lr: float):
        super().__init__()
        self.images = nn.Parameter(images_kchw.detach().clone().float())
        self.lr = nn.Parameter(torch.tensor(float(lr)))
        self.register_buffer("labels", labels_k.detach().clone().long())


def class_labels(ipc: int, num_classes: int) -> torch.Tensor:
    """``[ipc * classes]``: ``ipc`` copies of class 0, then of class 1, ..."""
    return torch.arange(num_classes).repeat_interleave(ipc)


def initial_images(kind: str, ipc: int, train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *,
                   seed: int, expert: tuple[nn.Module, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """``[ipc * classes, C, H, W]`` initial images, class-major (see the module docstring). ``expert``:
    ``(architecture, trained parameters)``, needed by ``representative``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "ast-init"))
    if kind == "noise":
        return torch.randn((ipc * num_classes, *train_x.shape[1:]), generator=gen)
    out = []
    for c in range(num_classes):
        pool = train_x[train_y == c]
        if len(pool) < ipc:
            raise ValueError(f"ast.ipc={ipc}, but class {c} has only {len(pool)} training images; lower ast.ipc")
        if kind == "real":
            out.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]])
        else:
            if expert is None:
                raise ValueError("ast.init=representative needs a trained expert")
            with torch.no_grad():
                logits = functional_call(expert[0], expert[1], (pool,))
            out.append(pool[representative_indices(logits, ipc, seed=derive_seed(seed, "ast-kmeans", c))])
    return torch.cat(out)


def representative_indices(features_nd: torch.Tensor, k: int, *, seed: int) -> torch.Tensor:
    """``[k]`` distinct row indices of ``features_nd`` ``[N, D]``: the row nearest each k-means centroid (a
    centroid whose nearest row is taken already gets the nearest row not yet taken)."""
    from sklearn.cluster import KMeans

    x = features_nd.detach().double().numpy()
    km = KMeans(n_clusters=k, n_init=10, random_state=seed % (2**31)).fit(x)
    chosen: list[int] = []
    for centre in km.cluster_centers_:
        dist = np.linalg.norm(x - centre, axis=1)
        dist[chosen] = np.inf
        chosen.append(int(dist.argmin()))
    return torch.tensor(chosen, dtype=torch.long)
