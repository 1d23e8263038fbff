"""A CoDSA transfer set on disk, and a classifier run's training images with it added.

``stillroom codsa-data`` (:mod:`stillroom.datagen.codsa`) writes, in ``codsa.out``:

* ``transfer_set.safetensors``: ``images [M, C, H, W]`` float32 in [0, 1], ``labels [M]`` int64 (the hard label
  ``codsa.label`` chose), ``condition [M]`` int64 (the class the generator was conditioned on),
  ``teacher_logprobs [M, K]`` float32 (the teacher's log-probabilities: the soft labels);
* ``manifest.json``: the policy, volume, generator settings and seed, the allocation per class, the data's and the
  teacher's fingerprints and the file's SHA-256.

A classifier run with ``codsa.add_to_training`` reads it after its teacher is built (:func:`with_transfer_set`)
and refuses, before step 0, a set made for other settings, other data or another teacher. The synthetic
images are appended to the training images (uids ``codsa:<i>``); the CE baseline keeps the real ones alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stillroom.domains.vision.data import ImageExample, ImageSplits

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig

SET_FILE = "transfer_set.safetensors"
MANIFEST = "manifest.json"
FORMAT = "stillroom-codsa/1"
TENSORS = ("images", "labels", "condition", "teacher_logprobs")


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of the SHA-256 of the teacher's weights (names and values, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolved_seed(cfg: "RunConfig") -> int:
    """``codsa.seed``, or the run's seed."""
    return cfg.codsa.seed if cfg.codsa.seed is not None else cfg.seed


@dataclass
class AugmentedSplits(ImageSplits):
    """:class:`ImageSplits` whose ``train`` is the ``real_count`` real images, then the synthetic ones."""

    real_count: int = 0
    transfer_notes: list[str] = field(default_factory=list)

    @property
    def baseline_train(self) -> list[ImageExample]:
        """The CE baseline trains on the real images alone (plain supervised training, no synthesis)."""
        return self.train[: self.real_count]

    def notes(self) -> list[str]:
        return [*super().notes(), *self.transfer_notes]


def read_transfer_set(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, manifest)`` of the set in ``folder``, checked for completeness (a clear error otherwise)."""
    path, manifest_path = folder / SET_FILE, folder / MANIFEST
    if not manifest_path.is_file() or not path.is_file():
        raise FileNotFoundError(f"no CoDSA transfer set in {folder} (expected {SET_FILE} and {MANIFEST}): write it "
                                "with `stillroom codsa-data RECIPE` (same overrides), or set codsa.out")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("sha256") != file_sha256(path):
        raise ValueError(f"{path} does not match {manifest_path} (another format, or a set rewritten since): write "
                         "it again with `stillroom codsa-data RECIPE`")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): write it again") from None
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensors {missing}: write it again with `stillroom codsa-data RECIPE`")
    return tensors, manifest


def expected_manifest(cfg: "RunConfig", data: ImageSplits, teacher: torch.nn.Module) -> dict:
    """The manifest fields a set must carry to be used by this run (settings, seed, data, teacher)."""
    return {"settings": cfg.codsa.settings(), "seed": resolved_seed(cfg), "dataset": data.dataset.name,
            "data_fingerprint": data.dataset.fingerprint(), "teacher_fingerprint": teacher_fingerprint(teacher)}


def check_manifest(manifest: dict, expected: dict, folder: Path) -> None:
    """Refuse a set made for other settings, data or teacher, naming the first difference and the fix."""
    for key, want in expected.items():
        got = manifest.get(key)
        if got != want:
            if isinstance(want, dict) and isinstance(got, dict):
                diff = [k for k in want if got.get(k) != want[k]]
                what = ", ".join(f"codsa.{k}: set {got.get(k)!r}, run {want[k]!r}" for k in diff)
            else:
                what = f"{key}: set {got!r}, run {want!r}"
            raise ValueError(f"the CoDSA transfer set in {folder} was made for another run ({what}): write it again "
                             "with `stillroom codsa-data RECIPE` and this run's overrides, or point codsa.out at "
                             "the set made for it")


def with_transfer_set(data: ImageSplits, cfg: "RunConfig", teacher: torch.nn.Module,
                      log: Callable[[str], None]) -> AugmentedSplits:
    """``data`` with the run's transfer set appended to its training images (checked first)."""
    folder = cfg.codsa.folder(cfg)
    tensors, manifest = read_transfer_set(folder)
    check_manifest(manifest, expected_manifest(cfg, data, teacher), folder)
    images, labels = tensors["images"], tensors["labels"].tolist()
    if tuple(images.shape[1:]) != tuple(data.dataset.in_shape):
        raise ValueError(f"{folder / SET_FILE}: images of shape {tuple(images.shape[1:])}, the data's are "
                         f"{tuple(data.dataset.in_shape)}: write it again with `stillroom codsa-data RECIPE`")
    synthetic = [ImageExample(images[i], labels[i], f"codsa:{i}", labels[i]) for i in range(len(labels))]
    per_class = manifest["allocation"]
    notes = [f"data: + {len(synthetic)} synthetic training images (CoDSA, policy {manifest['settings']['policy']}, "
             f"{manifest['generator']}, seed {manifest['seed']}; per class {per_class}; labelled by the teacher, "
             f"hard label: {manifest['settings']['label']}) from {folder}; the baseline trains on the real images"]
    log(notes[0])
    return AugmentedSplits(data.dataset, data.train + synthetic, data.heldout, data.group_size,
                           {**data.stats, "synthetic_images": len(synthetic)}, data.shifted,
                           real_count=len(data.train), transfer_notes=notes)
