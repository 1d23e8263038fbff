"""AST's machinery: the differentiable unroll against plain torch SGD, representative init, the experts, and
the synthetic set's player through the one loop (exact resume)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stillroom.config.dataset_distill import AstConfig, AstExperts
from stillroom.config.domains import ClassifierArch
from stillroom.data.batch import ExampleSampler
from stillroom.domains.vision.ast.experts import Trajectories, expert_batch_loss, train_expert, trajectory_speed
from stillroom.domains.vision.ast.losses import input_gradient_penalty
from stillroom.domains.vision.ast.player import ast_player, collate_outer
from stillroom.domains.vision.ast.realdata import RealData
from stillroom.domains.vision.ast.synthetic import SyntheticSet, class_labels, initial_images, representative_indices
from stillroom.domains.vision.ast.unroll import unroll
from stillroom.domains.vision.models import build_classifier
from stillroom.train.distributed import Topology
from stillroom.train.loop import TrainJob, train

CNN = ClassifierArch(kind="cnn", channels=[2])


def _model():
    return build_classifier(CNN, (1, 4, 4), 3, seed=0)


def test_unroll_equals_torch_sgd_with_momentum():
    torch.manual_seed(0)
    images, labels = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model = _model()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    steps = unroll(model, start, images, labels, lr=torch.tensor(0.1), steps=3, batch_syn=None, momentum=0.5,
                   factor=1.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for _ in range(3):  # the whole set every step: the order does not matter
        opt.zero_grad()
        (1.5 * F.cross_entropy(model(images), labels)).backward()
        opt.step()
    assert len(steps) == 4
    for name, p in model.named_parameters():
        torch.testing.assert_close(steps[-1][name].detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_unroll_differentiates_to_the_images_and_the_lr():
    torch.manual_seed(1)
    images = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    model = _model().double()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    target = {k: v + 0.1 for k, v in start.items()}

    def outer(lr):
        last = unroll(model, start, images, labels, lr=lr, steps=2, batch_syn=2, momentum=0.0, factor=1.0,
                      generator=torch.Generator().manual_seed(3))[-1]
        return sum((last[k] - target[k]).pow(2).sum() for k in last)

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    value = outer(lr)
    g_lr, g_img = torch.autograd.grad(value, (lr, images))
    eps = 1e-6
    numeric = (outer(torch.tensor(0.05 + eps, dtype=torch.float64)) -
               outer(torch.tensor(0.05 - eps, dtype=torch.float64))) / (2 * eps)
    assert float(g_lr) == pytest.approx(float(numeric), rel=1e-4)
    assert float(g_img.abs().sum()) > 0


def test_representative_indices_pick_the_point_nearest_each_centroid():
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [-0.1, 0.0], [0.0, 0.3]])  # centroid (0, 0.075): nearest row 0
    b = a + 10.0
    chosen = representative_indices(torch.cat([a, b]), 2, seed=0).tolist()
    assert sorted(chosen) == [0, 4]


def test_initial_images_are_class_major_real_images():
    x, y = torch.randn(12, 1, 4, 4), torch.arange(3).repeat(4)
    images = initial_images("real", 2, x, y, 3, seed=0)
    assert images.shape == (6, 1, 4, 4) and class_labels(2, 3).tolist() == [0, 0, 1, 1, 2, 2]
    for k, c in enumerate(class_labels(2, 3).tolist()):
        assert any(torch.equal(images[k], x[i]) for i in range(12) if int(y[i]) == c)
    rep = initial_images("representative", 1, x, y, 3, seed=0, expert=(_model(), dict(_model().named_parameters())))
    assert rep.shape == (3, 1, 4, 4)
    with pytest.raises(ValueError, match="lower ast.ipc"):
        initial_images("real", 5, x, y, 3, seed=0)


def _data() -> RealData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 4, 4, generator=g), torch.arange(3).repeat(10)
    x = x + y[:, None, None, None].float()  # learnable
    return RealData("toy", x[:24], y[:24], x[24:], y[24:], 3, 0.0, 1.0, "toy")


def test_expert_trajectory_has_a_snapshot_per_epoch_and_its_speed():
    settings = AstExperts(count=1, epochs=3, batch_size=8, clip_loss=True, gradient_penalty=2.0)
    snaps, acc = train_expert(settings, CNN, _data(), seed=0, index=0)
    assert len(snaps) == 4 and 0.0 <= acc <= 1.0
    speed = trajectory_speed(snaps)
    assert len(speed) == 3 and all(s > 0 for s in speed)
    assert not torch.equal(snaps[0]["layers.0.weight"], snaps[-1]["layers.0.weight"])


def test_expert_batch_loss_is_scaled_ce_plus_the_penalty():
    model, data = _model(), _data()
    x, y = data.train_x[:5], data.train_y[:5]
    gp_sum, gp_count = input_gradient_penalty(model, x, 2.0)
    want = 0.6 * F.cross_entropy(model(x), y) + gp_sum / gp_count
    assert float(expert_batch_loss(model, x, y, 0.6, 2.0)) == pytest.approx(float(want), rel=1e-6)
    assert float(expert_batch_loss(model, x, y, 0.6, 0.0)) == pytest.approx(float(0.6 * F.cross_entropy(model(x), y)))


def _job(tmp: Path, steps: int, resume: bool) -> tuple[TrainJob, SyntheticSet]:
    from stillroom.config.core import TrainConfig

    data = _data()
    settings = AstConfig(ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=2, intermediate_matching=False,
                         balance_loss=True, weight_perturb=1.0, lr_img=10.0,
                         experts=AstExperts(count=2, epochs=3, batch_size=8))
    experts = Trajectories(tmp, [train_expert(settings.experts, CNN, data, seed=0, index=i)[0] for i in range(2)], {})
    synthetic = SyntheticSet(initial_images("real", 1, data.train_x, data.train_y, 3, seed=0), class_labels(1, 3), 0.01)
    player = ast_player(synthetic, _model(), experts, settings, seed=0)
    tc = TrainConfig(steps=steps, micro_batch_size=1, clip_grad_norm=None, precision="fp32", warmup_steps=0,
                     schedule="constant", save_every=2, keep_checkpoints=1, device="cpu")
    job = TrainJob(train=tc, seed=0, run_dir=tmp, run_name="t", players=[player], examples=[0], collate=collate_outer,
                   topology=Topology(), device=torch.device("cpu"), sampler=ExampleSampler, resume=resume,
                   log=lambda _m: None, unit="iter")
    return job, synthetic


def test_player_trains_the_images_and_lr_and_resumes_exactly(tmp_path):
    job, whole = _job(tmp_path / "whole", 4, False)
    start = whole.images.detach().clone()
    result = train(job)
    assert result.steps == 4 and not torch.equal(whole.images.detach(), start)
    part_job, _ = _job(tmp_path / "part", 2, False)
    train(part_job)
    resumed_job, resumed = _job(tmp_path / "part", 4, True)
    train(resumed_job)
    assert torch.equal(resumed.images.detach(), whole.images.detach())
    assert torch.equal(resumed.lr.detach(), whole.lr.detach())
