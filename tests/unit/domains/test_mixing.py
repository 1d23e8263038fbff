"""MixUp / CutMix of classifier training batches (``classifier.augment.mix``): the mixed CE by hand, lambda = 1
equal to no mixing, the online teacher fed the mixed images, an exact 2 + 2 == 4 resume, and the refusals."""

from __future__ import annotations


import pytest
import torch

from stillroom.config.core import LossConfig, LossTerm, TrainConfig
from stillroom.config.domains import ClassifierArch, ClassifierAugment
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.domains.vision.data import ImageExample, collate_images
from stillroom.domains.vision.forward import ClassifierForward, ClassifierTeacher
from stillroom.domains.vision.mixing import (MixDraw, MixedImageBatch, MixSettings, draw_batch_mix, mix_batch,
                                             mix_inputs)
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.selfmix import area_lambda
from stillroom.domains.vision.views import SampledViews, TrainingViews, ViewSettings
from stillroom.losses import LossMix, StudentOutput
from stillroom.losses.targets import MixedTargets
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train
from cli_helpers import assert_same_losses
from helpers import interrupted_copy

CE_KL = LossConfig(terms=[LossTerm(name="ce"), LossTerm(name="forward_kl")])


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ImageExample(torch.rand(1, 8, 8, generator=g), i % 5, f"x:{i}") for i in range(n)]


def _model(seed):
    return build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 5, seed=seed)


def _settings(mix="cutmix", **kw):
    return ViewSettings.of(ClassifierAugment(enabled=True, mix=mix, **kw))


def test_mixed_ce_by_hand():
    z = torch.randn(3, 1, 5, dtype=torch.float64)
    first, second = torch.tensor([[0], [2], [4]]), torch.tensor([[1], [2], [0]])
    lam = torch.tensor([[0.25], [0.5], [1.0]], dtype=torch.float64)
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    got = mix(StudentOutput(logits_btv=z), None, MixedTargets(first, second, lam), torch.ones(3, 1, dtype=torch.bool))
    logq = torch.log_softmax(z[:, 0], -1)
    hand = sum(float(lam[b, 0]) * -float(logq[b, first[b, 0]])
               + (1 - float(lam[b, 0])) * -float(logq[b, second[b, 0]]) for b in range(3))
    assert float(got.total) == pytest.approx(hand, rel=1e-6) and got.count == 3
    z.requires_grad_(True)
    mix(StudentOutput(logits_btv=z), None, MixedTargets(first, second, lam), torch.ones(3, 1, dtype=torch.bool)
        ).total.backward()
    probs = torch.softmax(z.detach()[:, 0], -1)
    one_hot = torch.nn.functional.one_hot
    target = lam * one_hot(first[:, 0], 5) + (1 - lam) * one_hot(second[:, 0], 5)
    torch.testing.assert_close(z.grad[:, 0], probs - target)  # d(soft CE)/dz = q - mixed one-hot


def test_mixing_with_lambda_one_equals_no_mixing():
    batch = collate_images(_examples(6))
    identity = MixDraw([5, 4, 3, 2, 1, 0], 1.0, None)  # mixup at lam = 1: the own image, the own label
    mixed = mix_batch(batch, identity)
    assert isinstance(mixed, MixedImageBatch) and torch.equal(mixed.inputs, batch.inputs)
    student, teacher = _model(1), ClassifierTeacher(_model(2))
    mix = LossMix(CE_KL)
    results = [DistillObjective(ClassifierForward(student), mix, teacher).loss(
        ClassifierForward(student)(b), b, teacher.signal(b)) for b in (batch, mixed)]
    assert float(results[0].total.detach()) == pytest.approx(float(results[1].total.detach()), abs=1e-6)
    assert results[0].count == results[1].count == 6 and mixed.num_targets == 6
    assert torch.equal(mixed.labels, batch.labels) and mixed.loss_mask.shape == (6, 1)


def test_cutmix_pastes_the_partners_box_and_corrects_lambda():
    images = torch.rand(4, 1, 8, 8)
    draw = draw_batch_mix(MixSettings("cutmix", 1.0, 1.0), 0, 0, 4, 0, 4, (8, 8))
    top, left, h, w = draw.box
    out = mix_inputs(images, draw)
    partners = images[torch.tensor(draw.perm)]
    assert torch.equal(out[:, :, top:top + h, left:left + w], partners[:, :, top:top + h, left:left + w])
    kept = torch.ones(8, 8, dtype=torch.bool)
    kept[top:top + h, left:left + w] = False
    assert torch.equal(out[:, :, kept], images[:, :, kept])
    assert draw.lam == area_lambda(draw.box, (8, 8)) and sorted(draw.perm) == [0, 1, 2, 3]


