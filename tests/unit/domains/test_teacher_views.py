"""A classifier teacher trained here on crop views (``classifier.teacher.augment``): its own cache key, and
training batches that really are crops (the same views a student would draw)."""

from __future__ import annotations

import torch

from stillroom.config.domains import ClassifierAugment, ClassifierTeacherConfig
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.teacher import classifier_teacher, teacher_key
from stillroom.train.distributed import Topology


def test_crop_views_change_the_key_and_whole_images_keep_the_old_one(tmp_path):
    data = build_image_splits("digits", 0.2, cache_dir=str(tmp_path), run_seed=0)
    plain = ClassifierTeacherConfig(steps=3)
    off = ClassifierTeacherConfig(steps=3, augment=ClassifierAugment(enabled=False))
    crops = ClassifierTeacherConfig(steps=3, augment=ClassifierAugment(enabled=True, crop_scale=(0.5, 1.0)))
    other = ClassifierTeacherConfig(steps=3, augment=ClassifierAugment(enabled=True, crop_scale=(0.4, 1.0)))
    keys = [teacher_key(tc, data, 0.2, 0) for tc in (plain, off, crops, other)]
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3


def test_a_teacher_trained_on_crops_sees_crops(tmp_path, monkeypatch):
    from stillroom.domains.vision import teacher as teacher_module

    data = build_image_splits("digits", 0.2, cache_dir=str(tmp_path), run_seed=0)
    seen: list[torch.Tensor] = []
    original = teacher_module.train_apart

    def spy(job, seed=None):
        batch = job.collate(job.examples[:8])
        seen.append(batch.inputs)
        return original(job, seed)

    monkeypatch.setattr(teacher_module, "train_apart", spy)
    tc = ClassifierTeacherConfig(steps=2, batch_size=8, augment=ClassifierAugment(enabled=True, crop_scale=(0.3, 0.5)))
    lines: list[str] = []
    model, origin = classifier_teacher(tc, data, heldout_fraction=0.2, seed=0, cache_dir=str(tmp_path),
                                       device=torch.device("cpu"), topology=Topology(), log=lines.append)
    whole = torch.stack([e.image for e in data.train[:8]])
    assert seen and seen[0].shape == whole.shape and not torch.allclose(seen[0], whole)
    assert any("crop views" in line for line in lines) and "trained here" in origin


def test_mixing_settings_enter_the_key_only_when_mixing(tmp_path):
    data = build_image_splits("digits", 0.2, cache_dir=str(tmp_path), run_seed=0)
    crops = ClassifierAugment(enabled=True, crop_scale=(0.5, 1.0))
    same = ClassifierAugment(enabled=True, crop_scale=(0.5, 1.0), mix_prob=0.5)  # ignored: nothing is mixed
    mixed = ClassifierAugment(enabled=True, crop_scale=(0.5, 1.0), mix="cutmix")
    keys = [teacher_key(ClassifierTeacherConfig(steps=3, augment=a), data, 0.2, 0) for a in (crops, same, mixed)]
    assert keys[0] == keys[1] != keys[2]
