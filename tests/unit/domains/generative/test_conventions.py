"""Each time convention's forward/inverse maps, noising identities and output parameterisation."""

import pytest
import torch

from stillroom.domains.generative.conventions import Convention, sinusoidal, timestep_fractions

CONVENTIONS = [Convention("edm"), Convention("edm", sigma_min=0.01, sigma_max=20.0, rho=5.0),
               Convention("rf"), Convention("flow_clean")]


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: f"{c.name}-{c.sigma_max:g}")
def test_time_and_fraction_are_inverse(conv):
    u = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    assert torch.allclose(conv.fraction(conv.time(u)), u, atol=1e-9)


def test_time_endpoints_and_direction():
    edm = Convention("edm")
    assert edm.time(torch.tensor(1.0)).item() == pytest.approx(80.0)
    assert edm.time(torch.tensor(0.0)).item() == pytest.approx(0.002)
    assert Convention("rf").time(torch.tensor(1.0)).item() == 1.0  # t = 1 is noise
    assert Convention("flow_clean").time(torch.tensor(1.0)).item() == pytest.approx(0.0)  # t = 1 is clean
    u = torch.linspace(0.1, 0.9, 9)
    assert (Convention("edm").time(u).diff() > 0).all()
    assert (Convention("flow_clean").time(u).diff() < 0).all()


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: c.name)
def test_renoise_then_eps_from_recovers_the_noise(conv):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    t = conv.time(torch.rand(6, generator=gen) * 0.9 + 0.05)
    x_t = conv.renoise(x0, t, eps)
    assert torch.allclose(conv.eps_from(x_t, t, x0), eps, atol=1e-5)


def test_renoise_formulas_by_hand():
    x0, eps, t = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    assert Convention("edm").renoise(x0, t, eps).item() == pytest.approx(2.0 - 0.25)
    assert Convention("rf").renoise(x0, t, eps).item() == pytest.approx(0.75 * 2.0 - 0.25)
    assert Convention("flow_clean").renoise(x0, t, eps).item() == pytest.approx(0.25 * 2.0 - 0.75)


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: c.name)
def test_output_weight_turns_the_x0_loss_into_the_raw_output_loss(conv):
    """w(t) * ||x0_from_output(out) - x0_from_output(target)||^2 == ||out - target||^2 (x0 is affine in out)."""
    gen = torch.Generator().manual_seed(1)
    x_t, out, target = (torch.randn(5, 2, generator=gen) for _ in range(3))
    t = conv.time(torch.rand(5, generator=gen) * 0.8 + 0.1)
    diff = conv.x0_from_output(x_t, t, out) - conv.x0_from_output(x_t, t, target)
    assert torch.allclose(conv.output_weight(t) * (diff ** 2).sum(-1), ((out - target) ** 2).sum(-1), rtol=1e-4)


def test_flow_velocity_parameterisations():
    x0, eps, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0.3])
    rf, fc = Convention("rf"), Convention("flow_clean")
    assert torch.allclose(rf.x0_from_output(rf.renoise(x0, t, eps), t, eps - x0), x0, atol=1e-6)
    assert torch.allclose(fc.x0_from_output(fc.renoise(x0, t, eps), t, x0 - eps), x0, atol=1e-6)


def test_json_round_trip_and_bad_fields():
    conv = Convention("edm", sigma_max=10.0)
    assert Convention.from_json(conv.to_json()) == conv
    with pytest.raises(ValueError, match="unknown convention fields"):
        Convention.from_json({"name": "rf", "tee": 1}, "x/denoiser.json")
    with pytest.raises(ValueError, match="unknown time convention"):
        Convention("ddpm")


def test_timestep_fractions_and_sinusoidal_sign():
    assert timestep_fractions(4) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError):
        timestep_fractions(0)
    emb = sinusoidal(torch.tensor([0.5, -0.5]), 8)
    assert emb.shape == (2, 8) and not torch.allclose(emb[0], emb[1])
