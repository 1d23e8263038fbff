"""Image-caption data of the ``clip`` domain: built-in sets and caption folders -> examples -> batches.

Every image becomes a :class:`ClipExample`: ``image`` ``[3, S, S]`` float32 in [0, 1] (grey images made RGB,
resized bilinearly to ``clip.image_size``), its caption, a stable uid, its data set and class (``-1`` where the
set has no classes). Captions: scenes keep their exact captions; a class set's image ``i`` gets
``templates[i % T]`` filled with its class phrase (:func:`class_phrases`: "the digit three", "a circle");
a caption folder's records carry their own (a record without one is refused, naming the file and line).
The held-out splits are the classifier domain's (:func:`~stillroom.domains.vision.data.build_image_splits`)
and, for scenes, a separately generated set; caption folders split by the hash of the record id.

Every distinct caption gets an id in :attr:`ClipSplits.captions`; batches carry ``caption_ids`` so a frozen
text tower's features can be computed once per caption (:mod:`.clip_train`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.config.clip import ClipConfig
from stillroom.config.domains import ClassifierConfig
from stillroom.config.shapes import ShapesConfig

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class ClipExample:
    image: torch.Tensor
    """``[3, S, S]`` float32 in [0, 1]."""
    caption: str
    uid: str
    dataset: str
    label: int = -1
    caption_id: int = -1


@dataclass
class ClipBatch:
    """``inputs`` ``[B, 3, S, S]``; ``caption_ids`` ``[B]`` int64 (rows of the run's caption table); ``labels``
    ``[B]`` int64 (class, -1 where none). One target per image: ``num_targets`` is ``B``."""

    inputs: torch.Tensor
    captions: list[str]
    caption_ids: torch.Tensor
    labels: torch.Tensor
    uids: list[str]
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> "ClipBatch":
        return ClipBatch(self.inputs.to(device), self.captions, self.caption_ids.to(device), self.labels.to(device),
                         self.uids, None if self.target_weight is None else self.target_weight.to(device))


def collate_clip(examples: list[ClipExample]) -> ClipBatch:
    if not examples:
        raise ValueError("collate_clip: empty list of examples")
    return ClipBatch(torch.stack([e.image for e in examples]), [e.caption for e in examples],
                     torch.tensor([e.caption_id for e in examples], dtype=torch.long),
                     torch.tensor([e.label for e in examples], dtype=torch.long), [e.uid for e in examples])


@dataclass
class EvalSet:
    """One data set's held-out examples; ``classes``/``phrases`` for zero-shot classification (``None``: scenes
    and caption folders, measured by retrieval only)."""

    name: str
    examples: list[ClipExample]
    classes: list[str] | None = None
    phrases: list[str] | None = None


@dataclass
class ClipSplits:
    """``train`` / ``heldout`` (all sets), ``sets`` (held-out per data set), ``captions`` (the caption table)."""

    train: list[ClipExample]
    heldout: list[ClipExample]
    sets: dict[str, EvalSet]
    captions: list[str]
    train_sets: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    """Class data sets: ``name -> (class names, phrases)``."""
    stats: dict = field(default_factory=dict)
    group_size: int = 1

    @property
    def baseline_train(self) -> list[ClipExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[ClipExample]:
        return self.heldout

    def notes(self) -> list[str]:
        per = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in self.stats["per_set"].items())
        return [f"data: {len(self.train)} training / {len(self.heldout)} held-out image-caption pairs "
                f"(training/held-out per set: {per}); {len(self.captions)} distinct captions"]


def class_phrases(dataset: str, classes: list[str], overrides: dict[str, dict[str, str]]) -> list[str]:
    """One phrase per class of ``dataset`` (``clip.class_prompts[dataset]`` where given: it must cover every class)."""
    if dataset in overrides:
        given = overrides[dataset]
        missing = [c for c in classes if not given.get(c, "").strip()]
        if missing:
            raise ValueError(f"clip.class_prompts.{dataset} has no prompt for class(es) {missing} (the data set's "
                             f"classes: {classes}): give a phrase for every class")
        return [given[c] for c in classes]
    if dataset in ("digits", "mnist", "cluttered_digits") and all(c in "0123456789" and c for c in classes):
        return [f"the digit {DIGIT_WORDS[int(c)]}" for c in classes]
    return [f"{'an' if c[0] in 'aeiou' else 'a'} {c}" for c in classes]


def to_rgb(images_nchw: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` float32: grey made RGB, resized bilinearly (antialiased when shrinking)."""
    x = images_nchw.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return x.clamp(0, 1).contiguous()


