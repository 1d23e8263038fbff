"""Procedural colour images of shapes with exact labels and captions (``classifier.dataset: shapes``).

Each image is ``3 x S x S`` (``S = shapes.image_size``): one filled shape (circle, square, triangle,
cross, ring, star, semicircle, bar, frame, diamond; the first ``shapes.classes``) in a foreground
colour, jittered in size, position and rotation, on a plain or textured background, plus Gaussian
pixel noise. Colours and backgrounds are drawn independently of the class, so only the shape tells
the class apart. Shapes are rendered at 4x resolution and averaged down (anti-aliased edges).

Every split is drawn from its own generator, ``numpy.random.default_rng([seed, split])``: the held-out
images do not change when more training images are asked for, and the images depend on
``shapes.seed`` alone. The ``shifted`` split draws from other palettes (dark, muted foregrounds on
light backgrounds) and other textures (dots, diagonal stripes, gradients): a domain-shifted held-out
set of the same classes. Label noise flips a seeded fraction of the *training* labels to another class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from stillroom.config.shapes import ShapesConfig

SUPERSAMPLE = 4
"""Each pixel is the mean of ``SUPERSAMPLE x SUPERSAMPLE`` samples of the shape's mask."""
RADIUS = 0.28
"""The shape's radius as a fraction of the image side, before ``scale_jitter``."""
CHUNK = 256
"""Images rendered at once (bounds the memory of the ``[n, 4S, 4S]`` sample grids)."""
SPLITS = {"train": 1, "heldout": 2, "shifted": 3, "label_noise": 4}
"""Generator stream per split: ``default_rng([seed, SPLITS[split]])``."""

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five points: the radius limit goes from 0.45 (between points) to 1 (at a point) and back."""
    turn = (np.arctan2(x, y) / (2 * np.pi) * 5) % 1.0  # 0 at a point, 0.5 between two
    return np.hypot(x, y) <= 0.45 + 0.55 * np.abs(1 - 2 * turn)


SHAPES: dict[str, Mask] = {
    # x right, y up, in units of the shape's radius; True inside the shape
    "circle": lambda x, y: x * x + y * y <= 1.0,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 0.8,
    "triangle": lambda x, y: (y >= -0.5) & (y <= 1.0 - np.sqrt(3.0) * np.abs(x)),
    "cross": lambda x, y: ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95)),
    "ring": lambda x, y: (x * x + y * y <= 1.0) & (x * x + y * y >= 0.55 ** 2),
    "star": _star,
    "semicircle": lambda x, y: (x * x + (y + 0.5) ** 2 <= 1.0) & (y >= -0.5),
    "bar": lambda x, y: (np.abs(x) <= 1.0) & (np.abs(y) <= 0.3),
    "frame": lambda x, y: (np.maximum(np.abs(x), np.abs(y)) <= 0.85) & (np.maximum(np.abs(x), np.abs(y)) >= 0.5),
    "diamond": lambda x, y: np.abs(x) + np.abs(y) <= 1.0,
}
"""The shapes by class index (``classes`` takes the first N)."""

Palette = dict[str, tuple[float, float, float]]
FOREGROUNDS: Palette = {
    "red": (0.92, 0.16, 0.12), "green": (0.2, 0.82, 0.25), "blue": (0.25, 0.45, 0.98), "yellow": (0.96, 0.9, 0.2),
    "magenta": (0.9, 0.25, 0.85), "cyan": (0.2, 0.85, 0.9), "orange": (1.0, 0.58, 0.12), "white": (0.96, 0.96, 0.96),
}
BACKGROUNDS: Palette = {
    "black": (0.04, 0.04, 0.05), "dark grey": (0.22, 0.22, 0.24), "navy": (0.05, 0.06, 0.3),
    "dark green": (0.04, 0.2, 0.08), "dark brown": (0.24, 0.12, 0.05),
}
SHIFTED_FOREGROUNDS: Palette = {
    "maroon": (0.45, 0.04, 0.1), "navy": (0.06, 0.08, 0.42), "olive": (0.4, 0.42, 0.05), "teal": (0.0, 0.38, 0.38),
    "purple": (0.35, 0.08, 0.45), "black": (0.05, 0.05, 0.05),
}
SHIFTED_BACKGROUNDS: Palette = {
    "cream": (0.96, 0.93, 0.8), "light grey": (0.82, 0.82, 0.84), "pale blue": (0.75, 0.86, 0.97),
    "pale pink": (0.98, 0.82, 0.86),
}
TEXTURES = ("striped", "checkered", "speckled")
SHIFTED_TEXTURES = ("dotted", "diagonally striped", "shaded")


@dataclass
class ShapeImages:
    """One generated split: ``images`` ``[N, 3, S, S]`` float32 in [0, 1], ``labels`` ``[N]`` int64 (flipped
    where ``flipped`` ``[N]`` bool is True), ``true_labels`` ``[N]`` int64 (the drawn shape), ``captions``."""

    images: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray
    captions: list[str]
    flipped: np.ndarray


def class_names(cfg: ShapesConfig) -> list[str]:
    return list(SHAPES)[: cfg.classes]


def generate(cfg: ShapesConfig, split: str, per_class: int, seed: int) -> ShapeImages:
    """``per_class`` images of each class, class by class, of ``split`` (``train``, ``heldout`` or ``shifted``);
    ``train`` labels get ``cfg.label_noise`` (see the module docstring)."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    shifted = split == "shifted"
    labels = np.repeat(np.arange(cfg.classes, dtype=np.int64), per_class)
    n, size = len(labels), cfg.image_size
    fgs, bgs = (SHIFTED_FOREGROUNDS, SHIFTED_BACKGROUNDS) if shifted else (FOREGROUNDS, BACKGROUNDS)
    textures = SHIFTED_TEXTURES if shifted else TEXTURES
    fg = rng.integers(len(fgs), size=n)
    bg, bg2 = rng.integers(len(bgs), size=n), rng.integers(len(bgs), size=n)
    texture = np.where(rng.random(n) < cfg.background_texture, rng.integers(len(textures), size=n), -1)
    radius = size * RADIUS * (1 + cfg.scale_jitter * rng.uniform(-1, 1, n))
    centre = size / 2 + size * cfg.position_jitter * rng.uniform(-1, 1, (n, 2))
    angle = np.deg2rad(cfg.rotation_deg) * rng.uniform(-1, 1, n)
    coverage_nss = np.empty((n, size, size), np.float32)
    for lo in range(0, n, CHUNK):
        part = slice(lo, min(lo + CHUNK, n))
        coverage_nss[part] = _coverage(labels[part], radius[part], centre[part], angle[part], size)
    background = _backgrounds(rng, texture, textures, _rgb(bgs, bg), _rgb(bgs, bg2), size)
    cover = coverage_nss[:, None]
    images = background * (1 - cover) + _rgb(fgs, fg)[:, :, None, None] * cover
    images = images + cfg.pixel_noise * rng.standard_normal(images.shape)
    names, fg_names, bg_names = class_names(cfg), list(fgs), list(bgs)
    captions = [_caption(fg_names[f], names[c], bg_names[b], bg_names[b2], textures[t] if t >= 0 else None)
                for f, c, b, b2, t in zip(fg, labels, bg, bg2, texture)]
    noisy, flipped = flip_labels(labels, cfg.label_noise if split == "train" else 0.0, cfg.classes, seed)
    return ShapeImages(np.clip(images, 0, 1).astype(np.float32), noisy, labels, captions, flipped)


