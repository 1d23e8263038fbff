"""Cluttered digits (``classifier.dataset: cluttered_digits``): FerKD's CPU data set (spec section 3.7).

Each of scikit-learn's 1,797 8x8 digits is placed on a ``16 x 16`` black canvas with 3-5 random
background strokes (straight segments of random length and grey level, drawn before the digit is
laid over them by a pixel-wise maximum). Training digits sit at a random position, so a random crop
often misses the digit (hard negatives, pure background): the regions FerKD calibrates. Held-out
digits sit at the centre of their canvas (the spec's "centred full canvases"), with clutter too.

Which digit is held out is decided by the SHA-256 of ``digits:<index>`` (the plain digits' uid, as
:mod:`.data` splits them) against :data:`HELDOUT_FRACTION`, so the split is seed-free. Positions and
strokes come from ``numpy.random.default_rng([CLUTTER_SEED, split])``: the images never change between
runs or student seeds, so one teacher trained here serves every seed (its cache key holds the pixels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from stillroom.data.records import split_position

CANVAS = 16
"""Side of the canvas in pixels (the digits are 8x8)."""
DIGIT = 8
STROKES = (3, 5)
"""Background strokes per image: uniform in ``STROKES[0]..STROKES[1]``."""
STROKE_LENGTH = (4.0, 12.0)
"""Stroke length in pixels, uniform."""
STROKE_LEVEL = (0.3, 0.9)
"""Grey level of a stroke (digits reach 1.0), uniform."""
HELDOUT_FRACTION = 0.28
"""About 500 of the 1,797 digits are held out (the spec's standard test size)."""
CLUTTER_SEED = 0
"""Seed of positions and strokes (fixed: the data set is the same for every run seed)."""
SPLITS = {"train": 1, "heldout": 2}


@dataclass(frozen=True)
class ClutteredImages:
    """One split: ``images`` ``[N, 1, 16, 16]`` float32 in [0, 1]; ``labels`` ``[N]`` int64."""

    images: np.ndarray
    labels: np.ndarray


def heldout_digits(count: int) -> np.ndarray:
    """``[count]`` bool: the digits held out, by the hash of their uid ``digits:<index>``."""
    keys = [hashlib.sha256(f"digits:{i}".encode()).hexdigest() for i in range(count)]
    return np.array([split_position(k) < HELDOUT_FRACTION for k in keys], dtype=bool)


def draw_stroke(canvas_hw: np.ndarray, rng: np.random.Generator) -> None:
    """Draw one segment into ``canvas_hw`` ``[16, 16]`` in place (pixel-wise max): a random start, angle and
    length, sampled every quarter pixel; each sample lights the pixel it falls in."""
    y0, x0 = rng.uniform(0, CANVAS, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(*STROKE_LENGTH)
    level = rng.uniform(*STROKE_LEVEL)
    t = np.linspace(0.0, length, int(length * 4) + 1)
    ys, xs = np.floor(y0 + t * np.sin(angle)).astype(int), np.floor(x0 + t * np.cos(angle)).astype(int)
    inside = (ys >= 0) & (ys < CANVAS) & (xs >= 0) & (xs < CANVAS)
    ys, xs = ys[inside], xs[inside]
    canvas_hw[ys, xs] = np.maximum(canvas_hw[ys, xs], level)


def clutter(digits_n88: np.ndarray, centred: bool, rng: np.random.Generator) -> np.ndarray:
    """``[N, 1, 16, 16]``: each 8x8 digit (values in [0, 1]) on a cluttered canvas, centred or at a random place."""
    out = np.zeros((len(digits_n88), 1, CANVAS, CANVAS), dtype=np.float32)
    for i, digit in enumerate(digits_n88):
        canvas = out[i, 0]
        for _ in range(int(rng.integers(STROKES[0], STROKES[1] + 1))):
            draw_stroke(canvas, rng)
        top, left = ((CANVAS - DIGIT) // 2,) * 2 if centred else rng.integers(0, CANVAS - DIGIT + 1, size=2)
        window = canvas[top : top + DIGIT, left : left + DIGIT]
        np.maximum(window, digit, out=window)
    return out


def generate() -> tuple[ClutteredImages, ClutteredImages]:
    """``(training split, held-out split)`` of the cluttered digits, in the digits' order within each split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    digits = np.asarray(d.images, dtype=np.float32) / 16.0
    labels = np.asarray(d.target, dtype=np.int64)
    held = heldout_digits(len(labels))
    parts = []
    for split, rows, centred in (("train", ~held, False), ("heldout", held, True)):
        rng = np.random.default_rng([CLUTTER_SEED, SPLITS[split]])
        parts.append(ClutteredImages(clutter(digits[rows], centred, rng), labels[rows]))
    return parts[0], parts[1]
