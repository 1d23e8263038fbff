"""Point toys with known densities: exact density, exact sampling, geometry, fingerprints, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.domains.generative.toys import TOYS, PointMixture, moons_mixture, ring_mixture, ring_weights


def grid_points(lo: tuple[float, float], hi: tuple[float, float], step: float) -> torch.Tensor:
    """``[G, 2]`` float64 cell centres of a regular grid over the box ``lo``..``hi``."""
    xs = torch.arange(lo[0] + step / 2, hi[0], step, dtype=torch.float64)
    ys = torch.arange(lo[1] + step / 2, hi[1], step, dtype=torch.float64)
    return torch.cartesian_prod(xs, ys)


@pytest.mark.parametrize(("toy", "lo", "hi"), [(ring_mixture(), (-1.4, -1.4), (1.4, 1.4)),
                                               (moons_mixture(), (-1.4, -0.9), (2.4, 1.4))])
def test_log_density_integrates_to_one_per_class(toy, lo, hi):
    step = 0.01
    grid_gd = grid_points(lo, hi, step)
    for cls in range(toy.num_classes):
        labels = torch.full((len(grid_gd),), cls)
        mass = toy.log_density(grid_gd, labels).exp().sum() * step * step
        assert float(mass) == pytest.approx(1.0, abs=2e-3), (toy.name, cls)


def test_log_density_matches_torch_distributions_mixture():
    toy = ring_mixture(classes=2, modes=5, std=0.2)
    x_nd = torch.randn(64, 2, dtype=torch.float64)
    for cls in range(2):
        reference = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=toy.weights_km[cls].double()),
            torch.distributions.Independent(torch.distributions.Normal(toy.means_kmd[cls].double(), 0.2), 1))
        got = toy.log_density(x_nd, torch.full((64,), cls))
        torch.testing.assert_close(got, reference.log_prob(x_nd))


def test_zero_weight_mode_adds_no_density_and_is_never_sampled():
    toy = ring_mixture(classes=1, modes=4, weights="uniform")
    weights = torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3]])
    pruned = PointMixture("pruned", toy.means_kmd, weights, toy.std, ("c",))
    at_removed_mode = toy.means_kmd[0, :1].double()
    assert float(pruned.log_density(at_removed_mode, torch.zeros(1, dtype=torch.long))) < -50
    x_nd = pruned.sample(torch.zeros(2000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert float((x_nd - toy.means_kmd[0, 0]).norm(dim=1).min()) > 0.5


@pytest.mark.parametrize("weights", ["decreasing", "uniform"])
def test_sample_mode_frequencies_match_weights(weights):
    toy = ring_mixture(weights=weights)
    n = 24000
    labels = torch.arange(n) % toy.num_classes
    x_nd = toy.sample(labels, torch.Generator().manual_seed(3))
    dist_nm = (x_nd[:, None, :] - toy.means_kmd[labels]).norm(dim=-1)
    mode_n = dist_nm.argmin(dim=1)
    per_class = n // toy.num_classes
    for cls in range(toy.num_classes):
        freq_m = torch.bincount(mode_n[labels == cls], minlength=8).double() / per_class
        w_m = toy.weights_km[cls].double()
        tolerance_m = 5 * (w_m * (1 - w_m) / per_class).sqrt()  # 5 binomial standard errors
        assert ((freq_m - w_m).abs() <= tolerance_m).all(), (cls, freq_m, w_m)


def test_sample_spread_around_its_mode_is_std():
    toy = ring_mixture(std=0.05)
    labels = torch.zeros(8000, dtype=torch.long)
    x_nd = toy.sample(labels, torch.Generator().manual_seed(1))
    nearest_nd = toy.means_kmd[0][(x_nd[:, None] - toy.means_kmd[0]).norm(dim=-1).argmin(1)]
    assert float((x_nd - nearest_nd).std()) == pytest.approx(0.05, rel=0.05)


def test_sample_is_deterministic_given_the_generator():
    toy = moons_mixture()
    labels = torch.tensor([0, 1, 1, 0, 1])
    a = toy.sample(labels, torch.Generator().manual_seed(7))
    b = toy.sample(labels, torch.Generator().manual_seed(7))
    c = toy.sample(labels, torch.Generator().manual_seed(8))
    assert a.shape == (5, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ring_geometry_and_documented_weights():
    toy = ring_mixture(classes=4, modes=8, radius=1.0, rotation=math.pi / 16)
    assert (toy.num_classes, toy.dim, toy.means_kmd.shape) == (4, 2, (4, 8, 2))
    torch.testing.assert_close(toy.means_kmd.norm(dim=-1), torch.ones(4, 8))
    for cls in range(4):
        angle = math.atan2(float(toy.means_kmd[cls, 0, 1]), float(toy.means_kmd[cls, 0, 0]))
        assert angle == pytest.approx(cls * math.pi / 16, abs=1e-6)
    torch.testing.assert_close(toy.weights_km[2], torch.arange(8, 0, -1).float() / 36)
    torch.testing.assert_close(ring_weights(4, "uniform"), torch.full((4,), 0.25))


def test_moons_modes_lie_on_scikit_learn_moons():
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=2 * 32, noise=0.0, shuffle=False)
    toy = moons_mixture(modes_per_moon=32)
    assert toy.class_names == ("outer", "inner")
    for cls in range(2):
        expected = torch.tensor(points[labels == cls], dtype=torch.float32)
        torch.testing.assert_close(toy.means_kmd[cls], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(toy.weights_km.sum(1), torch.ones(2))


def test_registry_builds_the_named_toys():
    assert set(TOYS) == {"rings", "moons"}
    assert TOYS["rings"](classes=3).num_classes == 3
    assert TOYS["moons"](std=0.1).std == 0.1


def test_fingerprint_follows_the_parameters():
    assert ring_mixture().fingerprint() == ring_mixture().fingerprint()
    assert len(ring_mixture().fingerprint()) == 64
    others = {ring_mixture(std=0.06).fingerprint(), ring_mixture(weights="uniform").fingerprint(),
              ring_mixture(rotation=0.0).fingerprint(), moons_mixture().fingerprint(), ring_mixture().fingerprint()}
    assert len(others) == 5


def test_bad_parameters_and_labels_are_refused():
    means = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="sum to 1"):
        PointMixture("bad", means, torch.full((2, 3), 0.5), 0.1, ("a", "b"))
    with pytest.raises(ValueError, match=r"\[K, M, D\]"):
        PointMixture("bad", torch.zeros(2, 3), torch.full((2, 3), 1 / 3), 0.1, ("a", "b"))
    with pytest.raises(ValueError, match="class names"):
        PointMixture("bad", means, torch.full((2, 3), 1 / 3), 0.1, ("a",))
    with pytest.raises(ValueError, match="std"):
        PointMixture("bad", means, torch.full((2, 3), 1 / 3), 0.0, ("a", "b"))
    with pytest.raises(ValueError, match="weights must be"):
        ring_mixture(weights="random")
    toy = ring_mixture(classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        toy.sample(torch.tensor([0, 2]), torch.Generator())
    with pytest.raises(ValueError, match="x \\[N, 2\\]"):
        toy.log_density(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
