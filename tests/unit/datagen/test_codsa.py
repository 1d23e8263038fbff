"""CoDSA's data generator: allocation arithmetic (by hand), the per-class generator (deterministic, in its class's
region), teacher labelling with the confidence filter, and the settings it refuses."""

import numpy as np
import pytest
import torch

from stillroom.config.codsa import CodsaConfig, CodsaGenerator
from stillroom.datagen.codsa import build_transfer_set, fit_generator, synthesise
from stillroom.datagen.codsa_alloc import allocate, cross_validated_errors, largest_remainder, water_fill
from stillroom.domains.vision.data import build_image_splits


@pytest.fixture(scope="module")
def digits_train():
    """The digits' real training images ``[N, 1, 8, 8]`` and labels ``[N]`` (the classifier domain's hash split)."""
    train = build_image_splits("digits", 0.2).train
    return torch.stack([e.image for e in train]), torch.tensor([e.label for e in train])


# ---------------------------------------------------------------- allocation

def test_uniform_and_inverse_frequency_by_hand():
    assert allocate("uniform", [10, 50, 30], 45) == [5, 25, 15]  # 45 x (1, 5, 3) / 9
    # 45 x (1/10, 1/50, 1/30) / (23/150) = 29.35, 5.87, 9.78 -> floors 29, 5, 9; +1 to the two largest remainders
    assert allocate("inverse_frequency", [10, 50, 30], 45) == [29, 6, 10]


def test_to_balance_fills_minority_classes_first_by_hand():
    # level 42: (42 - 10) + (42 - 30) = 44 <= 45 < 46 (level 43); the one left goes to the smallest class
    assert allocate("to_balance", [10, 50, 30], 45) == [33, 0, 12]
    # level 63 > 50: every class is raised (53 + 13 + 33 = 99), the one left again to the smallest
    assert water_fill([10, 50, 30], 100) == [54, 13, 33]
    # a volume smaller than the gap to the second-smallest class goes to the smallest alone
    assert allocate("to_balance", [10, 50, 30, 145], 15) == [15, 0, 0, 0]


