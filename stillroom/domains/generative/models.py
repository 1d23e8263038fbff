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
from pathlib import Path
from typing import Any

import torch

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.denoiser import Denoiser, MlpDenoiser  # noqa: F401 (re-exported)
from stillroom.domains.generative.unet import UNetDenoiser
from stillroom.domains.generative.twinflow_model import TwinFlowDenoiser
from stillroom.domains.generative.routed import with_routed
from stillroom.files import write_folder_atomic

DENOISER_FILE = "denoiser.json"


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
    write_folder_atomic(folder, lambda tmp: write_denoiser_files(model, tmp, extra))


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
