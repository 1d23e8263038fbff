"""The pretrained teacher adapted here: EfficientNet-Lite0 (real ImageNet weights, offline) + a linear head fitted on
labelled images, cached once, refused where it cannot fit the data. Images stay small (16 px, the backbone at 32 px)
so every forward is fast."""

from __future__ import annotations

import pytest
import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.domains.vision import lite0_head
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.lite0_head import fit_linear_head, labelled, load_pretrained_classifier
from stillroom.domains.vision.teacher import classifier_teacher
from stillroom.train.distributed import Topology

CPU = torch.device("cpu")
SHAPES = {"classes": 3, "image_size": 16, "train_per_class": 6, "heldout_per_class": 4}


def section(**teacher) -> ClassifierConfig:
    pretrained = {"size": 32, "labels_per_class": 3, **teacher}
    return ClassifierConfig.model_validate({"dataset": "shapes", "shapes": SHAPES,
                                            "teacher": {"pretrained": pretrained}})


def teacher_of(sec: ClassifierConfig, cache, logs: list[str] | None = None):
    data = build_image_splits(sec.dataset, sec.heldout_fraction, sec)
    return classifier_teacher(sec.teacher, data, heldout_fraction=sec.heldout_fraction, seed=0, cache_dir=str(cache),
                              device=CPU, topology=Topology(), log=(logs if logs is not None else []).append)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_the_head_is_fitted_once_and_reused_and_refitted_when_its_settings_change(cache, monkeypatch):
    logs: list[str] = []
    model, origin = teacher_of(section(), cache, logs)
    assert model.num_classes == 3 and model.in_shape == (3, 16, 16)
    assert "9 labelled training images (3 per class)" in origin and "held-out accuracy" in origin
    assert any("fitting a linear head" in line for line in logs)
    calls = []
    real_fit = lite0_head._fit
    monkeypatch.setattr(lite0_head, "_fit", lambda *a, **k: (calls.append(a), real_fit(*a, **k)))
    again, origin_again = teacher_of(section(), cache)
    assert calls == [] and origin_again == origin  # the cached folder, not a second fit
    torch.testing.assert_close(again.head.weight, model.head.weight)
    other, origin_other = teacher_of(section(C=0.01), cache)
    assert len(calls) == 1 and origin_other != origin  # another C: another folder, fitted
    assert not torch.allclose(other.head.weight, model.head.weight)


def test_the_teacher_is_the_head_on_the_backbone_features_and_its_folder_loads_back(cache):
    model, origin = teacher_of(section(), cache)
    folder = origin.rsplit("cached in ", 1)[1]
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.head(model.features(images)))
        loaded = load_pretrained_classifier(folder, str(cache))
        torch.testing.assert_close(loaded(images), model(images))
    assert loaded.features(images).shape == (2, 1280)
    sec = ClassifierConfig.model_validate({"dataset": "shapes", "shapes": SHAPES, "teacher": {"path": folder}})
    by_path, where = teacher_of(sec, cache)  # `classifier.teacher.path` to the fitted folder
    assert "loaded from" in where
    with torch.no_grad():
        torch.testing.assert_close(by_path(images), model(images))


def test_a_head_for_another_number_of_classes_is_refused_by_name(cache):
    _, origin = teacher_of(section(), cache)
    folder = origin.rsplit("cached in ", 1)[1]
    sec = ClassifierConfig.model_validate({"dataset": "shapes", "shapes": {**SHAPES, "classes": 4},
                                           "teacher": {"path": folder}})
    with pytest.raises(ValueError, match=r"predicts 3 classes, but classifier.dataset='shapes' has 4"):
        teacher_of(sec, cache)


def test_grey_images_are_refused_naming_the_setting_or_repeated_into_rgb_when_asked(cache):
    sec = ClassifierConfig.model_validate({"dataset": "digits", "teacher": {"pretrained": {"size": 32,
                                                                                         "labels_per_class": 2}}})
    with pytest.raises(ValueError, match=r"classifier.teacher.pretrained: .*1 channel.*grayscale: repeat"):
        teacher_of(sec, cache)
    sec = ClassifierConfig.model_validate({"dataset": "digits", "train_images_per_class": 4,
                                           "heldout_images_per_class": 2, "teacher": {"pretrained": {
                                               "size": 32, "labels_per_class": 2, "grayscale": "repeat"}}})
    model, _ = teacher_of(sec, cache)
    assert model.in_shape == (1, 8, 8) and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    model.grayscale = "refuse"
    with pytest.raises(ValueError, match="grayscale: repeat"):
        model(torch.rand(2, 1, 8, 8))


def test_pretrained_beside_a_path_or_training_settings_is_refused(cache):
    for extra, named in (({"path": "/some/folder"}, "path"), ({"steps": 10}, "steps")):
        sec = ClassifierConfig.model_validate({"dataset": "shapes", "shapes": SHAPES,
                                               "teacher": {"pretrained": {"size": 32}, **extra}})
        with pytest.raises(ValueError, match=f"pretrained is set beside {named}"):
            teacher_of(sec, cache)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_fitted_head_gives_the_logistic_regressions_probabilities(classes):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % classes
    feats = torch.randn(30, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 5).float()
    head = fit_linear_head(feats, labels, classes, C=0.5, max_iter=500)
    want = LogisticRegression(C=0.5, max_iter=500).fit(feats.double().numpy(), labels.numpy()).predict_proba(
        feats.double().numpy())
    with torch.no_grad():
        got = head(feats).softmax(-1)
    torch.testing.assert_close(got.double(), torch.from_numpy(want), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        fit_linear_head(feats[labels < 2], labels[labels < 2], 3, C=1.0, max_iter=10)


def test_labelled_keeps_the_first_n_of_each_class_in_order():
    from stillroom.domains.vision.data import ImageExample

    ex = [ImageExample(torch.zeros(1), label, f"d:{i}") for i, label in enumerate([0, 1, 0, 0, 1, 2])]
    assert [e.uid for e in labelled(ex, 2)] == ["d:0", "d:1", "d:2", "d:4", "d:5"]
    assert len(labelled(ex, None)) == 6


def test_pretrained_teachers_join_an_ensemble_unchanged(cache):
    from stillroom.domains.vision.ensemble import ClassifierEnsemble, classifier_teachers

    sec = ClassifierConfig.model_validate({"dataset": "shapes", "shapes": SHAPES, "teachers": [
        {"pretrained": {"size": 32, "labels_per_class": 3}}, {"pretrained": {"size": 32, "labels_per_class": 3,
                                                                             "C": 0.01}}]})
    data = build_image_splits(sec.dataset, sec.heldout_fraction, sec)
    ensemble, _, notes = classifier_teachers(sec, data, seed=0, cache_dir=str(cache), device=CPU,
                                             topology=Topology(), log=lambda _m: None)
    assert isinstance(ensemble, ClassifierEnsemble) and len(notes) == 2 and "EfficientNet-Lite0" in notes[0]
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        members = torch.stack([m(images) for m in ensemble.members])
        torch.testing.assert_close(ensemble(images), torch.logsumexp(members.log_softmax(-1), 0) - torch.log(
            torch.tensor(2.0)))
