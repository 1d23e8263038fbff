"""Procedural scenes: shapes of the arrays, determinism per split, distinct objects in their own cells, exact
captions, and pixels that show each object's colour in its cell."""

import numpy as np
import pytest
from pydantic import ValidationError

from stillroom.config.scenes import ScenesConfig
from stillroom.domains.vision.shapes import BACKGROUNDS, FOREGROUNDS
from stillroom.domains.vl.scenes import CELLS, SceneObject, caption, colour_names, generate_scenes, shape_names


def test_arrays_objects_and_captions_agree():
    cfg = ScenesConfig(max_objects=4)
    scenes = generate_scenes(cfg, "train", 40, seed=0)
    assert scenes.images.shape == (40, 3, 32, 32) and scenes.images.dtype == np.float32
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0
    assert len(scenes.objects) == len(scenes.backgrounds) == len(scenes.captions) == 40
    counts = {len(objs) for objs in scenes.objects}
    assert counts <= {1, 2, 3, 4} and len(counts) >= 3
    for objs, text in zip(scenes.objects, scenes.captions):
        assert len({o.cell for o in objs}) == len(objs) and len({(o.shape, o.colour) for o in objs}) == len(objs)
        assert [o.cell for o in objs] == sorted((o.cell for o in objs), key=CELLS.index)
        assert {o.shape for o in objs} <= set(shape_names(cfg)) and {o.colour for o in objs} <= set(colour_names(cfg))
        assert text == caption(objs) and all(f"{o.colour} {o.shape} at the {o.cell}" in text for o in objs)


def test_caption_wording():
    objs = [SceneObject("circle", "red", "top left"), SceneObject("star", "blue", "bottom right")]
    assert caption(objs) == "a red circle at the top left and a blue star at the bottom right"
    three = [SceneObject("ring", "orange", "bottom left"), *objs]
    assert caption(three) == ("a red circle at the top left, an orange ring at the bottom left and a blue star at "
                              "the bottom right")


def test_deterministic_per_split_and_prefix_stable():
    cfg = ScenesConfig()
    a, b = generate_scenes(cfg, "train", 12, seed=3), generate_scenes(cfg, "train", 12, seed=3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    held = generate_scenes(cfg, "heldout", 12, seed=3)
    assert held.captions != a.captions
    other = generate_scenes(cfg, "train", 12, seed=4)
    assert other.captions != a.captions
    assert generate_scenes(cfg, "train", 30, seed=3).captions[:1] == a.captions[:1]
    with pytest.raises(ValueError, match="split"):
        generate_scenes(cfg, "shifted", 2, seed=0)


def test_each_object_is_painted_in_its_cell_and_the_rest_is_background():
    cfg = ScenesConfig(pixel_noise=0.0, image_size=32)
    scenes = generate_scenes(cfg, "train", 30, seed=1)
    for image, objs, bg in zip(scenes.images, scenes.objects, scenes.backgrounds):
        for k, cell in enumerate(CELLS):
            row, col = divmod(k, 2)
            patch = image[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].reshape(3, -1)
            obj = next((o for o in objs if o.cell == cell), None)
            if obj is None:
                assert np.allclose(patch, np.asarray(BACKGROUNDS[bg])[:, None], atol=1e-6)
            else:  # some pixel is fully the object's colour
                dist = np.abs(patch - np.asarray(FOREGROUNDS[obj.colour])[:, None]).max(axis=0)
                assert dist.min() < 1e-5, (obj, dist.min())


def test_config_refuses_impossible_scenes():
    with pytest.raises(ValidationError, match="min_objects"):
        ScenesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValidationError):
        ScenesConfig(max_objects=5)