def test_weak_regions_by_hand_and_every_policy_sums_to_the_volume():
    assert allocate("weak_regions", [10, 50, 30], 12, errors=[0.5, 0.0, 0.25]) == [8, 0, 4]
    assert allocate("weak_regions", [10, 50, 30], 12, errors=[0.0, 0.0, 0.0], floor=0.1) == [4, 4, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(1, 200, size=int(rng.integers(2, 12))).tolist()
        volume = int(rng.integers(1, 1000))
        errors = rng.random(len(counts)).tolist()
        for policy in ("uniform", "inverse_frequency", "to_balance", "weak_regions"):
            out = allocate(policy, counts, volume, errors=errors, floor=0.01)
            assert sum(out) == volume and min(out) >= 0, (policy, counts, volume, out)


def test_bad_allocations_are_refused():
    with pytest.raises(ValueError, match="at least one real training image"):
        allocate("uniform", [10, 0, 3], 5)
    with pytest.raises(ValueError, match="one error rate per class"):
        allocate("weak_regions", [10, 3], 5)
    with pytest.raises(ValueError, match="not all zero"):
        largest_remainder([0.0, 0.0], 5)


def test_weak_regions_needs_two_images_per_class_and_finds_the_hard_class():
    feats = np.concatenate([np.zeros((20, 2)), np.ones((20, 2)), np.ones((20, 2)) + 0.01])
    feats = feats + np.random.default_rng(0).normal(0, 0.3, feats.shape)
    labels = np.repeat([0, 1, 2], 20)
    errors = cross_validated_errors(feats, labels, 3, folds=5, seed=0)
    assert errors[0] < 0.2 and errors[1] > 0.2 and errors[2] > 0.2  # 1 and 2 overlap, 0 stands apart
    with pytest.raises(ValueError, match="at least 2 per class"):
        cross_validated_errors(feats[:41], np.array([0] * 20 + [1] * 20 + [2]), 3, folds=5, seed=0)


# ---------------------------------------------------------------- the generator

def test_generator_is_deterministic_per_seed(digits_train):
    images, labels = digits_train
    gen = CodsaGenerator()
    first = fit_generator(images, labels, 10, gen, seed=3)
    a = first.sample(4, 6, np.random.default_rng(1))
    b = fit_generator(images, labels, 10, gen, seed=3).sample(4, 6, np.random.default_rng(1))
    c = first.sample(4, 6, np.random.default_rng(2))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32 and 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_copies_draw_the_class_real_images_with_replacement(digits_train):
    images, labels = digits_train
    generator = fit_generator(images, labels, 10, CodsaGenerator(kind="copies"), seed=0)
    drawn = generator.sample(7, 30, np.random.default_rng(0))
    own = images[labels == 7].reshape(-1, 64)
    assert all((own == x.reshape(64)).all(1).any() for x in drawn)  # every draw is one of class 7's real images
    assert torch.equal(drawn, generator.sample(7, 30, np.random.default_rng(0)))
    assert generator.describe().startswith("copies")
    with pytest.raises(ValueError, match=r"classes \[9\] have no real training image"):
        fit_generator(images[labels != 9], labels[labels != 9], 10, CodsaGenerator(), seed=0)


def test_samples_lie_in_their_class_region(digits_train):
    """A classifier fitted on the real images labels most samples of class c as c (also a 10-image class)."""
    from sklearn.linear_model import LogisticRegression

    images, labels = digits_train
    keep = torch.cat([(labels == c).nonzero().squeeze(1)[: 10 if c == 3 else None] for c in range(10)])
    generator = fit_generator(images[keep], labels[keep], 10, CodsaGenerator(), seed=0)
    assert [m.n_components for m in generator.mixtures][3] == 1  # 10 images: one component
    reference = LogisticRegression(max_iter=1000).fit(images.reshape(len(images), -1).numpy(), labels.numpy())
    rng = np.random.default_rng(0)
    for c in range(10):
        pred = reference.predict(generator.sample(c, 40, rng).reshape(40, -1).numpy())
        assert (pred == c).mean() >= 0.75, (c, np.bincount(pred, minlength=10))


class _PixelTeacher(torch.nn.Module):
    """Logits ``[B, 10]``: ``scale x`` the mean pixel for class 0, zeros elsewhere (confidence grows with ink)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = self.scale * x.flatten(1).mean(1)
        return logits


def test_teacher_labels_and_confidence_filter(digits_train):
    images, labels = digits_train
    train = [type("E", (), {"image": images[i], "label": int(labels[i])})() for i in range(len(labels))]
    teacher = _PixelTeacher(40.0)
    sec = CodsaConfig(policy="uniform", volume=30, min_confidence=0.6, label="teacher")
    out, facts = build_transfer_set(train, 10, teacher, sec, 0, batch_size=16, device=torch.device("cpu"))
    assert sum(facts["allocation"]) == 30 and out.images.shape == (30, 1, 8, 8)
    expected = teacher(out.images).log_softmax(-1)
    assert torch.allclose(out.teacher_logprobs, expected, atol=1e-5)
    assert (out.teacher_logprobs.max(-1).values.exp() >= 0.6).all()  # the filter held
    assert torch.equal(out.labels, expected.argmax(-1))
    assert out.condition.tolist() == [c for c, n in enumerate(facts["allocation"]) for _ in range(n)]
    by_condition = sec.model_copy(update={"label": "condition"})
    out2, _ = build_transfer_set(train, 10, teacher, by_condition, 0, batch_size=16, device=torch.device("cpu"))
    assert torch.equal(out2.labels, out2.condition) and torch.equal(out2.images, out.images)  # same seed, same draws


def test_an_unreachable_confidence_names_the_class(digits_train):
    images, labels = digits_train
    generator = fit_generator(images, labels, 10, CodsaGenerator(), seed=0)
    sec = CodsaConfig(min_confidence=0.5, max_rounds=3)
    with pytest.raises(ValueError, match=r"class 0 kept 0 of 5 samples after 3 draws.*codsa.min_confidence"):
        synthesise(generator, [5] + [0] * 9, _PixelTeacher(0.0), sec, 0, batch_size=8, device=torch.device("cpu"))


def test_bad_settings_are_refused():
    from pydantic import ValidationError

    from stillroom.config.schema import RunConfig

    with pytest.raises(ValidationError, match="domain: classifier"):
        RunConfig.model_validate({"codsa": {"add_to_training": True}})
    with pytest.raises(ValidationError, match="teacher_source: online"):
        RunConfig.model_validate({"domain": "classifier", "codsa": {"add_to_training": True},
                                  "classifier": {"teacher_source": "store"}})
    with pytest.raises(ValidationError, match="policy"):
        RunConfig.model_validate({"domain": "classifier", "codsa": {"policy": "balanced"}})
    with pytest.raises(ValidationError, match="volume"):
        RunConfig.model_validate({"domain": "classifier", "codsa": {"volume": 0}})
    with pytest.raises(ValidationError, match="train_images_per_class"):
        RunConfig.model_validate({"domain": "classifier", "classifier": {"train_images_per_class": {3: 0}}})
