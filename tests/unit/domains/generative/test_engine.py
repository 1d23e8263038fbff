"""The score-distillation primitives: the proxy-gradient identity, DMD's direction, the denoising loss."""

import pytest
import torch

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.engine import (
    denoising_loss, dmd_direction, drop_labels, proxy_loss, renoise_at,
)


def test_proxy_loss_gradient_is_exactly_g():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, generator=gen, requires_grad=True)
    g = torch.randn(4, 3, 2, generator=gen)
    total, count = proxy_loss(x, g)
    total.backward()
    assert count == 4
    assert torch.allclose(x.grad, g)
    assert total.item() == pytest.approx(0.5 * (g ** 2).sum().item())


def test_proxy_loss_passes_g_to_the_generator_parameters():
    """Through x = w * z the proxy loss gives dL/dw = sum(g * z): the chain rule of the chosen gradient."""
    w = torch.tensor(2.0, requires_grad=True)
    z = torch.tensor([[1.0, -3.0]])
    g = torch.tensor([[0.5, 0.25]])
    proxy_loss(w * z, g)[0].backward()
    assert w.grad.item() == pytest.approx(0.5 * 1.0 + 0.25 * -3.0)


def test_dmd_direction_moves_x_toward_the_real_prediction():
    x = torch.zeros(2, 2)
    mu_real, mu_fake = torch.ones(2, 2), -torch.ones(2, 2)
    g = dmd_direction(x, mu_real, mu_fake)
    assert (g < 0).all()  # descending x -= lr * g moves x toward +1 (real) and away from -1 (fake)
    assert torch.allclose(g, torch.full((2, 2), -2.0))  # (mu_fake - mu_real) / mean|x - mu_real| = -2 / 1


def test_dmd_direction_normalises_per_sample():
    x = torch.zeros(2, 1)
    mu_real = torch.tensor([[1.0], [10.0]])
    g = dmd_direction(x, mu_real, torch.zeros(2, 1))
    assert torch.allclose(g, torch.tensor([[-1.0], [-1.0]]))


def test_denoising_loss_weights_by_the_convention():
    conv = Convention("rf")
    x0_hat, target, t = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0.5])
    total, count = denoising_loss(x0_hat, target, t, conv)
    assert count == 1 and total.item() == pytest.approx(2.0 / 0.25)


def test_renoise_at_and_drop_labels():
    conv = Convention("rf")
    x0 = torch.zeros(3, 2)
    eps = torch.ones(3, 2)
    x_t, t = renoise_at(conv, x0, torch.tensor([0.2, 0.5, 1.0]), eps)
    assert torch.allclose(x_t[:, 0], torch.tensor([0.2, 0.5, 1.0]))
    torch.manual_seed(0)
    labels = torch.zeros(10000, dtype=torch.long)
    dropped = drop_labels(labels, 7, 0.1)
    assert 0.08 < (dropped == 7).float().mean().item() < 0.12
    assert drop_labels(labels, 7, 0.0) is labels


class _ScaleByClass(torch.nn.Module):
    """x0_hat = x_t * (c + 1) for class c (the null label is num_classes)."""

    num_classes, null_label = 3, 3

    def forward(self, x, t, labels):
        return x * (labels.float() + 1.0).view(-1, *[1] * (x.dim() - 1))


def test_condition_contrast_is_cross_entropy_over_the_per_class_errors():
    from stillroom.domains.generative.engine import condition_contrast

    x_t = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    target = torch.tensor([[2.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([1, 0, 3])  # the third row's label was dropped (null): left out
    total, count = condition_contrast(_ScaleByClass(), x_t, torch.zeros(3), target, labels, temperature=0.5)
    assert count == 2
    expected = 0.0
    for row, label in ((0, 1), (1, 0)):
        err = torch.stack([((x_t[row] * (c + 1) - target[row]) ** 2).mean() for c in range(3)])
        expected += float(-torch.log_softmax(-err / 0.5, 0)[label])
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # only dropped labels: nothing to contrast
    zero, none = condition_contrast(_ScaleByClass(), x_t[2:], torch.zeros(1), target[2:], labels[2:], 0.5)
    assert zero.item() == 0.0 and none == 0