def test_mixup_blends_and_draws_depend_only_on_seed_epoch_position_rank():
    s = MixSettings("mixup", 0.2, 1.0)
    a, b = draw_batch_mix(s, 0, 1, 8, 0, 6, (8, 8)), draw_batch_mix(s, 0, 1, 8, 0, 6, (8, 8))
    assert a == b and a.box is None and a != draw_batch_mix(s, 0, 1, 14, 0, 6, (8, 8))
    images = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(mix_inputs(images, a), a.lam * images + (1 - a.lam) * images[torch.tensor(a.perm)])
    assert draw_batch_mix(MixSettings("mixup", 0.2, 0.0), 0, 1, 8, 0, 6, (8, 8)) is None  # mix_prob 0: unmixed


def test_the_online_teacher_sees_the_mixed_images():
    examples = _examples(8)
    views = TrainingViews(SampledViews(_settings("cutmix"), 0, (8, 8)), collate_images)
    sampler = views.track(ExampleSampler)(n=8, batch_size=4, seed=0)
    batch = views.collate([examples[i] for i in sampler.next_indices()])
    seen = []

    class SpyTeacher(ClassifierTeacher):
        def signal(self, b):
            seen.append(b.inputs.clone())
            return super().signal(b)

    student = _model(1)
    objective = DistillObjective(ClassifierForward(student), LossMix(CE_KL), SpyTeacher(_model(2)))
    player = Player("student", student, objective)
    player.objective.signal(batch)
    assert isinstance(batch, MixedImageBatch) and batch.target_ids.lam[0, 0] < 1.0
    assert torch.equal(seen[0], batch.inputs)
    unmixed = SampledViews(ViewSettings.of(ClassifierAugment(enabled=True)), 0, (8, 8))
    plain = TrainingViews(unmixed, collate_images)
    plain.sampler = sampler
    assert not torch.equal(plain.collate([examples[i] for i in range(4)]).inputs, seen[0])


def _job(tmp_path, name, steps, *, resume=False):
    examples = _examples(12)
    views = TrainingViews(SampledViews(_settings("mixup", mix_alpha=1.0), 0, (8, 8)), collate_images)
    student = _model(1)
    player = Player("student", student, DistillObjective(ClassifierForward(student), LossMix(CE_KL),
                                                         ClassifierTeacher(_model(2))))
    tc = TrainConfig(steps=steps, micro_batch_size=4, grad_accum=2, lr=0.05, warmup_steps=1, precision="fp32",
                     save_every=2, keep_checkpoints=10, weight_decay=0.0)
    return TrainJob(train=tc, seed=0, run_dir=tmp_path / name, run_name=name, players=[player], examples=examples,
                    collate=views.collate, topology=Topology(), device=torch.device("cpu"),
                    sampler=views.track(ExampleSampler), resume=resume, log=lambda _m: None)


def test_four_steps_equal_two_steps_then_resumed_two_with_mixing(tmp_path):
    full = _job(tmp_path, "full", 4)
    train(full)
    interrupted_copy(tmp_path / "full", "resumed", at_step=2)
    resumed = _job(tmp_path, "resumed", 4, resume=True)
    train(resumed)
    assert_same_losses(tmp_path / "resumed", tmp_path / "full", abs=1e-7, steps=4)
    for a, b in zip(full.players[0].model.state_dict().values(), resumed.players[0].model.state_dict().values()):
        assert torch.equal(a, b)


def test_config_defaults_and_refusals():
    assert ClassifierAugment().mix == "none" and MixSettings.of(ClassifierAugment()).mix == "none"
    assert MixSettings.of(ClassifierAugment(enabled=True, mix="mixup")).alpha == 0.2
    assert MixSettings.of(ClassifierAugment(enabled=True, mix="cutmix")).alpha == 1.0
    with pytest.raises(ValueError, match="needs classifier.augment.enabled: true"):
        ClassifierAugment(mix="cutmix")
    store = {"domain": "classifier", "classifier": {"teacher_source": "store",
                                                    "augment": {"enabled": True, "mix": "cutmix"}}}
    with pytest.raises(ValueError, match="cannot use a soft-label store"):
        RunConfig.model_validate(store)
    assert ViewSettings.of(ClassifierAugment(enabled=True, mix="mixup")).as_dict() == ViewSettings(True).as_dict()


def test_methods_that_read_one_label_per_image_refuse_mixing():
    from stillroom.config.schema import RunConfig

    mixed = {"enabled": True, "mix": "cutmix"}
    RunConfig.model_validate({"domain": "classifier", "method": "kd", "classifier": {"augment": mixed}})
    with pytest.raises(ValueError, match="method 'lelp' reads one label per image"):
        RunConfig.model_validate({"domain": "classifier", "method": "lelp", "classifier": {"augment": mixed}})
