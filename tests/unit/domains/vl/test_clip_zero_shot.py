"""Zero-shot classification by class-name prompts, and the classifier teacher kind clip."""

import pytest
import torch
import torch.nn.functional as F
from clip_helpers import tiny_clip_model_folder

from stillroom.config.domains import ClassifierConfig, ClassifierTeacherConfig
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.teacher import classifier_teacher
from stillroom.domains.vl.clip_model import load_image_text
from stillroom.domains.vl.zero_shot import ZeroShotClassifier
from stillroom.train.distributed import Topology


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_model_folder(tmp_path_factory.mktemp("clip"))


def test_logits_are_the_scaled_cosine_to_template_averaged_class_features(clip_folder):
    model = load_image_text(clip_folder)
    templates = ["a photo of {}.", "{} drawn"]
    classifier = ZeroShotClassifier(model, ["a circle", "a star"], templates)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        per_class = [F.normalize(model.text_features([t.format(c) for t in templates]).mean(0), dim=0)
                     for c in ("a circle", "a star")]
        want = model.logit_scale * model.image_features(images) @ torch.stack(per_class).T
        assert torch.allclose(classifier(images), want, atol=1e-5)
    assert classifier.num_classes == 2


def test_a_class_without_a_prompt_is_refused(clip_folder):
    model = load_image_text(clip_folder)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no prompt phrase"):
        ZeroShotClassifier(model, ["a circle", " "], ["a photo of {}."])


def test_classifier_teacher_kind_clip_loads_a_clip_folder_as_a_zero_shot_teacher(clip_folder):
    data = build_image_splits("digits", 0.2, ClassifierConfig(dataset="digits", train_images_per_class=2,
                                                              heldout_images_per_class=2))
    tc = ClassifierTeacherConfig(kind="clip", path=str(clip_folder))
    teacher, origin = classifier_teacher(tc, data, heldout_fraction=0.2, seed=0, cache_dir=None,
                                         device=torch.device("cpu"), topology=Topology(), log=lambda s: None)
    assert "zero-shot CLIP over 10 class prompts" in origin and "the digit zero" in origin
    with torch.no_grad():
        logits = teacher(torch.stack([e.image for e in data.heldout]))  # 8x8 grey digits in, resized inside
    assert logits.shape == (len(data.heldout), 10) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="kind clip is trained as `clip` says"):
        ClassifierTeacherConfig(kind="clip", steps=5)


def test_a_clip_trained_here_is_cached_and_serves_as_the_zero_shot_teacher(tmp_path):
    from clip_helpers import tiny_clip_config, tiny_text_folder

    from stillroom.config.clip import ClipTeacherConfig
    from stillroom.domains.vl.clip_teacher import cached_clip

    spec = ClipTeacherConfig(clip=tiny_clip_config(tiny_text_folder(tmp_path / "text")), steps=2, batch_size=16)
    logs = []
    model, origin = cached_clip(spec, seed=0, cache_dir=str(tmp_path / "cache"), device=torch.device("cpu"),
                                topology=Topology(), log=logs.append)
    assert "trained here contrastively for 2 steps" in origin and not any("cached CLIP" in m for m in logs)
    again, _ = cached_clip(spec, seed=0, cache_dir=str(tmp_path / "cache"), device=torch.device("cpu"),
                           topology=Topology(), log=logs.append)
    assert any("cached CLIP" in m for m in logs)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.image_features(images), again.image_features(images))
    data = build_image_splits("digits", 0.2, ClassifierConfig(dataset="digits", train_images_per_class=2,
                                                              heldout_images_per_class=1))
    teacher, origin = classifier_teacher(ClassifierTeacherConfig(kind="clip", clip=spec), data, heldout_fraction=0.2,
                                         seed=0, cache_dir=str(tmp_path / "cache"), device=torch.device("cpu"),
                                         topology=Topology(), log=logs.append)
    assert "cached in" in origin and teacher.num_classes == 10
