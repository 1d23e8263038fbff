"""TwinFlow (spec 13.2): the Barron loss, the time weights, the groups, the signed-time network, the
rectification's sign, the RCGM target, the EMA state, the teacher copy and the config checks."""

import math

import pytest
import torch

from stillroom.config.load import load_config
from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.data import GenBatch
from stillroom.domains.generative.models import MlpDenoiser, load_denoiser, save_denoiser
from stillroom.domains.generative.twinflow_model import TwinFlowDenoiser
from stillroom.methods.twinflow import (
    EmaState, TwinFlowForward, TwinFlowObjective, barron_rho, group_masks, multi_jump, rcgm_target,
    rectification_direction, time_weights,
)
from stillroom.config.twinflow import TwinFlowConfig

RF = Convention("rf")


def _net(seed=0, **kw) -> TwinFlowDenoiser:
    torch.manual_seed(seed)
    return TwinFlowDenoiser(dim=2, num_classes=2, convention=RF, width=16, depth=2, time_features=8,
                            class_features=4, **kw)


def test_barron_rho_matches_a_hand_computation_and_its_gradient():
    pred = torch.tensor([[0.3, -0.1], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.1], [0.0, 0.002]])
    c = 1e-3
    mse = [(0.3 ** 2 + 0.2 ** 2) / 2, (0.002 ** 2) / 2]
    want = [m * (m / c ** 2 / 1.0 + 1) ** -0.5 / c for m in mse]  # alpha = 1: |alpha - 2| = 1, power -1/2
    rho = barron_rho(pred, target, alpha=1.0, c=c)
    assert rho.tolist() == pytest.approx(want, rel=1e-5)
    rho.sum().backward()
    # the weight is detached: d rho / d pred = 2 (pred - target) / D * weight / c
    weights = torch.tensor([(m / c ** 2 + 1) ** -0.5 for m in mse])[:, None]
    assert torch.allclose(pred.grad, 2 * (pred.detach() - target) / 2 * weights / c, rtol=1e-5)
    assert barron_rho(pred, target, alpha=2.0, c=c).tolist() == pytest.approx([m / c for m in mse], rel=1e-5)


def test_time_weights_follow_the_tangent_law_and_are_one_on_adv_rows():
    t = torch.tensor([1.0, 0.5, 0.5, -0.7])
    tt = torch.tensor([0.0, 0.5, 0.2, -0.7])
    adv = torch.tensor([False, False, False, True])
    w = time_weights(t, tt, adv)
    want = [1.0, math.tan(math.pi / 2.5) + 1, math.tan(0.7 * math.pi / 2.5) + 1, 1.0]
    assert w.tolist() == pytest.approx(want, rel=1e-6)


def test_group_split_is_consecutive_equal_and_complete():
    masks = group_masks(10, ("e2e", "mul", "any", "adv"))
    sizes = {k: int(m.sum()) for k, m in masks.items()}
    assert sizes == {"e2e": 2, "mul": 2, "any": 2, "adv": 4}
    assert torch.stack(list(masks.values())).sum(0).tolist() == [1] * 10
    assert masks["e2e"][:2].all() and masks["adv"][6:].all()
    with pytest.raises(ValueError, match="micro_batch_size"):
        group_masks(3, ("e2e", "mul", "any", "adv"))


def test_forward_at_tt_zero_is_x_t_minus_t_v_and_the_negative_branch_differs():
    net = _net()
    x = torch.randn(5, 2)
    t = torch.rand(5) * 0.9 + 0.05
    labels = torch.tensor([0, 1, 2, 0, 1])
    v0 = net.velocity(x, t, torch.zeros(5), labels)
    assert torch.allclose(net(x, t, labels), x - t[:, None] * v0, atol=1e-6)
    assert not torch.allclose(net.velocity(x, -t, -t, labels), net.velocity(x, t, t, labels))
    x_hat, z_hat, f = net.jump(x, -t, -t, labels)
    assert torch.allclose(x_hat, x - t[:, None] * f) and torch.allclose(z_hat, x + (1 - t[:, None]) * f)


def test_teacher_copy_starts_equal_to_the_teacher_at_every_tt_and_refuses_other_conventions(tmp_path):
    torch.manual_seed(1)
    teacher = MlpDenoiser(dim=2, num_classes=2, convention=RF, width=16, depth=2, time_features=8, class_features=4)
    student = TwinFlowDenoiser.from_teacher(teacher)
    x, t, labels = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(student(x, t, labels), teacher(x, t, labels), atol=1e-6)
    assert torch.allclose(student.velocity(x, t, torch.rand(6), labels), student.velocity(x, t, t, labels))
    save_denoiser(student, tmp_path / "tw")
    again = load_denoiser(tmp_path / "tw")
    assert again.kind == "twinflow" and torch.allclose(again(x, t, labels), student(x, t, labels))
    edm = MlpDenoiser(dim=2, num_classes=2, convention=Convention("edm"), width=16, depth=2, time_features=8,
                      class_features=4)
    with pytest.raises(ValueError, match="generative.teacher.convention.name: rf"):
        TwinFlowDenoiser.from_teacher(edm)


