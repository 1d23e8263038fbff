"""AST's pure loss pieces, each against a value worked out by hand (stillroom.domains.vision.ast.losses)."""

import math

import pytest
import torch

from stillroom.domains.vision.ast.losses import (
    balanced_factor, clip_loss_factor, flat, input_gradient_penalty, normalised_distance, perturb_weights,
)


def test_clip_loss_factor_rises_from_half_to_one_over_ten_epochs():
    assert [clip_loss_factor(e) for e in range(12)] == pytest.approx(
        [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.0])
    assert clip_loss_factor(2, start=0.2, epochs=4) == pytest.approx(0.6)


def test_balanced_factor_by_hand():
    # T = 10, T/2 = 5: s = 5 -> log_5(8); s = 9 -> log_5(12); s = 0 -> 1 / log_5(13); s = 4 -> 1 / log_5(9)
    assert balanced_factor(5, 10) == pytest.approx(math.log(8) / math.log(5))
    assert balanced_factor(9, 10) == pytest.approx(math.log(12) / math.log(5))
    assert balanced_factor(0, 10) == pytest.approx(math.log(5) / math.log(13))
    assert balanced_factor(4, 10) == pytest.approx(math.log(5) / math.log(9))
    assert balanced_factor(0, 10) < balanced_factor(4, 10) < 1 < balanced_factor(5, 10) < balanced_factor(9, 10)


def test_normalised_distance_by_hand_and_at_its_ends():
    start, target = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])  # ||start - target||^2 = 25
    value, count = normalised_distance(torch.tensor([3.0, 0.0]), target, start)  # ||.||^2 = 16
    assert count == 1 and float(value) == pytest.approx(16 / 25)
    assert float(normalised_distance(start, target, start)[0]) == pytest.approx(1.0)
    assert float(normalised_distance(target, target, start)[0]) == 0.0


def test_normalised_distance_gradient_reaches_the_student_only():
    student = torch.tensor([1.0, 1.0], requires_grad=True)
    value, _ = normalised_distance(student, torch.tensor([3.0, 4.0]), torch.zeros(2))
    value.backward()
    assert student.grad.tolist() == pytest.approx([2 * (1 - 3) / 25, 2 * (1 - 4) / 25])


def test_gradient_penalty_on_a_linear_model_with_known_input_gradient():
    # f(x) = W x with W [K=2, C*H*W]; d sum(f) / dx = column sums of W, the same for every image
    torch.manual_seed(0)
    c, h, w = 2, 2, 3
    lin = torch.nn.Linear(c * h * w, 2, bias=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), lin)
    x = torch.randn(4, c, h, w)
    grad_chw = lin.weight.detach().sum(0).reshape(c, h, w)
    norm_hw = grad_chw.pow(2).sum(0).sqrt()
    expected_mean = float((norm_hw - 1).pow(2).mean())
    total, count = input_gradient_penalty(model, x, 2.0)
    assert count == 4 * h * w
    assert float(total) / count == pytest.approx(2.0 * expected_mean, rel=1e-5)
    total.backward()  # create_graph: the penalty trains the weights
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def test_gradient_penalty_is_zero_where_the_channel_norm_is_one():
    # one channel, f(x) = sum of pixels: every input gradient is 1
    model = lambda x: x.flatten(1).sum(1, keepdim=True)  # noqa: E731
    total, count = input_gradient_penalty(model, torch.randn(3, 1, 2, 2), 2.0)
    assert count == 12 and float(total) == pytest.approx(0.0, abs=1e-10)


def test_weight_perturbation_has_relative_frobenius_size_alpha_on_conv_weights_only():
    gen = torch.Generator().manual_seed(0)
    params = {"conv.weight": torch.full((4, 1, 3, 3), 2.0), "conv.bias": torch.ones(4), "fc.weight": torch.ones(3, 5)}
    out = perturb_weights(params, 0.5, gen)
    assert out["conv.bias"] is params["conv.bias"] and out["fc.weight"] is params["fc.weight"]
    delta = out["conv.weight"] - params["conv.weight"]
    # W constant 2: delta = alpha * d / ||d|| * 2, so ||delta||_F = alpha * 2 = 1
    assert float(delta.norm()) == pytest.approx(1.0, rel=1e-5)
    assert perturb_weights(params, 0.0, gen)["conv.weight"] is params["conv.weight"]


def test_flat_concatenates_in_name_order():
    assert flat({"b": torch.tensor([3.0]), "a": torch.tensor([[1.0, 2.0]])}).tolist() == [1.0, 2.0, 3.0]
