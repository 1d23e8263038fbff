"""How good a small training set is: fresh networks trained on it, their test accuracy; and its picture.

:func:`set_accuracy` trains ``networks`` new networks (``classifier.student``'s architecture, each its own
seed) on a set of images for ``epochs`` epochs (SGD, momentum 0.9, weight decay 5e-4, the lr halved at half
way, the whole set per step up to 256 images, reshuffled per epoch; MTT's evaluation without augmentation),
and returns each one's accuracy on the held-out images. The distilled set trains at its learned lr, the
random real subset it is compared with at the experts' lr (the learned lr's starting value).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from stillroom.config.domains import ClassifierArch
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.models import build_classifier

EVAL_BATCH = 256


def train_fresh(arch: ClassifierArch, images_kchw: torch.Tensor, labels_k: torch.Tensor, *, num_classes: int,
                lr: float, epochs: int, seed: int) -> torch.nn.Module:
    """A new network of ``arch`` (weights from ``seed``) trained on ``images_kchw`` ``[K, C, H, W]``."""
    model = build_classifier(arch, tuple(images_kchw.shape[1:]), num_classes, seed=seed, where="classifier.student")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(derive_seed(seed, "ast-eval-order"))
    images_kchw, labels_k = images_kchw.detach(), labels_k.detach()
    for epoch in range(epochs):
        if epoch == epochs // 2:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        perm = torch.randperm(len(labels_k), generator=gen)
        for start in range(0, len(perm), EVAL_BATCH):
            idx = perm[start : start + EVAL_BATCH]
            loss = F.cross_entropy(model(images_kchw[idx]), labels_k[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    return float((model(test_x).argmax(-1) == test_y).float().mean())


def set_accuracy(arch: ClassifierArch, images_kchw: torch.Tensor, labels_k: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, num_classes: int, lr: float, epochs: int, networks: int,
                 seed: int) -> list[float]:
    """Held-out accuracy of each of ``networks`` fresh networks trained on the set (see the module docstring)."""
    return [accuracy(train_fresh(arch, images_kchw, labels_k, num_classes=num_classes, lr=lr, epochs=epochs,
                                 seed=derive_seed(seed, "ast-eval-net", j)), test_x, test_y)
            for j in range(networks)]


def random_subset(train_x: torch.Tensor, train_y: torch.Tensor, ipc: int, num_classes: int, *, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real images per class, class-major: ``([ipc * classes, C, H, W], [ipc * classes])``."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "ast-random-subset"))
    idx = torch.cat([torch.nonzero(train_y == c)[:, 0][torch.randperm(int((train_y == c).sum()), generator=gen)[:ipc]]
                     for c in range(num_classes)])
    return train_x[idx], train_y[idx]


def image_grid(path: Path, pixels_kchw: torch.Tensor, labels_k: torch.Tensor, title: str) -> None:
    """A PNG with one row per class and one column per image of that class (grey or RGB), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels_k.tolist()))
    per_class = [torch.nonzero(labels_k == c)[:, 0] for c in classes]
    cols = max(len(p) for p in per_class)
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.1 * cols + 0.6, 1.1 * len(classes) + 0.5), squeeze=False)
    for r, (c, idx) in enumerate(zip(classes, per_class)):
        for j in range(cols):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                img = pixels_kchw[idx[j]].detach().cpu()
                ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(str(c), fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
