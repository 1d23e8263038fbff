"""DHO's dual-head classifier: one backbone, a CE head and a KD head, mixed at inference.

The two linear heads are the two halves of the backbone classifier's last ``nn.Linear``, which has
``2 x C`` outputs: outputs ``0..C-1`` are the CE head ``z_ce = W_ce h + b_ce``, outputs ``C..2C-1`` the KD
head ``z_kd = W_kd h + b_kd`` (``h``: the input of that layer, the shared features). So any classifier
kind (plain torch, or a transformers ``*ForImageClassification``) is a dual-head student without a new
module, and its saved folder loads without stillroom: a Hugging Face student is an ordinary folder whose
model gives ``[B, 2C]`` logits. The deployed prediction is

    p(x) = alpha * softmax(z_ce(x)) + (1 - alpha) * softmax(z_kd(x) / beta)

with ``(alpha, beta)`` kept as buffers of :class:`DualHeadClassifier` (checkpointed with it) and written
into the saved ``config.json`` (``dual_head``; for a Hugging Face folder inside its ``stillroom`` entry).
:class:`DualHeadClassifier` returns ``log p`` ``[B, C]``: its softmax is the mixture, so every metric of the
report (accuracy, ECE, CE, KL to the teacher) measures the deployed mixture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stillroom.domains.vision.models import load_classifier, read_config, save_classifier

FORMAT = "stillroom-dual-head/1"


def mixture_log_probs(z_ce_bc: torch.Tensor, z_kd_bc: torch.Tensor, alpha: float | torch.Tensor,
                      beta: float | torch.Tensor) -> torch.Tensor:
    """``log(alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta))`` ``[B, C]`` fp32, computed as a
    logsumexp of the two heads' log-probabilities (exact at alpha 0 and 1, where one side is ``log 0``)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=z_ce_bc.device)
    log_ce = torch.log_softmax(z_ce_bc.float(), -1) + torch.log(alpha)
    log_kd = torch.log_softmax(z_kd_bc.float() / beta, -1) + torch.log1p(-alpha)
    return torch.logaddexp(log_ce, log_kd)


class DualHeadClassifier(nn.Module):
    """``backbone``: a classifier with ``2 x num_classes`` outputs (CE head first). ``forward`` -> the mixture's
    log-probabilities ``[B, C]``; :meth:`heads` -> ``(z_ce, z_kd)`` for training."""

    def __init__(self, backbone: nn.Module, alpha: float = 0.5, beta: float = 1.0):
        super().__init__()
        if backbone.num_classes % 2:
            raise ValueError(f"a dual-head classifier needs an even number of outputs (CE head, then KD head); "
                             f"{type(backbone).__name__} has {backbone.num_classes}")
        self.backbone = backbone
        self.num_classes = backbone.num_classes // 2
        self.arch, self.in_shape = getattr(backbone, "arch", None), getattr(backbone, "in_shape", None)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` ``[B, C_in, H, W]`` -> ``(z_ce [B, C], z_kd [B, C])``, one backbone forward."""
        logits = self.backbone(images)
        return logits[:, : self.num_classes], logits[:, self.num_classes :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z_ce, z_kd = self.heads(images)
        return mixture_log_probs(z_ce, z_kd, self.alpha, self.beta)

    def set_mixture(self, alpha: float, beta: float) -> None:
        self.alpha.fill_(float(alpha))
        self.beta.fill_(float(beta))

    def mixture(self) -> tuple[float, float]:
        return float(self.alpha), float(self.beta)

    def head_layer(self) -> nn.Linear:
        """The backbone's last ``nn.Linear`` with ``2C`` outputs: both heads (its input is the shared features)."""
        layers = [m for m in self.backbone.modules() if isinstance(m, nn.Linear) and m.out_features == 2 * self.num_classes]
        if not layers:
            raise ValueError(f"{type(self.backbone).__name__} has no Linear layer with {2 * self.num_classes} outputs "
                             "to serve as DHO's two heads")
        return layers[-1]

    def describe(self) -> str:
        alpha, beta = self.mixture()
        return f"{self.backbone.describe()}, two heads of {self.num_classes} (mixed at alpha {alpha:g}, beta {beta:g})"


def wants_dual_head(cfg) -> bool:
    """Whether the run's student is a dual-head classifier (``method: dho`` with ``dho.heads: dual``)."""
    return cfg.method == "dho" and cfg.dho is not None and cfg.dho.heads == "dual"


def head_names(classes: list[str]) -> list[str]:
    """The ``2C`` output names of a saved dual-head backbone: ``ce:<class>`` then ``kd:<class>``."""
    return [f"ce:{c}" for c in classes] + [f"kd:{c}" for c in classes]


def save_dual_head(model: DualHeadClassifier, folder: Path, classes: list[str]) -> None:
    """The backbone as an ordinary classifier folder of ``2C`` outputs (written atomically), its config recording
    the classes and the mixture (``dual_head``: format, alpha, beta, which outputs are which head)."""
    alpha, beta = model.mixture()
    c = model.num_classes
    save_classifier(model.backbone, folder, extra={
        "classes": head_names(classes),
        "dual_head": {"format": FORMAT, "alpha": alpha, "beta": beta, "classes": list(classes),
                      "ce_outputs": [0, c], "kd_outputs": [c, 2 * c],
                      "predict": "p = alpha softmax(logits[:, ce]) + (1 - alpha) softmax(logits[:, kd] / beta)"}})


def dual_head_settings(folder: Path) -> dict | None:
    """The ``dual_head`` entry of a saved classifier's config (``None``: not a dual-head student)."""
    config = read_config(folder)
    entry = (config.get("stillroom") or config).get("dual_head")
    if entry is not None and entry.get("format") != FORMAT:
        raise ValueError(f"{folder}/config.json: dual_head format {entry.get('format')!r} is not {FORMAT!r}")
    return entry


def load_dual_head(folder: Path) -> DualHeadClassifier:
    """The :class:`DualHeadClassifier` :func:`save_dual_head` wrote (CPU, eval mode)."""
    entry = dual_head_settings(folder)
    if entry is None:
        raise ValueError(f"{folder} is not a dual-head classifier (its config.json has no `dual_head` entry)")
    return DualHeadClassifier(load_classifier(folder), entry["alpha"], entry["beta"]).eval()
