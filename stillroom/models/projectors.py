"""Projectors: learned adapters from a student's feature width to its teacher's, built by one factory.

:func:`build_projector` maps features ``[..., d_s] -> [..., d_t]`` (the last dimension):

* ``linear``: ``nn.Linear(d_s, d_t)`` (FitNets' regressor, DMAE's ``fc-1layer``, the language side's
  hidden-state terms, which use ``bias=False``);
* ``mlp1``: Linear(d_s, d_t) - GELU - Linear(d_t, d_t): one hidden layer of the teacher's width
  (DMAE's ``mlp-1layer``);
* ``mlp2``: Linear(d_s, d_t) - GELU - Linear(d_t, d_t) - GELU - Linear(d_t, d_t): two hidden layers.

Every layer starts from PyTorch's default ``nn.Linear`` initialisation. :class:`MapProjector` applies one
to conv feature maps ``[B, C_s, H_s, W_s]``: the student's map is first resized to the teacher's
``(H_t, W_t)`` when they differ (bilinear, ``align_corners=False``; it averages when shrinking only
through the interpolation weights), then projected over channels at every position (channel-last:
for ``linear`` this is exactly a 1x1 convolution), giving ``[B, C_t, H_t, W_t]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_KINDS = ("linear", "mlp1", "mlp2")


def build_projector(kind: str, in_dim: int, out_dim: int, *, bias: bool = True) -> nn.Module:
    """A ``kind`` projector ``[..., in_dim] -> [..., out_dim]`` (see the module docstring). ``linear`` is a
    bare ``nn.Linear`` (parameter names ``weight`` / ``bias``), the MLPs ``nn.Sequential`` modules."""
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"projector kind {kind!r} is not one of {', '.join(PROJECTOR_KINDS)}")
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"projector widths must be >= 1 (got {in_dim} -> {out_dim})")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    hidden_layers = 1 if kind == "mlp1" else 2
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(hidden_layers):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)


class MapProjector(nn.Module):
    """Conv feature maps ``[B, C_s, H_s, W_s]`` -> ``[B, C_t, H_t, W_t]``: resized to the teacher's size when
    it differs, then a :func:`build_projector` over channels at every position."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, *, bias: bool = True):
        super().__init__()
        self.proj = build_projector(kind, in_channels, out_channels, bias=bias)

    def forward(self, maps_bchw: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``maps_bchw`` ``[B, C_s, H_s, W_s]``; ``size``: the teacher's ``(H_t, W_t)`` (None: keep the size)."""
        if maps_bchw.dim() != 4:
            raise ValueError(f"MapProjector takes maps [B, C, H, W], got shape {tuple(maps_bchw.shape)}")
        if size is not None and tuple(size) != tuple(maps_bchw.shape[-2:]):
            maps_bchw = F.interpolate(maps_bchw, size=tuple(size), mode="bilinear", align_corners=False)
        return self.proj(maps_bchw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
