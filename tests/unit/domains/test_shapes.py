"""The procedural colour shapes: the ImageSet contract, determinism, exact labels, label noise, the shifted set."""

import numpy as np
import pytest
import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.config.shapes import ShapesConfig
from stillroom.config.load import ConfigError, load_config
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.shapes import SHAPES, _coverage, flip_labels, generate

SMALL = {"classes": 4, "image_size": 16, "train_per_class": 12, "heldout_per_class": 5}


def _splits(run_seed=0, **shapes):
    sec = ClassifierConfig(dataset="shapes", shapes={**SMALL, **shapes})
    return build_image_splits("shapes", sec.heldout_fraction, sec, run_seed=run_seed)


def test_contract_shapes_dtypes_range_and_captions():
    splits = _splits(image_size=32)
    ds = splits.dataset
    assert ds.images.shape == (4 * 17, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.in_shape == (3, 32, 32)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    assert ds.classes == ["circle", "square", "triangle", "cross"]
    assert len(splits.train) == 48 and len(splits.heldout) == 20 and splits.stats["split"] == "own"
    assert len(ds.captions) == len(ds.labels)
    for caption, label in zip(ds.captions, ds.labels.tolist()):
        assert f" {ds.classes[label]} on a" in caption, caption  # no label noise: the caption names the label


def test_images_come_from_the_generator_seed_not_the_run_seed():
    a, b = _splits(run_seed=1), _splits(run_seed=2)
    assert torch.equal(a.dataset.images, b.dataset.images) and a.dataset.fingerprint() == b.dataset.fingerprint()
    other = _splits(seed=5)
    assert not torch.equal(a.dataset.images, other.dataset.images)
    follows_run = [_splits(run_seed=s, seed=None).dataset.images for s in (1, 2, 1)]
    assert torch.equal(follows_run[0], follows_run[2]) and not torch.equal(follows_run[0], follows_run[1])


def test_heldout_images_do_not_change_with_more_training_images():
    few, more = _splits(), _splits(train_per_class=30)
    held = lambda s: torch.stack([e.image for e in s.heldout])  # noqa: E731
    assert torch.equal(held(few), held(more))


def test_label_is_the_drawn_shape():
    """Render each shape centred, unrotated, on a plain background without noise: the class's mask, exactly."""
    cfg = ShapesConfig(classes=10, image_size=24, scale_jitter=0, position_jitter=0, rotation_deg=0,
                       background_texture=0, pixel_noise=0)
    out = generate(cfg, "train", 2, seed=0)
    assert out.labels.tolist() == np.repeat(np.arange(10), 2).tolist() and not out.flipped.any()
    expected = _coverage(out.labels, np.full(20, 24 * 0.28), np.full((20, 2), 12.0), np.zeros(20), 24)
    for i, image in enumerate(out.images):
        # the foreground colour covers the mask: where the mask is 1 the pixel differs from the background corner
        inside, outside = expected[i] == 1.0, expected[i] == 0.0
        corner = image[:, 0, 0]
        assert np.abs(image[:, inside] - corner[:, None]).max(axis=0).min() > 0.2, list(SHAPES)[out.labels[i]]
        assert np.abs(image[:, outside] - corner[:, None]).max() < 1e-6
    masks = expected.reshape(10, 2, -1)[:, 0]
    assert len({m.tobytes() for m in masks}) == 10  # every shape is a different mask


def test_label_noise_flips_the_asked_fraction_of_training_labels_only():
    splits = _splits(label_noise=0.25)
    ds = splits.dataset
    train = ~ds.heldout
    assert int(ds.flipped[train].sum()) == 12 and not ds.flipped[ds.heldout].any()  # round(0.25 * 48)
    assert splits.stats["flipped_labels"] == 12
    assert any("12 of 48 training labels flipped" in line for line in splits.notes())
    clean = _splits()
    assert torch.equal(clean.dataset.images, ds.images)  # the same images, only labels change
    changed = clean.dataset.labels != ds.labels
    assert torch.equal(changed, ds.flipped)
    noisy, flipped = flip_labels(np.zeros(100, np.int64), 0.1, 3, seed=0)
    assert flipped.sum() == 10 and set(noisy[flipped].tolist()) <= {1, 2} and (noisy[~flipped] == 0).all()


def test_shifted_set_has_other_colours_and_the_same_classes():
    splits = _splits(shifted_per_class=6)
    shifted = splits.dataset.shifted
    assert len(splits.shifted) == 24 and shifted.classes == splits.dataset.classes
    assert shifted.images.shape[1:] == splits.dataset.images.shape[1:]
    # light backgrounds: the mean brightness is far above the in-distribution images' dark backgrounds
    assert float(shifted.images.mean()) > float(splits.dataset.images.mean()) + 0.3
    assert all(c.split(" on ")[0].split()[1] in {"maroon", "navy", "olive", "teal", "purple", "black"}
               for c in shifted.captions)
    assert splits.stats["shifted_images"] == 24 and _splits().dataset.shifted is None


def test_config_bounds_and_the_section_needs_its_dataset():
    with pytest.raises(ConfigError, match="shapes.classes"):
        load_config(None, ["domain=classifier", "classifier.dataset=shapes", "classifier.shapes.classes=11"])
    with pytest.raises(ConfigError, match="rotation_deg"):
        load_config(None, ["domain=classifier", "classifier.dataset=shapes", "classifier.shapes.rotation_deg=45"])
    with pytest.raises(ConfigError, match="set `dataset: shapes`"):
        load_config(None, ["domain=classifier", "classifier.shapes.classes=3"])
    with pytest.raises(ConfigError, match="has held-out images of its own"):
        load_config(None, ["domain=classifier", "classifier.dataset=shapes", "classifier.heldout_fraction=0.3"])
    dumped = load_config(None, ["domain=classifier"]).classifier.model_dump(mode="json")
    assert ClassifierConfig.model_validate(dumped).dataset == "digits"  # a dump repeats the defaults: it loads
