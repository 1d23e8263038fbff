"""CoPG's loss (stillroom.losses.preference.copg_group / copg_pair): hand values, the k-sample form, the gradient."""

import itertools

import pytest
import torch

from stillroom.losses.preference import copg_group, copg_pair


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_a_pair_by_hand():
    # a = R - beta (logp - ref): 1 - 0.5 * 0.5 = 0.75 and 0 - 0.5 * (-0.5) = 0.25; (0.5)^2 / (2 * 0.5) = 0.25
    total, count = copg_pair(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5), _t(1.0), _t(0.0), 0.5)
    assert count == 1 and float(total) == pytest.approx(0.25)


def test_pairs_sum_and_zero_at_the_regularised_optimum():
    beta = 0.2
    ref, ref2, r, r2 = _t(-1.0, -3.0), _t(-2.0, -0.5), _t(0.3, 0.9), _t(0.7, 0.1)
    # logp - ref = R / beta + c for both completions: the regularised rewards are equal, the loss is 0
    logp, logp2 = ref + r / beta + 0.7, ref2 + r2 / beta + 0.7
    total, count = copg_pair(logp, logp2, ref, ref2, r, r2, beta)
    assert count == 2 and float(total) == pytest.approx(0.0, abs=1e-12)
    one, _ = copg_pair(ref[:1], ref2[:1], ref[:1], ref2[:1], r[:1], r2[:1], beta)
    two, _ = copg_pair(ref[1:], ref2[1:], ref[1:], ref2[1:], r[1:], r2[1:], beta)
    both, _ = copg_pair(ref, ref2, ref, ref2, r, r2, beta)
    assert float(both) == pytest.approx(float(one + two))
    assert float(one) == pytest.approx((0.3 - 0.7) ** 2 / (2 * beta))


def test_a_group_of_three_by_hand_and_against_the_explicit_double_sum():
    # policy = reference, beta 1: a = R = [1, 0, 2]; (1/2) * ((1-0)^2 + (1-2)^2 + (0-2)^2) / 2 = 1.5
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    total, count = copg_group(zeros, zeros, _t(1.0, 0.0, 2.0)[None], beta=1.0)
    assert count == 1 and float(total) == pytest.approx(1.5)
    g = torch.Generator().manual_seed(0)
    logp, ref, reward = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    beta, k = 0.3, 5
    a = reward - beta * (logp - ref)
    explicit = sum((a[:, i] - a[:, j]) ** 2 for i, j in itertools.combinations(range(k), 2)) / (k - 1) / (2 * beta)
    total, count = copg_group(logp, ref, reward, beta=beta)
    assert count == 4 and float(total) == pytest.approx(float(explicit.sum()))


def test_the_gradient_is_the_contrastive_policy_gradient():
    """d loss / d theta = -(a_y - a_y') (grad log pi(y) - grad log pi(y')) / 1, through a softmax policy."""
    beta = 0.4
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(6, dtype=torch.float64)
    reward = torch.rand(6, dtype=torch.float64)
    y, y2 = torch.tensor([0, 2, 5]), torch.tensor([1, 4, 3])
    logp, ref = torch.log_softmax(theta, 0), torch.log_softmax(ref_logits, 0)
    total, _ = copg_pair(logp[y], logp[y2], ref[y], ref[y2], reward[y], reward[y2], beta)
    (grad,) = torch.autograd.grad(total, theta)

    expected = torch.zeros(6, dtype=torch.float64)
    for i, j in zip(y.tolist(), y2.tolist()):
        lp = torch.log_softmax(theta, 0)
        a_i = reward[i] - beta * (lp[i] - ref[i])
        a_j = reward[j] - beta * (lp[j] - ref[j])
        (g_i,) = torch.autograd.grad(lp[i], theta, retain_graph=True)
        (g_j,) = torch.autograd.grad(lp[j], theta)
        expected += -(a_i - a_j).detach() * (g_i - g_j)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_the_reference_gets_no_gradient_and_bad_shapes_are_refused():
    logp = torch.zeros(2, 2, requires_grad=True)
    ref = torch.zeros(2, 2, requires_grad=True)
    total, _ = copg_group(logp, ref, torch.tensor([[1.0, 0.0], [0.0, 0.5]]), beta=0.1)
    total.backward()
    assert ref.grad is None and logp.grad is not None and logp.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[G, k >= 2\]"):
        copg_group(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), beta=0.1)
    with pytest.raises(ValueError, match="beta > 0"):
        copg_group(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=0.0)
    with pytest.raises(ValueError, match="six"):
        copg_pair(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1)
