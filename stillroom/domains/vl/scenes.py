"""Procedural scenes of coloured shapes with exact captions: the shared images of vision-language distillation.

Each scene is ``3 x S x S`` (``S = scenes.image_size``) float32 in [0, 1]: a plain background colour (one of
the dark backgrounds of :mod:`stillroom.domains.vision.shapes`) and ``min_objects..max_objects`` filled shapes.
The image is a 2 x 2 grid of cells (``CELLS``); each object takes its own cell, jittered within it, and the
(shape, colour) pairs of a scene are distinct, so every object is named exactly by its colour and shape, and
every question about a scene has one checkable answer. Shapes come from the rasteriser of
:mod:`stillroom.domains.vision.shapes` (4x supersampled, anti-aliased); colours from its foreground palette.

Captions list the objects in cell order, e.g. ``a red circle at the top left and a blue star at the bottom
right``. A split is drawn from ``numpy.random.default_rng([seed, SPLITS[split]])`` alone, so ``train`` and
``heldout`` never share a stream and the same arguments give the same scenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stillroom.config.scenes import ScenesConfig
from stillroom.domains.vision.shapes import BACKGROUNDS, FOREGROUNDS, SHAPES, SPLITS, _coverage

CELLS = ("top left", "top right", "bottom left", "bottom right")
"""Positions an object may take (one object per cell), in caption order: row-major over the 2 x 2 grid."""
RADIUS = 0.14
"""An object's radius as a fraction of the image side (a cell is half the side)."""
SCALE_JITTER = 0.12
"""The radius varies uniformly by up to this fraction either way."""
POSITION_JITTER = 0.05
"""An object's centre moves uniformly by up to this fraction of the image side from its cell's centre."""
ROTATION_DEG = 10.0
"""Objects turn uniformly by up to this many degrees either way."""


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its shape name, colour name and cell (one of ``CELLS``)."""

    shape: str
    colour: str
    cell: str


@dataclass
class Scenes:
    """A generated split: ``images`` ``[N, 3, S, S]`` float32 in [0, 1]; per image its objects (in cell order),
    its background colour name and its exact caption."""

    images: np.ndarray
    objects: list[list[SceneObject]]
    backgrounds: list[str]
    captions: list[str]


def shape_names(cfg: ScenesConfig) -> list[str]:
    """The first ``cfg.shapes`` shapes of the rasteriser."""
    return list(SHAPES)[: cfg.shapes]


def colour_names(cfg: ScenesConfig) -> list[str]:
    """The first ``cfg.colours`` foreground colours."""
    return list(FOREGROUNDS)[: cfg.colours]


def random_objects(cfg: ScenesConfig, rng: np.random.Generator, count: int | None = None) -> list[SceneObject]:
    """``count`` objects (default: uniform in ``min_objects..max_objects``) in distinct cells with distinct
    (shape, colour) pairs, sorted in cell order."""
    if count is None:
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if not 1 <= count <= min(len(CELLS), cfg.shapes * cfg.colours):
        raise ValueError(f"a scene holds 1..{min(len(CELLS), cfg.shapes * cfg.colours)} objects, not {count}")
    shapes, colours = shape_names(cfg), colour_names(cfg)
    cells = np.sort(rng.choice(len(CELLS), size=count, replace=False))
    pairs = rng.choice(len(shapes) * len(colours), size=count, replace=False)
    return [SceneObject(shapes[p // len(colours)], colours[p % len(colours)], CELLS[c]) for c, p in zip(cells, pairs)]


def caption(objects: list[SceneObject]) -> str:
    """The exact caption: objects in cell order, joined by commas and a final ``and``."""
    parts = [f"{_article(o.colour)} {o.colour} {o.shape} at the {o.cell}" for o in sorted(objects, key=_cell_index)]
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def generate_scenes(cfg: ScenesConfig, split: str, n: int, seed: int) -> Scenes:
    """``n`` scenes of ``split`` (``train`` or ``heldout``), deterministic in ``(seed, split, n)``; the first
    ``m`` scenes do not depend on ``n``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"scene split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    objects = [random_objects(cfg, rng) for _ in range(n)]
    background = [int(rng.integers(len(BACKGROUNDS))) for _ in range(n)]
    images = render(cfg, objects, background, rng)
    names = list(BACKGROUNDS)
    return Scenes(images, objects, [names[b] for b in background], [caption(o) for o in objects])


def render(cfg: ScenesConfig, objects: list[list[SceneObject]], background: list[int],
           rng: np.random.Generator) -> np.ndarray:
    """``[N, 3, S, S]`` float32: each scene's background, then its objects painted by coverage, then noise.
    Objects are rendered slot by slot (the k-th object of every scene that has one) to stay vectorised."""
    size, n = cfg.image_size, len(objects)
    bg_rgb = np.asarray(list(BACKGROUNDS.values()), np.float32)[background]
    images = np.broadcast_to(bg_rgb[:, :, None, None], (n, 3, size, size)).copy()
    for slot in range(max((len(o) for o in objects), default=0)):
        rows = np.array([i for i, o in enumerate(objects) if len(o) > slot], dtype=np.int64)
        picked = [objects[i][slot] for i in rows]
        cover = _slot_coverage(picked, size, rng)[:, None]
        rgb = np.asarray([FOREGROUNDS[o.colour] for o in picked], np.float32)[:, :, None, None]
        images[rows] = images[rows] * (1 - cover) + rgb * cover
    images = images + cfg.pixel_noise * rng.standard_normal(images.shape).astype(np.float32)
    return np.clip(images, 0, 1).astype(np.float32)


def _slot_coverage(picked: list[SceneObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """``[k, S, S]`` float32: the fraction of each pixel inside each picked object, jittered within its cell."""
    k = len(picked)
    labels = np.asarray([list(SHAPES).index(o.shape) for o in picked], np.int64)
    cell = np.asarray([CELLS.index(o.cell) for o in picked])
    cell_centre = np.stack([(cell % 2 + 0.5) * size / 2, (cell // 2 + 0.5) * size / 2], axis=1)  # (x, y down)
    centre = cell_centre + size * POSITION_JITTER * rng.uniform(-1, 1, (k, 2))
    radius = size * RADIUS * (1 + SCALE_JITTER * rng.uniform(-1, 1, k))
    angle = np.deg2rad(ROTATION_DEG) * rng.uniform(-1, 1, k)
    return _coverage(labels, radius, centre, angle, size)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cell_index(obj: SceneObject) -> int:
    return CELLS.index(obj.cell)
