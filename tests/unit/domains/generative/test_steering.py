"""Steered sampling (spec 15): the toy's exact class posterior, and an unconditional denoiser steered by it.

The denoiser is the exact one of an isotropic Gaussian N(0, s^2 I) under EDM, ``x0_hat = x_t s^2 / (s^2 +
sigma^2)``: it knows nothing of the classes, so every class preference of its samples comes from the steering."""

import math

import torch

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.evaluate import posterior_loss
from stillroom.domains.generative.sampling import Steer, generate
from stillroom.domains.generative.toys import ring_mixture


class GaussianDenoiser(torch.nn.Module):
    def __init__(self, s: float = 1.0, classes: int = 4):
        super().__init__()
        self.s, self.num_classes, self.null_label = s, classes, classes
        self.convention = Convention("edm", sigma_max=20.0)

    def forward(self, x_t, t, labels):
        assert bool((labels == self.null_label).all()), "an unconditional steer feeds the null label"
        return x_t * (self.s ** 2 / (self.s ** 2 + t ** 2)).view(-1, 1)


def test_the_class_posterior_is_bayes_rule_on_the_exact_densities():
    toy = ring_mixture(classes=4)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    post = toy.class_log_posterior(x)
    dens = torch.stack([toy.log_density(x, torch.full((50,), c)) for c in range(4)], 1)
    torch.testing.assert_close(post, dens - torch.logsumexp(dens, 1, keepdim=True), rtol=1e-5, atol=1e-5)
    assert math.isclose(float(toy.class_log_posterior(x, std=0.3).exp().sum(1).mean()), 1.0, rel_tol=1e-6)


def test_steering_an_unconditional_denoiser_makes_its_samples_follow_the_target_class():
    toy, model = ring_mixture(classes=4), GaussianDenoiser()
    targets = torch.arange(4).repeat(250)
    noise = model.convention.prior((1000, 2), generator=torch.Generator().manual_seed(0))

    def share_right(scale: float) -> float:
        x = generate(model, noise, targets, steps=30, steer=Steer(posterior_loss(toy, 0.2), scale))
        return float((toy.class_log_posterior(x, 0.2).argmax(1) == targets).float().mean())

    plain, steered = share_right(0.0), share_right(1.0)
    assert 0.15 < plain < 0.35  # four classes, no preference: about a quarter
    assert steered > 0.9  # measured: 0.24 -> 0.98 at scale 1
