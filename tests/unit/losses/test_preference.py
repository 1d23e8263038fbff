"""DPO (sigmoid) and KTO-pair losses against a reference: hand values, limits, gradients, (sum, count)."""

import math

import pytest
import torch

from stillroom.losses.preference import dpo_sigmoid, kto_pair, preference_loss, sequence_logps


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_by_hand():
    pw, pl = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -0.5])
    rw, rl = torch.tensor([-2.5, -1.0]), torch.tensor([-2.0, -1.5])
    total, count = dpo_sigmoid(pw, pl, rw, rl, beta=0.1)
    # pair 0: r_w = 0.5, r_l = -1.0 -> 0.1 * 1.5; pair 1: r_w = 0, r_l = 1.0 -> 0.1 * -1.0
    want = -math.log(_sig(0.15)) - math.log(_sig(-0.1))
    assert count == 2 and math.isclose(float(total), want, rel_tol=1e-6)


def test_kto_pair_by_hand():
    pw, pl = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -0.5])
    rw, rl = torch.tensor([-2.5, -1.0]), torch.tensor([-2.0, -1.5])
    total, count = kto_pair(pw, pl, rw, rl, beta=0.1)
    r_w, r_l = [0.5, 0.0], [-1.0, 1.0]
    kl_w, kl_l = max(0.0, sum(r_w) / 2), max(0.0, sum(r_l) / 2)  # 0.25, 0.0
    want = sum(((1 - _sig(0.1 * (r_w[i] - kl_l))) + (1 - _sig(0.1 * (kl_w - r_l[i])))) / 2 for i in range(2))
    assert count == 2 and math.isclose(float(total), want, rel_tol=1e-6)


def test_policy_equal_to_reference_gives_log2_and_a_gradient_toward_the_chosen():
    pw = torch.tensor([-1.0, -2.0], requires_grad=True)
    pl = torch.tensor([-1.5, -0.5], requires_grad=True)
    total, count = preference_loss("sigmoid", pw, pl, pw.detach().clone(), pl.detach().clone(), beta=0.1)
    assert math.isclose(float(total.detach()) / count, math.log(2), rel_tol=1e-6)
    total.backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()  # descending raises chosen, lowers rejected
    assert (pw.grad == -0.05).all()  # d/dx -log sigma(0.1 x) at 0 = -0.1 * 0.5


def test_the_reference_gets_no_gradient_and_large_margins_vanish():
    ref = torch.tensor([-1.0], requires_grad=True)
    total, _ = dpo_sigmoid(torch.tensor([0.0]), torch.tensor([-500.0]), ref, torch.tensor([-1.0]), beta=0.1)
    assert float(total) < 1e-20
    assert not total.requires_grad  # the reference is detached; the policy here carries no grad


def test_bad_shapes_and_unknown_kind_are_refused():
    v = torch.zeros(2)
    with pytest.raises(ValueError, match=r"\[P\] log-prob vectors"):
        dpo_sigmoid(v, torch.zeros(3), v, v)
    with pytest.raises(ValueError, match="kto_pair"):
        preference_loss("ipo", v, v, v, v, beta=0.1)


def test_sequence_logps_sums_masked_targets_only():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets = torch.tensor([[-100, 0, 1]])
    mask = targets != -100
    got = sequence_logps(logits, targets, mask)
    assert math.isclose(float(got[0]), math.log(0.9) + math.log(0.8), rel_tol=1e-6)