class _Linear(torch.nn.Module):
    """A velocity field of hand-chosen shape: the real branch points at ``x - real``, the fake at ``x - fake``."""

    def __init__(self, real, fake):
        super().__init__()
        self.real, self.fake = torch.tensor(real), torch.tensor(fake)

    def velocity(self, x, t, tt, labels):
        # rf: v = z - x0 = (x_t - x0) / t, so a velocity pointing to x0 from x_t at time t
        x0 = torch.where((t < 0)[:, None], self.fake, self.real)
        return (x - x0) / t.abs()[:, None]


def test_rectification_moves_one_step_samples_from_the_fake_toward_the_real_data():
    torch.manual_seed(0)
    model = _Linear([1.0, 0.0], [0.0, 0.0])  # real data at (1, 0); the generator's samples sit at (0, 0)
    x_hat = torch.zeros(64, 2)
    dv = rectification_direction(model, x_hat, torch.zeros(64, dtype=torch.long))
    # descending rho(F, sg(F - dv)) moves F by -dv, so x_hat = z - F moves by +dv: toward +x
    assert (dv[:, 0] > 0).all() and dv[:, 1].abs().max() < 1e-6


def test_rcgm_target_is_the_flow_target_for_near_instantaneous_rows_and_zero_correction_when_consistent():
    net = _net()
    x, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    t, tt = torch.full((4,), 0.5), torch.full((4,), 0.498)
    v = torch.randn(4, 2) * 0.1
    f = net.velocity(x, t, tt, labels).detach()
    assert torch.allclose(rcgm_target(net, f, v, x, t, tt, labels, 2, 0.01), f - (f - v).clamp(-1, 1))
    # a straight-line field x0 = 0 everywhere is self-consistent: F(x_t, t, tt) = x_t / t, v = the same
    line = _Linear([0.0, 0.0], [0.0, 0.0])
    line.jump = lambda x, t, tt, lab: (x - t[:, None] * line.velocity(x, t, tt, lab),
                                       x + (1 - t[:, None]) * line.velocity(x, t, tt, lab),
                                       line.velocity(x, t, tt, lab))
    z = torch.randn(4, 2)
    t1, tt1 = torch.ones(4), torch.zeros(4)
    f1 = line.velocity(z, t1, tt1, labels)
    assert torch.allclose(multi_jump(line, z, t1, tt1, labels, 2), f1, atol=1e-5)
    assert torch.allclose(rcgm_target(line, f1, z, z, t1, tt1, labels, 2, 0.01), f1, atol=1e-3)


def _batch(n=16):
    torch.manual_seed(3)
    return GenBatch(torch.randn(n, 2), torch.arange(n) % 2)


def test_adversarial_groups_use_the_negative_branch_on_fake_samples_and_plain_arms_have_none():
    sec = TwinFlowConfig()
    out = TwinFlowForward(_net(), sec, 0.0).inputs(_batch())
    adv = out["adv"]
    assert int(adv.sum()) == 4 and (out["t"][adv] < 0).all() and torch.equal(out["tt"][adv], out["t"][adv])
    assert (out["t"][out["e2e"]] == 1).all() and (out["tt"][out["e2e"]] == 0).all()
    assert (out["t"][~adv] >= out["tt"][~adv]).all() and (out["tt"][~adv] >= 0).all()
    plain = TwinFlowForward(_net(), TwinFlowConfig(adversarial=False), 0.0).inputs(_batch())
    assert not plain["adv"].any() and int(plain["e2e"].sum()) == 5


def test_objective_loss_has_both_parts_and_the_ema_ramps_and_restores_exactly():
    net = _net()
    objective = TwinFlowObjective(TwinFlowForward(net, TwinFlowConfig(), 0.1), TwinFlowConfig())
    torch.manual_seed(5)
    result = objective.loss(objective.forward(_batch()), _batch(), None)
    assert result.count == 16 and set(result.parts) == {"twinflow_main", "twinflow_rect"}
    result.total.backward()
    assert net.tt_proj.weight.grad is not None and net.tt_proj.weight.grad.abs().sum() > 0
    before = net.head.weight.detach().clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    objective.after_step({}, 0, 10)  # the decay ramps 0 -> 0.495 first, then the EMA mixes the old and new weights
    assert float(objective.state.decay) == pytest.approx(0.99 / 2)
    assert torch.allclose(objective.state.ema.head.weight, 0.495 * before + 0.505 * net.head.weight, atol=1e-6)
    objective.after_step({}, 1, 10)
    assert float(objective.state.decay) == pytest.approx(0.495 + 0.505 * (0.99 - 0.495) / 2)
    restored = EmaState(_net(seed=9))
    restored.load_state_dict(objective.state.state_dict())
    assert float(restored.decay) == float(objective.state.decay)
    assert torch.equal(restored.ema.head.weight, objective.state.ema.head.weight)
    assert not any(p.requires_grad for p in objective.state.parameters())


def test_config_refuses_a_non_rf_teacher_and_a_non_twinflow_student():
    base = ["domain=generative", "method=twinflow", "generative.student.arch.kind=twinflow"]
    with pytest.raises(ValueError, match="generative.teacher.convention.name"):
        load_config(None, base)
    with pytest.raises(ValueError, match="generative.student.arch.kind: twinflow"):
        load_config(None, ["domain=generative", "method=twinflow", "generative.teacher.convention.name=rf"])
    cfg = load_config(None, [*base, "generative.teacher.convention.name=rf"])
    assert cfg.twinflow.adversarial and cfg.twinflow.enhanced_ratio == 0.5
