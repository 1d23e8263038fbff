"""The base class of every generative network, and the MLP denoiser of the point toys (:mod:`.models` has the
kinds and their folders)."""

from __future__ import annotations

import torch
from torch import nn

from pathlib import Path

from safetensors.torch import load_file, save_file

from stillroom.domains.generative.conventions import Convention, sinusoidal


class Denoiser(nn.Module):
    """Base of every generative network (see the module docstring)."""

    kind: str = ""
    convention: Convention
    num_classes: int

    def forward(self, x_t: torch.Tensor, t_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        out = self.raw(*self.convention.net_input(x_t, t_b), labels_b)
        return self.convention.x0_from_output(x_t, t_b, out)

    def raw(self, x_in: torch.Tensor, time_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """The network itself: scaled input and time feature (:meth:`Convention.net_input`) -> raw output."""
        raise NotImplementedError

    @property
    def null_label(self) -> int:
        return self.num_classes

    def arch_json(self) -> dict:
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (``[D]`` for points, ``[C, H, W]`` for images)."""
        raise NotImplementedError

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"{self.kind} denoiser ({n:,} params, {self.num_classes} classes, {self.convention.describe()})"


class MlpDenoiser(Denoiser):
    """``[B, D]`` points: ``[x_in, sin/cos(time), class embedding] -> width -> ... -> D`` with SiLU
    (spec 10.6: 4 x 128). The class table has ``num_classes + 1`` rows (the last is the null label)."""

    kind = "mlp"

    def __init__(self, *, dim: int, num_classes: int, convention: Convention, width: int = 128, depth: int = 4,
                 time_features: int = 32, class_features: int = 32):
        super().__init__()
        self.dim, self.num_classes, self.convention = dim, num_classes, convention
        self.width, self.depth = width, depth
        self.time_features, self.class_features = time_features, class_features
        self.class_table = nn.Embedding(num_classes + 1, class_features)
        layers: list[nn.Module] = [nn.Linear(dim + time_features + class_features, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, dim)

    def raw(self, x_in: torch.Tensor, time_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x_in, sinusoidal(time_b, self.time_features).to(x_in.dtype),
                              self.class_table(labels_b).to(x_in.dtype)], dim=-1)
        return self.head(self.body(features))

    def arch_json(self) -> dict:
        return {"dim": self.dim, "width": self.width, "depth": self.depth, "time_features": self.time_features,
                "class_features": self.class_features}

    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @classmethod
    def from_json(cls, arch: dict, num_classes: int, convention: Convention) -> "MlpDenoiser":
        return cls(num_classes=num_classes, convention=convention, **arch)

    def save_weights(self, folder: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    def load_weights(self, folder: Path) -> None:
        self.load_state_dict(load_file(str(folder / "model.safetensors")))