def flip_labels(labels: np.ndarray, fraction: float, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels with round(fraction * N) of them changed to another class, flipped [N] bool)``; which ones and
    to what is drawn from ``seed``'s label-noise stream."""
    rng = np.random.default_rng([seed, SPLITS["label_noise"]])
    flipped = np.zeros(len(labels), bool)
    chosen = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    flipped[chosen] = True
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, classes, size=len(chosen))) % classes
    return noisy, flipped


def _coverage(labels: np.ndarray, radius: np.ndarray, centre: np.ndarray, angle: np.ndarray,
              size: int) -> np.ndarray:
    """``[n, S, S]`` float32: the fraction of each pixel inside its image's shape."""
    n, fine = len(labels), size * SUPERSAMPLE
    radius, centre, angle = (a.astype(np.float32) for a in (radius, centre, angle))
    grid = (np.arange(fine, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sample positions in pixels
    dx = (grid[None, None, :] - centre[:, 0, None, None]) / radius[:, None, None]  # [n, 1, fine]
    dy = (centre[:, 1, None, None] - grid[None, :, None]) / radius[:, None, None]  # [n, fine, 1], y up
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    x, y = cos * dx + sin * dy, cos * dy - sin * dx  # the shape's own frame
    inside = np.zeros((n, fine, fine), bool)
    for c, mask in enumerate(SHAPES.values()):
        rows = labels == c
        if rows.any():
            inside[rows] = mask(x[rows], y[rows])
    return inside.reshape(n, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)


def _rgb(palette: Palette, index: np.ndarray) -> np.ndarray:
    """``[n, 3]`` float32 colours of ``index`` ``[n]`` into ``palette``."""
    return np.asarray(list(palette.values()), np.float32)[index]


def _backgrounds(rng: np.random.Generator, texture: np.ndarray, names: tuple[str, ...], first: np.ndarray,
                 second: np.ndarray, size: int) -> np.ndarray:
    """``[n, 3, S, S]``: ``first`` ``[n, 3]`` where the image's texture pattern is 0, ``second`` where it is 1
    (texture ``-1``: plain ``first``)."""
    n = len(texture)
    row, col = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.integers(2, 5, size=n)[:, None, None]
    phase = rng.integers(0, 4, size=n)[:, None, None]
    patterns = {
        "striped": ((row + phase) // period) % 2,
        "checkered": ((row + phase) // period + (col + phase) // period) % 2,
        "speckled": (rng.random((n, size, size)) < 0.3).astype(np.float32),
        "dotted": (((row + phase) % (period + 2) == 0) & ((col + phase) % (period + 2) == 0)).astype(np.float32),
        "diagonally striped": ((row + col + phase) // period) % 2,
        "shaded": np.broadcast_to(col / max(size - 1, 1), (n, size, size)),
    }
    pattern_nss = np.zeros((n, size, size), np.float32)
    for t, name in enumerate(names):
        rows = texture == t
        pattern_nss[rows] = np.broadcast_to(patterns[name], (n, size, size))[rows]
    p = pattern_nss[:, None]
    return first[:, :, None, None] * (1 - p) + second[:, :, None, None] * p


def _caption(colour: str, shape: str, background: str, second: str, texture: str | None) -> str:
    """e.g. ``a red circle on a striped navy and black background``."""
    article = "an" if colour[0] in "aeiou" else "a"
    if texture is None or second == background:
        where = f"a {texture + ' ' if texture else 'plain '}{background} background"
    else:
        where = f"a {texture} {background} and {second} background"
    return f"{article} {colour} {shape} on {where}"
