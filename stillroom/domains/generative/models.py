"""Denoisers: the networks of the generative domain, and their folders.

Every generative model is a :class:`Denoiser`: ``forward(x_t, t_b, labels_b) -> x0_hat`` with ``x_t``'s
shape, ``t_b [B]`` in its :class:`~.conventions.Convention`'s units, ``labels_b [B]`` int64 class ids where
``label == num_classes`` is the null (unconditional) label classifier-free guidance reads. A one-step student
is a denoiser evaluated once at pure noise (:func:`~.sampling.generate`), so teacher, student, fake-score
critic and baseline share one class and one folder format.

Kinds (:data:`DENOISER_KINDS`): ``mlp`` (:class:`MlpDenoiser`, for the point toys: time and class
embeddings concatenated to the input, SiLU blocks) and, registered by :mod:`.unet`, ``unet`` (diffusers'
``UNet2DModel``, for images). A folder holds ``denoiser.json`` (kind, convention, architecture, classes)
and the weights as safetensors; it is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.domains.generative.conventions import Convention, sinusoidal
from stillroom.domains.generative.denoiser import Denoiser
from stillroom.domains.generative.unet import UNetDenoiser
from stillroom.domains.generative.twinflow_model import TwinFlowDenoiser
from stillroom.domains.generative.routed import with_routed

DENOISER_FILE = "denoiser.json"


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


DENOISER_KINDS: dict[str, Any] = with_routed({"mlp": MlpDenoiser, "unet": UNetDenoiser, "twinflow": TwinFlowDenoiser})
"""Denoiser classes by ``denoiser.json``'s ``kind``; each has ``from_json(arch, num_classes, convention)``,
``save_weights(folder)`` and ``load_weights(folder)``."""


def write_denoiser_files(model: Denoiser, folder: Path, extra: dict | None = None) -> None:
    """``denoiser.json`` and the weights into the existing ``folder`` (not atomic: see :func:`save_denoiser`);
    ``extra`` keys are added to ``denoiser.json`` (how it was trained)."""
    info = {"kind": model.kind, "convention": model.convention.to_json(), "num_classes": model.num_classes,
            "arch": model.arch_json(), **(extra or {})}
    model.save_weights(folder)
    (folder / DENOISER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


def save_denoiser(model: Denoiser, folder: Path, extra: dict | None = None) -> None:
    """``model`` as a folder, written into a temporary folder beside it and renamed into place."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_denoiser_files(model, tmp, extra)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def read_denoiser_info(folder: Path, where: str) -> dict:
    """``denoiser.json`` of ``folder``, refused with a message naming ``where`` when it is missing."""
    path = Path(folder).expanduser() / DENOISER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {folder} is not a denoiser folder (no {DENOISER_FILE}); give a folder a "
                                "generative run wrote (its teacher cache folder, or a run's student/)")
    return json.loads(path.read_text())


def load_denoiser(folder: Path, where: str = "denoiser folder") -> Denoiser:
    """The denoiser :func:`save_denoiser` wrote (train mode, CPU)."""
    folder = Path(folder).expanduser()
    info = read_denoiser_info(folder, where)
    kinds = DENOISER_KINDS
    if info.get("kind") not in kinds:
        raise ValueError(f"{where}: {folder / DENOISER_FILE} has kind {info.get('kind')!r}; known: {', '.join(kinds)}")
    convention = Convention.from_json(info["convention"], f"{folder / DENOISER_FILE}: convention")
    model = kinds[info["kind"]].from_json(info["arch"], info["num_classes"], convention)
    model.load_weights(folder)
    return model


def build_denoiser(kind: str, arch: dict, *, num_classes: int, convention: Convention, seed: int) -> Denoiser:
    """A fresh denoiser of ``kind`` with weights drawn from ``seed`` (the global RNG is left as it was)."""
    kinds = DENOISER_KINDS
    if kind not in kinds:
        raise ValueError(f"unknown denoiser kind {kind!r}; known: {', '.join(kinds)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return kinds[kind].from_json(arch, num_classes, convention)


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with gradients off (a teacher)."""
    return model.eval().requires_grad_(False)

