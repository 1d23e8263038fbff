"""The ``unet`` denoiser kind: diffusers' class-conditional ``UNet2DModel`` for images ``[B, C, H, W]`` in [-1, 1].

The network is a plain ``UNet2DModel`` with ``num_class_embeds = num_classes + 1`` (the last row is the null
label classifier-free guidance reads; ``class_embed_type=None``: the class embedding is added to the time
embedding). It computes the convention's raw output (EDM's ``F``, a flow's velocity) from the scaled input and
the time feature of :meth:`~.conventions.Convention.net_input`; the time feature is multiplied by
``time_scale`` (1000) before diffusers' sinusoidal projection, whose frequencies are made for DDPM's integer
timesteps 0 .. 1000 (a feature in [0, 1] would only see its lowest frequencies).

A folder is a normal diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` from
``save_pretrained``) plus stillroom's ``denoiser.json`` next to it, so ``UNet2DModel.from_pretrained(folder)``
loads the network with no stillroom code (the caller then applies the convention's preconditioning).

diffusers is an optional dependency (``pip install "stillroom[generative]"``): it is imported when a UNet is
built, not when this module is imported, so the registry entry exists without it and a missing install is a
clear error instead of an unknown kind.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.denoiser import Denoiser

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_WHERE = "generative.teacher.arch"
ARCH_DEFAULTS: dict[str, Any] = {"channels": [32, 64], "layers_per_block": 1, "norm_num_groups": None,
                                 "attention": False, "time_scale": 1000.0}
"""Architecture fields and their defaults; ``sample_shape`` ``[C, H, W]`` comes from the data."""


def unet_arch(*, sample_shape: list[int] | tuple[int, ...], where: str = DEFAULT_WHERE, **fields: Any) -> dict:
    """The full ``arch`` dict of a UNet for images of ``sample_shape`` ``[C, H, W]``: :data:`ARCH_DEFAULTS`
    overridden by ``fields`` (e.g. ``channels=[32, 64]``, ``layers_per_block=1``), with ``norm_num_groups``
    resolved. Checked (:func:`check_unet_arch`, errors name ``where``); 8x8 digits and 28x28 MNIST both fit
    the defaults (one down-sampling: 8 -> 4, 28 -> 14)."""
    unknown = set(fields) - set(ARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown unet fields {sorted(unknown)}; known: sample_shape, "
                         f"{', '.join(ARCH_DEFAULTS)}")
    if len(sample_shape) != 3:
        raise ValueError(f"{where}: a unet takes images [C, H, W]; sample_shape {list(sample_shape)} is not one")
    arch = {**ARCH_DEFAULTS, **fields, "sample_shape": [int(n) for n in sample_shape]}
    arch["channels"] = [int(c) for c in arch["channels"]]
    if arch["norm_num_groups"] is None:
        arch["norm_num_groups"] = default_norm_groups(arch["channels"])
    check_unet_arch(arch, where)
    return arch


def default_norm_groups(channels: list[int]) -> int:
    """The largest of 8, 4, 2, 1 that divides every level's channel count (GroupNorm needs it to)."""
    common = math.gcd(*channels) if channels else 1
    return next(g for g in (8, 4, 2, 1) if common % g == 0)


def check_unet_arch(arch: dict, where: str = DEFAULT_WHERE) -> None:
    """Refuse, naming ``where``, an architecture ``UNet2DModel`` cannot build or cannot run on its image size:
    every down-sampling halves the map, so the side must be divisible by ``2**(levels - 1)``; GroupNorm needs
    ``norm_num_groups`` to divide every level's channels."""
    channels, groups = arch["channels"], arch["norm_num_groups"]
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"{where}: channels must be a non-empty list of positive widths (got {channels})")
    if any(n < 1 for n in arch["sample_shape"]):
        raise ValueError(f"{where}: image shape [C, H, W] must be positive (got {arch['sample_shape']})")
    levels = len(channels)
    factor = 2 ** (levels - 1)
    for size in dict.fromkeys(arch["sample_shape"][1:]):  # H, then W when it differs
        if size % factor:
            fits = max(n for n in range(1, levels + 1) if size % 2 ** (n - 1) == 0)
            raise ValueError(f"{where}: image size {size} is not divisible by 2**(levels-1)={factor} (channels "
                             f"{channels} has {levels} levels); use at most {fits} levels (channels with {fits} "
                             f"entries or fewer) or an image size divisible by {factor}")
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{where}: norm_num_groups {groups} does not divide channels {bad}; use "
                         f"{default_norm_groups(channels)} (divides all of {channels}) or other channel counts")