def class_set(name: str, sec: ClipConfig, cache_dir: str | None, run_seed: int):
    """``(train, heldout, classes, phrases)`` of a class data set, captioned (see the module docstring)."""
    from stillroom.domains.vision.data import build_image_splits

    shapes = ShapesConfig(classes=sec.shape_classes, train_per_class=sec.shapes_per_class,
                          heldout_per_class=sec.heldout_per_class or 50)
    cap_train = None if name == "shapes" else sec.images_per_class
    csec = ClassifierConfig(dataset=name, train_images_per_class=cap_train,
                            heldout_images_per_class=sec.heldout_per_class,
                            **({"shapes": shapes} if name == "shapes" else {}),
                            **({"heldout_fraction": sec.heldout_fraction} if name == "digits" else {}))
    splits = build_image_splits(name, sec.heldout_fraction, csec, cache_dir=cache_dir, run_seed=run_seed)
    classes = splits.dataset.classes
    phrases = class_phrases(name, classes, sec.class_prompts)

    def convert(examples) -> list[ClipExample]:
        images = to_rgb(torch.stack([e.image for e in examples]), sec.image_size)
        return [ClipExample(images[i], sec.templates[i % len(sec.templates)].format(phrases[e.label]), e.uid, name,
                            e.label) for i, e in enumerate(examples)]

    return convert(splits.train), convert(splits.heldout), classes, phrases


def scene_sets(sec: ClipConfig, run_seed: int) -> tuple[list[ClipExample], list[ClipExample]]:
    """Generated scenes (Part 1's :mod:`.scenes`) with their exact captions."""
    from stillroom.domains.vl.scenes import generate_scenes

    seed = sec.scenes.seed if sec.scenes.seed is not None else run_seed
    out = []
    for split, n in (("train", sec.scenes_train), ("heldout", sec.scenes_heldout)):
        scenes = generate_scenes(sec.scenes, split, n, seed)
        images = to_rgb(torch.from_numpy(np.ascontiguousarray(scenes.images)), sec.image_size)
        out.append([ClipExample(images[i], c, f"scenes:{split}:{i}", "scenes") for i, c in enumerate(scenes.captions)])
    return out[0], out[1]


def read_caption_folder(folder: Path, sec: ClipConfig) -> tuple[list[ClipExample], list[ClipExample]]:
    """A folder's records (``records.jsonl``: ``id``, ``image``, ``caption``), split by the hash of the id. A
    record without a caption, or whose image is missing, is refused naming the file, line and fix."""
    from PIL import Image

    from stillroom.domains.vision.data import is_heldout

    path = folder / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"clip.caption_folders: {folder} has no records.jsonl")
    train, held = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        where = f"{path}:{line_no} (id {rec.get('id')!r})"
        caption = rec.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: the image {rec.get('image')!r} has no caption: add a non-empty \"caption\" "
                             "to the record or remove it")
        image_path = folder / str(rec.get("image", ""))
        if not image_path.is_file():
            raise FileNotFoundError(f"{where}: image file {image_path} not found")
        with Image.open(image_path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        image = to_rgb(torch.from_numpy(pixels).permute(2, 0, 1)[None], sec.image_size)[0]
        uid = f"{folder.name}:{rec.get('id', line_no)}"
        (held if is_heldout(uid, sec.heldout_fraction) else train).append(
            ClipExample(image, caption, uid, folder.name))
    return train, held


def build_clip_splits(sec: ClipConfig, cache_dir: str | None, run_seed: int) -> ClipSplits:
    """Every configured data set loaded, captioned, split, and the caption table built."""
    train, heldout, sets, train_sets, per_set = [], [], {}, {}, {}
    for name in sec.datasets:
        if name == "scenes":
            tr, he = scene_sets(sec, run_seed)
            sets[name] = EvalSet(name, he)
        else:
            tr, he, classes, phrases = class_set(name, sec, cache_dir, run_seed)
            sets[name] = EvalSet(name, he, classes, phrases)
            train_sets[name] = (classes, phrases)
        train += tr
        heldout += he
        per_set[name] = (len(tr), len(he))
    for folder in sec.caption_folders:
        tr, he = read_caption_folder(Path(folder).expanduser(), sec)
        sets[Path(folder).name] = EvalSet(Path(folder).name, he)
        train, heldout = train + tr, heldout + he
        per_set[Path(folder).name] = (len(tr), len(he))
    if not train:
        raise ValueError("clip: the data sets hold no training images")
    captions = sorted({e.caption for e in train + heldout})
    index = {c: i for i, c in enumerate(captions)}
    for e in train + heldout:
        e.caption_id = index[e.caption]
    stats = {"per_set": per_set, "train_images": len(train), "heldout_images": len(heldout),
             "captions": len(captions)}
    return ClipSplits(train, heldout, sets, captions, train_sets, stats)
