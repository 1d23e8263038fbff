"""``method: feature_kd``'s feature term against hand-computed values, its pieces (pooling, default taps, the
teacher-feature memo) and its objective: the logit terms plus the weighted feature term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stillroom.config.domains import ClassifierArch
from stillroom.config.pretrained_teacher import FeatureKdConfig
from stillroom.domains.vision.data import collate_images, ImageExample
from stillroom.domains.vision.models import build_classifier
from stillroom.losses import LossResult
from stillroom.methods.feature_kd import (
    FeatureKdObjective, TappedForward, TeacherFeatures, default_tap, feature_term, pooled, tap_width,
)


def test_feature_term_against_hand_computed_values():
    s, t = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # normalised: s -> [.6, .8], [0, 1]; t -> [1, 0], [0, 1]; row 1: |.4| + |.8| over 2 channels = .6; row 2: 0
    total, count = feature_term(s, t, distance="l1", normalize=True)
    assert count == 2 and total.item() == pytest.approx(0.6)
    total, _ = feature_term(s, t, distance="l2", normalize=True)
    assert total.item() == pytest.approx((0.16 + 0.64) / 2)
    total, _ = feature_term(s, t, distance="l1", normalize=False)  # (2 + 4) / 2 + (0 + 3) / 2
    assert total.item() == pytest.approx(4.5)
    assert total.item() / count == pytest.approx(nn.L1Loss()(s, t).item())
    zero, _ = feature_term(2 * t, t)  # the same direction: nothing to learn
    assert zero.item() == pytest.approx(0.0, abs=1e-7)


def test_pooling_takes_the_mean_over_space_or_tokens():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    torch.testing.assert_close(pooled(maps), maps.mean((2, 3)))
    tokens = torch.randn(2, 5, 4)
    torch.testing.assert_close(pooled(tokens), tokens.mean(1))
    with pytest.raises(ValueError, match="feature_kd.tap"):
        pooled(torch.zeros(2))


@pytest.mark.parametrize("arch, tap, width", [
    ({"kind": "cnn", "channels": [4, 8]}, "layer.1", 8),
    ({"kind": "resnet", "stem": 8, "widths": [8, 12], "depths": [1, 1]}, "stage.1", 12),
    ({"kind": "mlp", "hidden": [16, 6]}, "layer.1", 6),
])
def test_the_default_tap_is_the_students_last_feature_stage(arch, tap, width):
    model = build_classifier(ClassifierArch.model_validate(arch), (3, 16, 16), 5, seed=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert default_tap(model) == tap and tap_width(model, tap, (3, 16, 16)) == width
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    with pytest.raises(ValueError, match="no default tap"):
        default_tap(build_classifier(ClassifierArch(kind="mlp", hidden=[]), (3, 16, 16), 5, seed=0))


class _Teacher(nn.Module):
    """Features = a fixed linear map of the flattened image; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 6)
        self.calls = 0

    def features(self, images):
        self.calls += 1
        return self.proj(images.flatten(1))

    def forward(self, images):
        return self.features(images)[:, :3]


def _batch(n: int, offset: int = 0):
    g = torch.Generator().manual_seed(offset)
    return collate_images([ImageExample(torch.rand(3, 4, 4, generator=g), i % 3, f"s:{offset + i}") for i in range(n)])


def test_teacher_features_are_kept_per_image_and_equal_the_online_ones():
    teacher = _Teacher()
    kept, online = TeacherFeatures(teacher, cache=True), TeacherFeatures(teacher, cache=False)
    batch = _batch(4)
    first = kept(batch)
    calls = teacher.calls
    torch.testing.assert_close(kept(batch), first)
    assert teacher.calls == calls  # the second time from memory
    torch.testing.assert_close(online(batch), first)
    with pytest.raises(ValueError, match="pooled features"):
        TeacherFeatures(nn.Linear(2, 2), cache=True)


def test_the_objective_adds_the_weighted_feature_term_to_the_logit_terms():
    student = build_classifier(ClassifierArch(kind="cnn", channels=[4, 8]), (3, 4, 4), 3, seed=0)
    teacher = _Teacher()

    class Inner:
        state = nn.Module()

        def signal(self, batch):
            return "logit-signal"

        def loss(self, outputs, batch, signal):
            assert signal == "logit-signal"
            return LossResult(total=outputs["logits"].sum() * 0 + 1.5, count=4, parts={"forward_kl": 1.5})

        def after_step(self, *a):
            pass

        def metrics(self):
            return {}

    projector = nn.Linear(8, 6)
    s = FeatureKdConfig(weight=3.0, distance="l2")
    obj = FeatureKdObjective(Inner(), TappedForward(student, "layer.1"), TeacherFeatures(teacher, True), projector, s)
    batch = _batch(4)
    outputs = obj.forward(batch)
    assert outputs["logits"].shape == (4, 1, 3) and outputs["features"].shape == (4, 8)
    result = obj.loss(outputs, batch, obj.signal(batch))
    term, _ = feature_term(projector(outputs["features"]), teacher.features(batch.inputs), distance="l2")
    assert result.count == 4 and result.total.item() == pytest.approx(1.5 + 3.0 * term.item(), rel=1e-5)
    assert set(result.parts) == {"forward_kl", "feature"}
    result.total.backward()
    assert projector.weight.grad is not None and teacher.proj.weight.grad is None  # the teacher side is constant
    assert set(dict(obj.state.named_children())) == {"mix", "projector"}


def test_the_method_is_registered_for_classifiers_and_needs_a_teacher_with_features():
    from stillroom.config.methods import METHODS as SECTIONS
    from stillroom.config.schema import RunConfig
    from stillroom.methods import METHODS

    assert METHODS["feature_kd"].domains == ("classifier",) and SECTIONS["feature_kd"] is FeatureKdConfig
    with pytest.raises(ValueError, match="classifier.teacher.pretrained"):  # refused when the recipe loads
        RunConfig.model_validate({"domain": "classifier", "method": "feature_kd"})
    ok = RunConfig.model_validate({"domain": "classifier", "method": "feature_kd", "classifier": {
        "dataset": "shapes", "teacher": {"pretrained": {"size": 64}}}})
    assert ok.feature_kd == FeatureKdConfig()
    tuned = RunConfig.model_validate({"domain": "classifier", "method": "feature_kd", "feature_kd": {"weight": 4.0},
                                      "classifier": {"dataset": "shapes", "teacher": {"pretrained": {"size": 64}}}})
    assert tuned.feature_kd.weight == 4.0