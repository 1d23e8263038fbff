"""Images of vision-language records: a reference to the file, read with PIL into the tower's pixels.

A record of a vision-language data set names an image file; the record encoder checks it opens
(:func:`check_image`, a named error before training) and stores an :class:`ImageRef` on the
example. :func:`stack_pixels` reads the images of a micro-batch when it is collated, resized to the
vision tower's size and normalised with its mean and standard deviation, into ``[B, 3, S, S]``.
Reading at collation (not when the data is built) keeps a large image set out of memory; the last
:data:`CACHED_IMAGES` images read are kept, which holds a small data set whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

CACHED_IMAGES = 4096
"""Decoded images kept in memory between micro-batches (a small set is read from disk once)."""


class ImageError(ValueError):
    """An image that cannot be used (missing, unreadable), named with its file and the fix."""


@dataclass(frozen=True)
class ImageRef:
    """One image file and how the vision tower wants it: ``size`` pixels square, ``(x - mean) / std``
    per channel (``x`` in ``[0, 1]``)."""

    path: str
    size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


def check_image(path: str) -> None:
    """Raise :class:`ImageError` naming ``path`` when the file is missing or PIL cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise ImageError(f"image file {path} does not exist; fix the record's image path (relative to the "
                         "records file's folder) or add the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"image file {path} cannot be read as an image ({type(err).__name__}: {err}); "
                         "replace it with a PNG or JPEG") from None


@functools.lru_cache(maxsize=CACHED_IMAGES)
def load_pixels(ref: ImageRef) -> torch.Tensor:
    """``[3, size, size]`` float32: the image as RGB, resized (bicubic) and normalised as ``ref`` says."""
    from PIL import Image

    check_image(ref.path)
    with Image.open(ref.path) as img:
        return normalised_pixels(img, ref.size, ref.mean, ref.std)


def normalised_pixels(img, size: int, mean, std) -> torch.Tensor:
    """``[3, size, size]`` float32 of a PIL image: RGB, resized (bicubic) where its size differs, then
    ``(x / 255 - mean) / std``. The one place pixels are made, so a remote teacher's server
    (:func:`stillroom.teachers.remote_images.pixels_from_bytes`) sees what the online teacher sees."""
    from PIL import Image

    rgb = img.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    x_hw3 = np.asarray(rgb, dtype=np.float32) / 255.0
    mean_3 = np.asarray(mean, dtype=np.float32)
    std_3 = np.asarray(std, dtype=np.float32)
    return torch.from_numpy(((x_hw3 - mean_3) / std_3).transpose(2, 0, 1).copy())


def stack_pixels(images: list[ImageRef | None], uids: list[str]) -> torch.Tensor | None:
    """``[B, 3, S, S]`` pixels of a micro-batch's images, or ``None`` when no row has one.

    A batch mixing rows with and without an image cannot run as one forward (the text-only rows have
    no image tokens to fill): that is an error naming a row of each kind.
    """
    if all(ref is None for ref in images):
        return None
    missing = [uid for uid, ref in zip(uids, images) if ref is None]
    if missing:
        shown = next(uid for uid, ref in zip(uids, images) if ref is not None)
        raise ImageError(f"a micro-batch mixes text-only sequences ({missing[0]}) with image sequences ({shown}); "
                         "give every record of a vision-language run an image")
    return torch.stack([load_pixels(ref) for ref in images])
