"""MEAL V2: the ensemble's averaging by hand, the discriminator's shapes and losses by hand, both modes'
gradients, the optimizer groups, the config checks, and exact resume with the discriminator."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.config.domains import ClassifierArch
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.domains.vision.data import ImageExample, collate_images
from stillroom.domains.vision.ensemble import ClassifierEnsemble, combine
from stillroom.domains.vision.forward import ClassifierForward
from stillroom.domains.vision.models import build_classifier
from stillroom.losses import LossMix
from stillroom.config.core import LossConfig, LossTerm, TrainConfig
from stillroom.methods import METHODS
from stillroom.methods.base import MethodContext
from stillroom.methods.meal_v2 import (
    DiscriminatorObjective, MealPlayer, MealV2Objective, OutputDiscriminator, discriminator_loss,
    discriminator_widths, fool_loss,
)
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train
from cli_helpers import assert_same_losses
from helpers import interrupted_copy


def test_ensemble_mean_prob_and_mean_logit_by_hand():
    logits_kbc = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 4.0]]])  # K=2 members, B=1, C=3
    e2, e4 = math.exp(2), math.exp(4)
    p = [0.5 * (e2 / (e2 + 2) + 1 / (e4 + 2)), 0.5 * (1 / (e2 + 2) + 1 / (e4 + 2)),
         0.5 * (1 / (e2 + 2) + e4 / (e4 + 2))]
    assert combine(logits_kbc, "mean_prob").exp()[0].tolist() == pytest.approx(p, abs=1e-6)
    assert combine(logits_kbc, "mean_logit")[0].tolist() == pytest.approx([1.0, 0.0, 2.0])
    assert combine(logits_kbc, "mean_logit").softmax(-1)[0, 0] != pytest.approx(p[0], abs=1e-3)  # they differ


def test_ensemble_of_an_mlp_and_a_cnn_gives_combined_logits_and_mean_member_logits():
    mlp = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 10, seed=0)
    cnn = build_classifier(ClassifierArch(kind="cnn", channels=[4]), (1, 8, 8), 10, seed=1)
    images = torch.rand(5, 1, 8, 8)
    ens = ClassifierEnsemble([mlp, cnn], "mean_prob")
    target, mean = ens.targets(images)
    probs = (mlp(images).softmax(-1) + cnn(images).softmax(-1)) / 2
    assert torch.allclose(ens(images).exp(), probs, atol=1e-6) and torch.allclose(target.exp(), probs, atol=1e-6)
    assert torch.allclose(mean, (mlp(images) + cnn(images)) / 2, atol=1e-6)
    assert "ensemble of 2 (mean_prob): mlp [8]" in ens.describe() and "cnn [4]" in ens.describe()
    other = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 3, seed=0)
    with pytest.raises(ValueError, match="different images or classes"):
        ClassifierEnsemble([mlp, other])


def test_discriminator_shapes_clamp_and_relu_after_the_last_layer():
    assert discriminator_widths(1000) == [1000, 125, 15, 2]
    assert discriminator_widths(10) == [10, 1, 1, 2]
    d = OutputDiscriminator(10)
    out = d(torch.randn(7, 10))
    assert out.shape == (7, 2) and (out >= 0).all()
    assert isinstance(d.layers[-1], torch.nn.ReLU) and len(d.layers) == 6


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_discriminator_and_fool_losses_by_hand():
    d_s = torch.tensor([[0.5, 0.0]])  # one student row
    d_t = torch.tensor([[0.0, 2.0]])  # one teacher row
    total, count = discriminator_loss(d_s, d_t)
    hand = (_bce(0.5, 1) + _bce(0.0, 0) + _bce(0.0, 0) + _bce(2.0, 1)) / 4  # the released mean over 2B x 2
    assert count == 1 and float(total) == pytest.approx(hand)
    ref = torch.nn.BCEWithLogitsLoss()(torch.cat([d_s, d_t]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert float(total) == pytest.approx(float(ref))
    f_total, f_count = fool_loss(d_s)
    assert f_count == 1 and float(f_total) == pytest.approx((_bce(0.5, 0) + _bce(0.0, 1)) / 2)


def _setup(mode, hidden=(16,)):
    torch.manual_seed(0)
    student = build_classifier(ClassifierArch(kind="mlp", hidden=list(hidden)), (1, 8, 8), 10, seed=0)
    teachers = ClassifierEnsemble([build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 10, seed=s)
                                   for s in (1, 2)])
    mix = LossMix(LossConfig(terms=[LossTerm(name="soft_ce")]))
    base = DistillObjective(ClassifierForward(student), mix, teacher=object())
    d = OutputDiscriminator(10)
    with torch.no_grad():  # a D whose ReLUs are alive, so gradients through it are not all zero
        for layer in d.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.abs_()
                layer.bias.fill_(0.1)
    images = torch.rand(6, 1, 8, 8)
    batch = collate_images([ImageExample(images[i], i % 10, f"x:{i}") for i in range(6)])
    return student, teachers, MealV2Objective(base, mode, teachers, d), d, batch


def test_off_mode_is_soft_cross_entropy_against_the_mean_probabilities_by_hand():
    student, teachers, objective, _, batch = _setup("off")
    result = objective.loss(objective.forward(batch), batch, objective.signal(batch))
    p = teachers(batch.inputs).exp()
    hand = -(p * student(batch.inputs).log_softmax(-1)).sum()
    assert result.count == 6 and float(result.total.detach()) == pytest.approx(float(hand), rel=1e-5)


def test_official_mode_adds_the_discriminator_loss_and_d_gets_its_gradient_from_the_students_loss():
    student, teachers, objective, d, batch = _setup("official")
    assert any(p is d.layers[0].weight for p in objective.state.parameters())  # checkpointed and optimized with it
    result = objective.loss(objective.forward(batch), batch, objective.signal(batch))
    _, plain_objective_mean = teachers.targets(batch.inputs)
    d_sum, _ = discriminator_loss(d(student(batch.inputs)), d(plain_objective_mean))
    assert result.parts["discriminator"] == pytest.approx(float(d_sum), rel=1e-5)
    result.total.backward()
    assert d.layers[0].weight.grad is not None and d.layers[0].weight.grad.abs().sum() > 0
    # the student descends L_D too: its gradient through D makes it look MORE like "student" (no reversal)
    z = student(batch.inputs).detach().requires_grad_(True)
    discriminator_loss(d(z), d(plain_objective_mean))[0].backward()
    step = -1e-2 * z.grad
    score = lambda zz: float((d(zz)[:, 0] - d(zz)[:, 1]).sum())  # noqa: E731 (higher: more "student")
    assert score(z.detach() + step) > score(z.detach())


def test_adversarial_mode_pushes_the_student_towards_teacher_and_leaves_d_untouched():
    student, teachers, objective, d, batch = _setup("adversarial")
    assert not any(p is d.layers[0].weight for p in objective.state.parameters())
    z = objective.forward(batch)
    result = objective.loss(z, batch, objective.signal(batch))
    assert "fool_discriminator" in result.parts
    result.total.backward()
    assert all(p.grad is None for p in d.parameters())  # D is frozen in the student's term
    zz = student(batch.inputs).detach().requires_grad_(True)
    fool_loss(d(zz))[0].backward()
    score = lambda x: float((d(x)[:, 1] - d(x)[:, 0]).sum())  # noqa: E731 (higher: more "teacher")
    assert score(zz.detach() - 1e-2 * zz.grad) > score(zz.detach())


def test_meal_player_puts_d_at_its_own_lr_with_sgd():
    student, _, objective, d, _ = _setup("official")
    s = RunConfig.model_validate({"domain": "classifier", "method": "meal_v2",
                                  "meal_v2": {"discriminator": "official", "d_lr": 1e-4}}).meal_v2
    player = MealPlayer("student", student, objective, settings=s, d_params=list(d.parameters()))
    player.build_optimizer(TrainConfig(lr=0.01, warmup_steps=0, weight_decay=0.0))
    assert isinstance(player.optimizer, torch.optim.SGD)
    lrs = [g["lr"] for g in player.optimizer.param_groups]
    assert lrs == [0.01, 0.01, 1e-4] and player.optimizer.param_groups[0]["momentum"] == 0.9
    assert sum(len(g["params"]) for g in player.optimizer.param_groups) == len(player.trainable())


def test_config_checks():
    with pytest.raises(ValueError, match="set domain: classifier"):
        RunConfig.model_validate({"method": "meal_v2"})
    with pytest.raises(ValueError, match="not both"):
        RunConfig.model_validate({"domain": "classifier", "classifier": {"teacher": {"steps": 5},
                                                                         "teachers": [{"steps": 5}]}})
    with pytest.raises(ValueError, match=r"teachers\[1\] repeats"):
        RunConfig.model_validate({"domain": "classifier", "classifier": {"teachers": [{}, {}]}})
    with pytest.raises(ValueError, match="student_path"):
        RunConfig.model_validate({"domain": "classifier", "classifier": {"student_path": "x",
                                                                         "student": {"hidden": [4]}}})
    with pytest.raises(ValueError, match="meal_v2"):
        RunConfig.model_validate({"domain": "classifier", "method": "kd", "meal_v2": {"discriminator": "official"}})
    assert METHODS["meal_v2"].domains == ("classifier",)


def _job(tmp_path, name, steps, mode, *, resume=False):
    student, teachers, objective, d, _ = _setup(mode)
    cfg = RunConfig.model_validate({"domain": "classifier", "method": "meal_v2", "seed": 0,
                                    "meal_v2": {"discriminator": mode, "d_lr": 1e-2}})
    ctx = MethodContext(cfg=cfg, run_dir=tmp_path, model=student, data=None, tokenizer=None, teacher_model=teachers,
                        vocab_size=10, topology=Topology(), mix=objective.base.mix, log=lambda _m: None)
    players = METHODS["meal_v2"].plan(ctx).players(Player("student", student, objective.base))
    g = torch.Generator().manual_seed(3)
    examples = [ImageExample(torch.rand(1, 8, 8, generator=g), i % 10, f"x:{i}") for i in range(24)]
    tc = TrainConfig(steps=steps, micro_batch_size=6, lr=0.05, warmup_steps=1, precision="fp32", save_every=2,
                     keep_checkpoints=10, weight_decay=0.0)
    return TrainJob(train=tc, seed=0, run_dir=tmp_path / name, run_name=name, players=players, examples=examples,
                    collate=collate_images, topology=Topology(), device=torch.device("cpu"), sampler=ExampleSampler,
                    resume=resume, log=lambda _m: None)


@pytest.mark.parametrize("mode", ["official", "adversarial"])
def test_four_steps_equal_two_steps_resume_two_steps_including_d(tmp_path, mode):
    full = _job(tmp_path, "full", 4, mode)
    assert len(full.players) == (2 if mode == "adversarial" else 1)
    train(full)
    interrupted_copy(tmp_path / "full", "resumed", at_step=2)
    resumed = _job(tmp_path, "resumed", 4, mode, resume=True)
    train(resumed)
    assert_same_losses(tmp_path / "resumed", tmp_path / "full", abs=1e-7)
    d_full = full.players[-1].objective if mode == "official" else full.players[1].model
    d_res = resumed.players[-1].objective if mode == "official" else resumed.players[1].model
    get = (lambda o: o.discriminator) if mode == "official" else (lambda m: m)  # noqa: E731
    for a, b in zip(get(d_full).state_dict().values(), get(d_res).state_dict().values()):
        assert torch.equal(a, b)
    d0 = _setup(mode)[3]
    assert any(not torch.equal(a, b) for a, b in zip(d0.state_dict().values(), get(d_full).state_dict().values()))
    assert isinstance(full.players[-1].objective, DiscriminatorObjective) == (mode == "adversarial")
