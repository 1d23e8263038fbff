"""Toy generative metrics against analytic values and brute-force computations."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from stillroom.domains.generative import toy_metrics
from stillroom.domains.generative.toy_metrics import (
    exact_tv,
    joint_counts,
    mode_precision,
    mode_recall,
    output_variance,
    pair_tv,
    per_class,
    random_directions,
    rbf_mmd2,
    sliced_wasserstein,
)
from stillroom.domains.generative.toys import PointMixture, ring_mixture


def ring_samples(n: int, seed: int, toy: PointMixture | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    toy = toy or ring_mixture()
    labels = torch.arange(n) % toy.num_classes
    return toy.sample(labels, torch.Generator().manual_seed(seed)), labels


# ------------------------------------------------------------------ sliced Wasserstein
def test_swd_of_a_set_against_itself_is_zero():
    x, _ = ring_samples(2000, 0)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(len(x))]) == 0.0


def test_swd_in_one_dimension_is_the_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=gen)
    assert sliced_wasserstein(x, x + 0.7, projections=8) == pytest.approx(0.7, rel=1e-6)
    y = torch.randn(3000, 1, generator=gen) + 0.7  # independent N(0.7, 1), N != M: W2 -> |a|
    assert sliced_wasserstein(x, y, projections=8) == pytest.approx(0.7, abs=0.06)


def test_swd_of_a_2d_shift_is_norm_over_sqrt_two():
    x, _ = ring_samples(500, 1)  # a shift moves every projected order statistic by s . theta: any x will do
    shift = torch.tensor([0.3, -0.4])  # |s| = 0.5
    dirs_pd = random_directions(256, 2, seed=5)
    exact = 0.5 * float(((dirs_pd @ shift.double() / 0.5) ** 2).mean().sqrt())  # |s| sqrt(mean cos^2)
    assert sliced_wasserstein(x, x + shift, projections=256, seed=5) == pytest.approx(exact, rel=1e-5)
    many = sliced_wasserstein(x, x + shift, projections=2048, seed=5)
    assert many == pytest.approx(0.5 / math.sqrt(2), rel=0.03)


def test_swd_quantile_interpolation_matches_grids_of_different_sizes():
    """Two uniform grids on [0, 1] have the same quantile function at the midpoint levels: distance 0."""
    two, three = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein(two, three, projections=4) == pytest.approx(0.0, abs=1e-12)
    x, _ = ring_samples(3000, 2)
    y, _ = ring_samples(2000, 3)
    assert sliced_wasserstein(x, y) < 0.03 < sliced_wasserstein(x, y * 1.3)


def test_swd_equal_sizes_uses_the_sorted_matching():
    """Parity of the N = M path (sorted matching) with the quantile-interpolation path it short-cuts."""
    x, _ = ring_samples(500, 4)
    y, _ = ring_samples(500, 5)
    dirs_pd = random_directions(64, 2, seed=9)
    x_np = (x.double() @ dirs_pd.T).sort(0).values
    y_np = (y.double() @ dirs_pd.T).sort(0).values
    levels = (torch.arange(500, dtype=torch.float64) + 0.5) / 500
    interp = toy_metrics.quantiles_at(x_np, levels) - toy_metrics.quantiles_at(y_np, levels)
    assert sliced_wasserstein(x, y, projections=64, seed=9) == pytest.approx(float(interp.pow(2).mean().sqrt()))


def test_swd_is_deterministic_given_the_seed():
    x, _ = ring_samples(500, 0)
    y, _ = ring_samples(500, 1)
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    assert sliced_wasserstein(x, y, seed=3) != sliced_wasserstein(x, y, seed=4)


# ------------------------------------------------------------------ MMD
def brute_force_mmd2(x, y, bandwidths) -> float:
    def kernel(a, b):
        sq = torch.cdist(a.double(), b.double()).pow(2)
        return sum(torch.exp(-sq / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    off_x, off_y = ~torch.eye(n, dtype=torch.bool), ~torch.eye(m, dtype=torch.bool)
    return float(kxx[off_x].sum() / (n * (n - 1)) + kyy[off_y].sum() / (m * (m - 1)) - 2 * kernel(x, y).mean())


def test_mmd_chunked_matches_brute_force(monkeypatch):
    x, _ = ring_samples(300, 0)
    y, _ = ring_samples(250, 1)
    y = y + 0.05
    bandwidths = (0.05, 0.2, 1.0)
    expected = brute_force_mmd2(x, y, bandwidths)
    monkeypatch.setattr(toy_metrics, "MMD_CHUNK_ELEMENTS", 7 * 300)  # 7-row chunks: many blocks, uneven tail
    assert rbf_mmd2(x, y, bandwidths=bandwidths) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert rbf_mmd2(y, x, bandwidths=bandwidths) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_another():
    x, _ = ring_samples(1500, 0)
    y, _ = ring_samples(1500, 1)
    same = rbf_mmd2(x, y)
    shifted = rbf_mmd2(x, y + 0.1)
    assert abs(same) < 2e-3
    assert shifted > 0.03 and shifted > 20 * abs(same)
    assert rbf_mmd2(x, y + 0.5) > shifted


# ------------------------------------------------------------------ mode precision and recall
def test_precision_of_mixture_samples_is_the_chi_square_mass():
    x, labels = ring_samples(20000, 0)
    expected = 1 - math.exp(-9 / 2)  # P(chi2(2) <= 9): 2-D Gaussian within 3 std
    tolerance = 4 * math.sqrt(expected * (1 - expected) / 20000)
    assert mode_precision(x, labels, ring_mixture(), k_std=3.0) == pytest.approx(expected, abs=tolerance)


def test_precision_is_zero_far_away_and_wrong_labels_lower_it():
    toy = ring_mixture()
    gen = torch.Generator().manual_seed(0)
    far = torch.rand(1000, 2, generator=gen) * 4 + 3  # uniform noise in [3, 7]^2, far from the unit rings
    assert mode_precision(far, torch.arange(1000) % 4, toy) == 0.0
    x, labels = ring_samples(4000, 1)
    assert mode_precision(x, (labels + 1) % 4, toy) < 0.5


def test_recall_drops_when_a_mode_is_removed():
    toy = ring_mixture()
    x, labels = ring_samples(8000, 0)
    assert mode_recall(x, labels, toy) == 1.0
    weights = toy.weights_km.clone()
    weights[0, 0] = 0
    weights[0] /= weights[0].sum()
    pruned = PointMixture("pruned", toy.means_kmd, weights, toy.std, toy.class_names)
    x_pruned, labels = ring_samples(8000, 0, pruned)
    assert mode_recall(x_pruned, labels, toy) == pytest.approx(31 / 32)
    assert mode_recall(x_pruned, labels, pruned) == 1.0  # the pruned toy has no such mode to miss


def test_recall_needs_min_fraction_and_counts_missing_classes_as_uncovered():
    toy = ring_mixture(classes=2, modes=4, weights="uniform")
    means = toy.means_kmd[0]  # class 0: 90 samples on mode 0, 10 on mode 1, none on modes 2, 3
    x = torch.cat([means[0].expand(90, 2), means[1].expand(10, 2)])
    labels = torch.zeros(100, dtype=torch.long)
    assert mode_recall(x, labels, toy, min_fraction=0.05) == pytest.approx(2 / 8)
    assert mode_recall(x, labels, toy, min_fraction=0.2) == pytest.approx(1 / 8)


# ------------------------------------------------------------------ exact total variation
def test_exact_tv_hand_computed_two_outcomes():
    probs = torch.tensor([0.5, 0.5])
    assert exact_tv(torch.tensor([3, 1]), probs) == pytest.approx(0.25)  # 0.5 * (|0.75-0.5| + |0.25-0.5|)
    assert exact_tv({0: 3, 1: 1}, probs) == pytest.approx(0.25)
    assert exact_tv({(1, 0): 2}, torch.tensor([[0.5, 0.0], [0.5, 0.0]])) == pytest.approx(0.5)
    assert exact_tv(torch.tensor([1, 1]), probs) == 0.0


def test_joint_counts_index_row_major():
    tokens = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert joint_counts(tokens, vocab=2).tolist() == [0, 2, 1, 0]
    with pytest.raises(ValueError, match="exceeds"):
        joint_counts(torch.zeros(1, 30, dtype=torch.long), vocab=4)


def random_joint(vocab: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand([vocab] * length, generator=gen, dtype=torch.float64) ** 3
    return probs / probs.sum()


def draw_tokens(probs_joint: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    vocab, length = probs_joint.shape[0], probs_joint.dim()
    gen = torch.Generator().manual_seed(seed)
    flat = torch.multinomial(probs_joint.reshape(-1), n, replacement=True, generator=gen)
    return torch.stack([(flat // vocab ** (length - 1 - p)) % vocab for p in range(length)], dim=1)


def test_pair_tv_matches_brute_force():
    vocab, length = 3, 3
    probs = random_joint(vocab, length, 0)
    tokens = draw_tokens(probs, 400, 1)
    for i, j in itertools.permutations(range(length), 2):
        marginal = Counter()
        for outcome in itertools.product(range(vocab), repeat=length):
            marginal[(outcome[i], outcome[j])] += float(probs[outcome])
        empirical = Counter((int(row[i]), int(row[j])) for row in tokens)
        brute = 0.5 * sum(abs(empirical[(a, b)] / len(tokens) - marginal[(a, b)])
                          for a in range(vocab) for b in range(vocab))
        assert pair_tv(tokens, probs, i, j, vocab) == pytest.approx(brute, abs=1e-9), (i, j)
        assert pair_tv(tokens, probs.reshape(-1), i, j, vocab) == pytest.approx(brute, abs=1e-9)


def test_joint_tv_shrinks_with_more_exact_samples():
    probs = random_joint(2, 4, 3)
    small = exact_tv(joint_counts(draw_tokens(probs, 200, 0), 2), probs)
    large = exact_tv(joint_counts(draw_tokens(probs, 20000, 0), 2), probs)
    assert large < small and large < 0.03
    assert exact_tv(joint_counts(draw_tokens(probs, 200, 0), 2), random_joint(2, 4, 4)) > small


def test_tv_inputs_are_checked():
    with pytest.raises(ValueError, match="sum to 1"):
        exact_tv(torch.tensor([1, 1]), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="outcomes"):
        exact_tv(torch.tensor([1, 1, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="outside probs"):
        exact_tv({5: 1}, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="different positions"):
        pair_tv(torch.zeros(3, 2, dtype=torch.long), torch.full((4,), 0.25), 1, 1, 2)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 2\)"):
        joint_counts(torch.tensor([[0, 2]]), vocab=2)


# ------------------------------------------------------------------ spread and per class
def test_output_variance_is_the_mean_per_dimension_variance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=gen) * torch.tensor([1.0, 2.0, 3.0])
    assert output_variance(x) == pytest.approx((1 + 4 + 9) / 3, rel=0.03)
    assert output_variance(torch.ones(10, 2)) == 0.0
    images = torch.randn(50, 1, 4, 4, generator=gen)
    assert output_variance(images) == pytest.approx(float(images.reshape(50, -1).var(0).mean()))


def test_per_class_applies_the_metric_class_by_class():
    x, labels = ring_samples(2000, 0)
    y, y_labels = ring_samples(2000, 1)
    out = per_class(sliced_wasserstein, x, labels, y, y_labels, projections=32)
    assert sorted(out) == [0, 1, 2, 3]
    for cls in range(4):
        direct = sliced_wasserstein(x[labels == cls], y[y_labels == cls], projections=32)
        assert out[cls] == direct
    moved = y.clone()
    moved[y_labels == 2] += 1.0  # only class 2's references move
    out_moved = per_class(sliced_wasserstein, x, labels, moved, y_labels, projections=32)
    assert out_moved[2] > 0.5 > max(out.values())
    assert all(out_moved[cls] == out[cls] for cls in (0, 1, 3))
    with pytest.raises(ValueError, match="class 3 has samples but no reference"):
        per_class(sliced_wasserstein, x, labels, y[y_labels < 3], y_labels[y_labels < 3])
