"""Image data of the classifier domain: a data set -> examples -> the held-out split -> batches.

A data set is an :class:`~.datasets.ImageSet` from :data:`~.datasets.DATASETS` (``images [N, C, H, W]``
float32 in [0, 1], ``labels [N]`` int64, class names). Each image becomes an :class:`ImageExample` with the
stable uid ``<dataset>:<index>``. A data set with held-out images of its own (MNIST's test set, generated
shapes: ``ImageSet.heldout``) keeps them; otherwise (digits) the held-out split is decided by the hash of
the uid (:func:`stillroom.data.records.split_position`, as the language-model pipeline splits records).
Either way it is the same for every seed, and the same for a teacher trained here and the students after
it. ``classifier.train_images_per_class`` / ``heldout_images_per_class`` then keep the first N of each
class of either split.

:func:`collate_images` turns examples into an :class:`ImageBatch`, the batch contract the training
loop and :class:`~stillroom.train.loop.DistillObjective` read: a classifier has one target per
image, so ``target_ids``, ``loss_mask`` and ``target_weight`` are ``[B, 1]`` and ``num_targets`` is ``B``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.data.records import split_position
from stillroom.domains.vision.class_groups import describe_groups, group_classes
from stillroom.domains.vision.datasets import DATASETS, ImageSet, first_per_class, load_dataset  # noqa: F401


@dataclass
class ImageExample:
    """One image: ``image`` ``[C, H, W]`` float32, its class ``label`` and a stable ``uid``; ``fine_label``: its
    class before ``classifier.class_groups`` grouped the classes (``label`` when they are not grouped)."""

    image: torch.Tensor
    label: int
    uid: str
    fine_label: int | None = None


@dataclass
class ImageBatch:
    """A micro-batch of images. ``inputs`` ``[B, C, H, W]`` float32; ``target_ids`` ``[B, 1]`` int64 (the
    labels); ``target_weight`` optional ``[B, 1]`` float (set by a method's ``weight_targets``); ``view_ids``
    optional ``[B]`` int64: which view of each image ``inputs`` holds (set by the training collate of
    :class:`~.views.TrainingViews`; a soft-label store is read at these views)."""

    inputs: torch.Tensor
    target_ids: torch.Tensor
    uids: list[str]
    target_weight: torch.Tensor | None = None
    view_ids: torch.Tensor | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[B, 1]`` bool, all True: every image's label counts."""
        return torch.ones_like(self.target_ids, dtype=torch.bool)

    @property
    def num_targets(self) -> int:
        """One target per image: ``B``."""
        return int(self.target_ids.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        """``[B]`` int64."""
        return self.target_ids[:, 0]

    def to(self, device: torch.device | str) -> "ImageBatch":
        return ImageBatch(self.inputs.to(device), self.target_ids.to(device), self.uids,
                          None if self.target_weight is None else self.target_weight.to(device), self.view_ids)


def collate_images(examples: list[ImageExample]) -> ImageBatch:
    """Stack ``examples`` into an :class:`ImageBatch` (``inputs [B, C, H, W]``, ``target_ids [B, 1]``)."""
    if not examples:
        raise ValueError("collate_images: empty list of examples")
    inputs = torch.stack([e.image for e in examples])
    targets = torch.tensor([[e.label] for e in examples], dtype=torch.long)
    return ImageBatch(inputs, targets, [e.uid for e in examples])


def batches(examples: list[ImageExample], batch_size: int) -> list[ImageBatch]:
    """``examples`` in order, in batches of at most ``batch_size``."""
    return [collate_images(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def uid_key(uid: str) -> str:
    """The hex SHA-256 of an example's uid (what :func:`split_position` reads)."""
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()


def is_heldout(uid: str, fraction: float) -> bool:
    """True when the image with ``uid`` falls in the held-out ``fraction`` (deterministic, seed-free)."""
    return split_position(uid_key(uid)) < fraction


@dataclass
class ImageSplits:
    """The splits of a classifier run, in the shape of :class:`~stillroom.data.pipeline.DataSplits`.

    The method's view and the plain view are the same images (``kd`` and ``sft`` do not re-encode
    data), so ``baseline_train is train`` and ``baseline_heldout is heldout``.
    """

    dataset: ImageSet
    """The images the run uses (only the kept ones where a per-class cap applies: the teacher's cache key)."""
    train: list[ImageExample]
    heldout: list[ImageExample]
    group_size: int = 1
    stats: dict = field(default_factory=dict)
    shifted: list[ImageExample] = field(default_factory=list)
    """A domain-shifted held-out set of the same classes (``shapes.shifted_per_class``); empty: none."""

    def notes(self) -> list[str]:
        """The report's lines about the data: sizes, how the held-out split was made, label noise."""
        s = self.stats
        how = {"hash": f"held out by the hash of each image's index (fraction {s.get('heldout_fraction')}, the same "
                       "for every seed)",
               "own": f"held out: {self.dataset.heldout_about or 'its own held-out images'}"}[s["split"]]
        lines = [f"data: {s['dataset']}, {s['train_images']} training / {s['heldout_images']} held-out images of "
                 f"shape {s['image_shape']}, {s['classes']} classes; {how}"]
        if s.get("per_class_caps"):
            train_cap, held_cap = (c if c is not None else "all" for c in s["per_class_caps"])
            if isinstance(train_cap, dict):  # an imbalanced split: only the named (minority) classes capped
                train_cap = "all (" + ", ".join(f"class {k}: {v}" for k, v in train_cap.items()) + ")"
            lines.append(f"data: the first {train_cap} training / {held_cap} held-out images of each class kept")
        if s.get("flipped_labels"):
            lines.append(f"data: label noise: {s['flipped_labels']} of {s['train_images']} training labels flipped "
                         "to another class (seeded); held-out labels are exact")
        if s.get("class_groups"):
            lines.append(s["class_groups"])
        if self.shifted:
            lines.append(f"data: a domain-shifted held-out set of {len(self.shifted)} images (other colours, "
                         "backgrounds and textures)")
        return lines

    @property
    def baseline_train(self) -> list[ImageExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[ImageExample]:
        return self.heldout


def build_image_splits(name: str, heldout_fraction: float, sec: ClassifierConfig | None = None, *,
                       cache_dir: str | None = None, run_seed: int = 0) -> ImageSplits:
    """Load data set ``name`` as ``sec`` describes it and split it (see the module docstring)."""
    sec = sec or ClassifierConfig(dataset=name)
    ds = load_dataset(name, sec, cache_dir=cache_dir, run_seed=run_seed)
    ds, fine_labels, fine_classes = group_classes(ds, sec.class_groups, sec.class_group_names)
    held_n = heldout_mask(ds, heldout_fraction)
    train_idx = first_per_class(ds.labels, (~held_n).nonzero().squeeze(1), sec.train_images_per_class)
    held_idx = first_per_class(ds.labels, held_n.nonzero().squeeze(1), sec.heldout_images_per_class)
    if not len(train_idx) or not len(held_idx):
        raise ValueError(f"classifier.heldout_fraction={heldout_fraction} leaves {len(train_idx)} training and "
                         f"{len(held_idx)} held-out images of {name!r}; choose a fraction that leaves both")
    train, heldout = _examples(ds, train_idx, fine_labels), _examples(ds, held_idx, fine_labels)
    split = "hash" if ds.heldout is None else "own"
    flipped = 0 if ds.flipped is None else int(ds.flipped[train_idx].sum())
    capped = sec.train_images_per_class is not None or sec.heldout_images_per_class is not None
    if capped:
        keep = torch.cat([train_idx, held_idx]).sort().values
        ds = replace(ds.select(keep), heldout=held_n[keep])
    shifted = [] if ds.shifted is None else _examples(ds.shifted, torch.arange(len(ds.shifted.labels)))
    stats = {"dataset": name, "images": len(ds.labels), "train_images": len(train), "heldout_images": len(heldout),
             "classes": ds.num_classes, "image_shape": list(ds.in_shape),
             "split": split, "heldout_fraction": heldout_fraction if split == "hash" else None,
             "per_class_caps": [sec.train_images_per_class, sec.heldout_images_per_class] if capped else None,
             "minority_classes": sorted(sec.train_images_per_class) if isinstance(sec.train_images_per_class, dict)
             else None,
             "flipped_labels": flipped, "shifted_images": len(shifted),
             "class_groups": None if sec.class_groups is None else
             describe_groups(sec.class_groups, fine_classes, ds.classes)}
    return ImageSplits(ds, train, heldout, stats=stats, shifted=shifted)


def heldout_mask(ds: ImageSet, heldout_fraction: float) -> torch.Tensor:
    """``[N]`` bool: the data set's own held-out images, else those whose uid hashes below ``heldout_fraction``."""
    if ds.heldout is not None:
        return ds.heldout
    return torch.tensor([is_heldout(f"{ds.name}:{i}", heldout_fraction) for i in range(len(ds.labels))])


def _examples(ds: ImageSet, indices: torch.Tensor, fine_labels: torch.Tensor | None = None) -> list[ImageExample]:
    """One :class:`ImageExample` per index of ``ds``, with the uid ``<name>:<index>`` (``fine_labels`` ``[N]``:
    the labels before grouping; ``None``: the labels)."""
    labels = ds.labels.tolist()
    fine = labels if fine_labels is None else fine_labels.tolist()
    return [ImageExample(ds.images[i], labels[i], f"{ds.name}:{i}", fine[i]) for i in indices.tolist()]


def check_teacher_fits(folder: Path, in_shape: tuple[int, ...], num_classes: int, ds: ImageSet) -> None:
    """Refuse, before any training, a teacher whose input shape ``(C, H, W)`` or class count is not the data's,
    naming the folder, both values and what to do."""
    fix = (f"point the teacher's `path` at a classifier trained on {ds.name!r}, or remove `path` to train one here "
           f"(or set classifier.dataset to the data set the teacher was trained on)")
    if tuple(in_shape) != tuple(ds.in_shape):
        what = "number of channels" if in_shape[0] != ds.in_shape[0] else "image size"
        raise ValueError(f"the teacher in {folder} takes images of shape (C, H, W) = {tuple(in_shape)}, but "
                         f"classifier.dataset={ds.name!r} has images of shape {tuple(ds.in_shape)} (the {what} "
                         f"differs): {fix}")
    if num_classes != ds.num_classes:
        raise ValueError(f"the teacher in {folder} predicts {num_classes} classes, but classifier.dataset="
                         f"{ds.name!r} has {ds.num_classes} ({', '.join(ds.classes)}): {fix}")