def unet2d_class() -> Any:
    """``diffusers.UNet2DModel``, or an ImportError that says how to install it."""
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        raise ImportError('the unet denoiser needs diffusers: pip install "stillroom[generative]" '
                          f"(diffusers==0.42.1); importing it failed: {exc}") from exc
    return UNet2DModel


def unet2d_config(arch: dict, num_classes: int) -> dict:
    """The ``UNet2DModel`` constructor arguments of ``arch`` (plain ResNet levels; with ``attention``, a
    self-attention layer in the middle block at the lowest resolution)."""
    levels = len(arch["channels"])
    c, h, w = arch["sample_shape"]
    return {"sample_size": h if h == w else (h, w), "in_channels": c, "out_channels": c,
            "block_out_channels": tuple(arch["channels"]),
            "layers_per_block": arch["layers_per_block"], "norm_num_groups": arch["norm_num_groups"],
            "down_block_types": ("DownBlock2D",) * levels, "up_block_types": ("UpBlock2D",) * levels,
            "add_attention": bool(arch["attention"]), "attention_head_dim": 8,
            "num_class_embeds": num_classes + 1, "class_embed_type": None}


class UNetDenoiser(Denoiser):
    """Images ``[B, C, H, W]`` in [-1, 1] -> ``x0_hat`` of the same shape, through ``self.unet``
    (diffusers ``UNet2DModel``; see the module docstring)."""

    kind = "unet"

    def __init__(self, *, arch: dict, num_classes: int, convention: Convention, where: str = DEFAULT_WHERE):
        super().__init__()
        check_unet_arch(arch, where)
        self.arch, self.num_classes, self.convention = dict(arch), num_classes, convention
        self.unet = unet2d_class()(**unet2d_config(arch, num_classes))

    def raw(self, x_in: torch.Tensor, time_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """Scaled input ``[B, C, H, W]``, time feature ``[B]``, labels ``[B]`` (``num_classes``: null) -> the
        convention's raw output ``[B, C, H, W]``."""
        if tuple(x_in.shape[1:]) != self.sample_shape():
            raise ValueError(f"unet denoiser: built for images {list(self.sample_shape())} (C, H, W), got a batch "
                             f"of {list(x_in.shape)}; use data of the size the model was trained on")
        time_b = time_b.float() * self.arch["time_scale"]  # fp32: x1000 in bf16 would round the time away
        return self.unet(x_in, time_b, class_labels=labels_b).sample

    def arch_json(self) -> dict:
        return dict(self.arch)

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.arch["sample_shape"])

    @classmethod
    def from_json(cls, arch: dict, num_classes: int, convention: Convention) -> "UNetDenoiser":
        """From ``denoiser.json``'s ``arch`` (a partial one, e.g. ``{channels, layers_per_block, sample_shape}``,
        is completed by :func:`unet_arch`)."""
        if "sample_shape" not in arch:
            raise ValueError(f"unet arch {arch}: missing sample_shape (the data's [C, H, W])")
        fields = {k: v for k, v in arch.items() if k != "sample_shape"}
        full = unet_arch(sample_shape=arch["sample_shape"], **fields)
        return cls(arch=full, num_classes=num_classes, convention=convention)

    def save_weights(self, folder: Path) -> None:
        """A diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
        self.unet.save_pretrained(str(folder), safe_serialization=True)

    def load_weights(self, folder: Path) -> None:
        path = Path(folder) / DIFFUSERS_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: a unet denoiser folder needs {DIFFUSERS_WEIGHTS} (written by "
                                    "UNet2DModel.save_pretrained); the folder is incomplete")
        self.unet.load_state_dict(load_file(str(path)))


