"""The base class of every generative network (:mod:`.models` has the kinds and their folders)."""

from __future__ import annotations

import torch
from torch import nn

from stillroom.domains.generative.conventions import Convention


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
