"""The ``classifier.shapes`` section: procedural colour images of shapes (:mod:`stillroom.domains.vision.shapes`;
also the CLIP domain's scenes of single shapes). Imports :mod:`stillroom.config.core` only."""

from __future__ import annotations

from pydantic import Field

from stillroom.config.core import Strict

SHAPE_KINDS = 10
"""How many shapes :mod:`stillroom.domains.vision.shapes` draws (``classifier.shapes.classes`` at most)."""


class ShapesConfig(Strict):
    """Procedural colour images of shapes (``classifier.dataset: shapes``, :mod:`stillroom.domains.vision.shapes`):
    one class per shape, exact labels, a caption per image. Generated from `seed` alone, so the images are the
    same whatever the run's seed unless `seed` is null."""

    classes: int = Field(5, ge=2, le=SHAPE_KINDS, description="Number of classes: the first N of circle, square, "
                         "triangle, cross, ring, star, semicircle, bar, frame, diamond.")
    image_size: int = Field(16, ge=8, le=64, description="Height and width of the RGB images (3 x size x size).")
    train_per_class: int = Field(200, ge=1, description="Training images generated per class.")
    heldout_per_class: int = Field(50, ge=1, description="Held-out images generated per class (drawn "
                                   "independently of the training images; their labels are never flipped).")
    scale_jitter: float = Field(0.2, ge=0.0, le=0.5, description="The shape's radius (0.28 of the image side) "
                                "varies uniformly by up to this fraction either way.")
    position_jitter: float = Field(0.12, ge=0.0, le=0.25, description="The shape's centre moves uniformly by up "
                                   "to this fraction of the image side from the middle, on each axis.")
    rotation_deg: float = Field(15.0, ge=0.0, le=20.0, description="The shape turns uniformly by up to this many "
                                "degrees either way (at most 20: square and diamond are the same shape 45 degrees "
                                "apart).")
    background_texture: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of images drawn on a textured "
                                      "background (stripes, checks, speckles in two background colours) instead "
                                      "of a plain one: the clutter a classifier must ignore.")
    pixel_noise: float = Field(0.03, ge=0.0, le=0.5, description="Standard deviation of Gaussian noise added to "
                               "every pixel (then clipped to [0, 1]).")
    label_noise: float = Field(0.0, ge=0.0, lt=0.5, description="Fraction of training labels flipped to another "
                               "class (chosen from `seed`; the report says how many); held-out labels stay exact.")
    shifted_per_class: int = Field(0, ge=0, description="Images per class of a domain-shifted held-out set (other "
                                   "colours, light backgrounds, other textures) for out-of-distribution checks; "
                                   "0: none.")
    seed: int | None = Field(0, description="Seed of the generator (null: the run's seed).")
