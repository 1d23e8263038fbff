"""Image classifiers built from config, saved as ``model.safetensors`` + ``config.json``.

A :class:`Classifier` maps images ``[B, C, H, W]`` to logits ``[B, num_classes]``; its layers are an
``nn.Sequential`` built from a :class:`~stillroom.config.domains.ClassifierArch` (an MLP or a small
CNN). A saved folder holds the weights (safetensors, never pickle) and ``config.json``
(``{"format", "arch", "in_shape", "num_classes", "classes", ...}``): enough to rebuild the module with
plain torch and load the weights, with or without stillroom. The transformers kinds (``vit``, ``resnet``,
``convnext``, ``mobilevit``) are :class:`~.hf_models.HFClassifier` objects saved as Hugging Face folders
(:mod:`.hf_models`); :func:`build_classifier`, :func:`save_classifier` and :func:`load_classifier` take
either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.hf_models import (
    HF_FORMAT, HF_KINDS, HFClassifier, build_hf_classifier, check_fits, load_hf_classifier, write_hf_classifier_files,
)
from stillroom.files import write_folder_atomic

FORMAT = "stillroom-classifier/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class Classifier(nn.Module):
    """``layers``: images ``[B, C, H, W]`` float -> logits ``[B, num_classes]``."""

    def __init__(self, arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.arch = arch
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.layers = _mlp(arch, in_shape, num_classes) if arch.kind == "mlp" else _cnn(arch, in_shape, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        return self.layers(images)

    def describe(self) -> str:
        """e.g. ``mlp [256, 256] (85.1K params)``."""
        widths = self.arch.hidden if self.arch.kind == "mlp" else self.arch.channels
        n = sum(p.numel() for p in self.parameters())
        return f"{self.arch.kind} {widths} ({n:,} params)"


def _mlp(arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Flatten; Linear + ReLU (+ Dropout) per hidden width; Linear to the classes."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_shape[0] * in_shape[1] * in_shape[2]
    for h in arch.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if arch.dropout:
            layers.append(nn.Dropout(arch.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Per channel entry: 3x3 Conv2d (padding 1) + ReLU, then 2x2 max-pooling while the map is larger than
    2x2 (8x8 -> 4x4 -> 2x2); flatten (+ Dropout); Linear to the classes."""
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for out in arch.channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        c = out
        if h > 2 and w > 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    layers.append(nn.Flatten())
    if arch.dropout:
        layers.append(nn.Dropout(arch.dropout))
    layers.append(nn.Linear(c * h * w, num_classes))
    return nn.Sequential(*layers)


AnyClassifier = Classifier | HFClassifier
"""Images ``[B, C, H, W]`` in ``[0, 1]`` -> logits ``[B, num_classes]``; ``arch``, ``in_shape``,
``num_classes`` and ``describe()`` alike."""


def build_classifier(arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int, *,
                     seed: int, where: str = "classifier.student") -> AnyClassifier:
    """A new classifier initialised from ``seed`` (the global RNG is left as it was). An architecture that
    cannot take ``in_shape`` images is refused naming the setting ``<where>.<field>``."""
    check_fits(arch, in_shape, where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch.kind in HF_KINDS:
            return build_hf_classifier(arch, in_shape, num_classes)
        return Classifier(arch, in_shape, num_classes)


def save_classifier(model: AnyClassifier, folder: Path, *, extra: dict | None = None) -> None:
    """Write ``model`` as ``folder/{model.safetensors, config.json}``: into a temporary folder beside it, then
    renamed into place (a reader never sees half a folder). ``extra``: more ``config.json`` fields (e.g. class names)."""
    write_folder_atomic(folder, lambda tmp: write_classifier_files(model, tmp, extra=extra))


def write_classifier_files(model: AnyClassifier, folder: Path, *, extra: dict | None = None) -> None:
    """``model.safetensors`` + ``config.json`` of ``model`` into the existing ``folder``, fsynced (a Hugging
    Face folder for the transformers kinds)."""
    folder = Path(folder)
    if isinstance(model, HFClassifier):
        write_hf_classifier_files(model, folder, arch_fields=arch_json(model.arch), extra=extra)
        return
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "arch": arch_json(model.arch), "in_shape": list(model.in_shape),
              "num_classes": model.num_classes, "layers": "torch.nn.Sequential (see stillroom.domains.vision.models)",
              **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name in (WEIGHTS, CONFIG):
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())


def arch_json(arch: ClassifierArch) -> dict:
    """``arch`` as JSON: its kind and the fields that kind uses, defaults filled in (so a field left at its
    default and the same value given explicitly make one teacher cache key; mlp and cnn give the keys they
    always gave)."""
    return arch.own_fields()


def read_config(folder: Path) -> dict:
    """The ``config.json`` of a saved classifier folder (checked to be one): a plain-torch one (``format``
    :data:`FORMAT`) or a Hugging Face one (its ``stillroom`` entry has ``format`` :data:`HF_FORMAT`)."""
    path = Path(folder) / CONFIG
    if not path.is_file() or not (Path(folder) / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a saved classifier: it needs {CONFIG} and {WEIGHTS}")
    config = json.loads(path.read_text())
    hf = config.get("stillroom") if isinstance(config.get("stillroom"), dict) else {}
    if config.get("format") != FORMAT and hf.get("format") != HF_FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r} is not {FORMAT!r} and it has no `stillroom` "
                         f"entry of format {HF_FORMAT!r} (not a stillroom classifier)")
    return config


def load_classifier(folder: Path) -> AnyClassifier:
    """The classifier :func:`save_classifier` wrote in ``folder`` (float32, CPU, eval mode)."""
    config = read_config(folder)
    if config.get("format") != FORMAT:
        return load_hf_classifier(Path(folder), config["stillroom"])
    model = Classifier(ClassifierArch.model_validate(config["arch"]), tuple(config["in_shape"]),
                       int(config["num_classes"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model.eval()
