"""The codebook toy's exact joint and the analytic teacher score of a categorical over codewords."""

import pytest
import torch

from stillroom.config.autoregressive import ArToyConfig
from stillroom.domains.autoregressive.score import (
    analytic_score, posterior_weights, smoothed_log_density, teacher_denoiser,
)
from stillroom.domains.autoregressive.toy import all_sequences, build_toy, min_distance, snap
from stillroom.domains.generative.toy_metrics import exact_tv, joint_counts, pair_tv


def test_true_joint_sums_to_one_and_matches_the_samplers_frequencies():
    toy = build_toy(ArToyConfig())
    assert toy.probs.shape == (8, 8, 8, 8) and float(toy.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(min_distance(toy.codebook_vd)) >= 0.5
    tokens = toy.sample(200_000, torch.Generator().manual_seed(1))
    # 200k samples over 4096 outcomes: the empirical TV of exact samples is small, and far below a wrong joint's
    assert exact_tv(joint_counts(tokens, 8), toy.probs) < 0.06
    other = build_toy(ArToyConfig(seed=1))
    assert exact_tv(joint_counts(tokens, 8), other.probs) > 0.3
    assert pair_tv(tokens, toy.probs, 0, 3, 8) < 0.01


def test_joint_has_the_procedural_correlations():
    cfg = ArToyConfig()
    toy = build_toy(cfg)
    p = toy.probs
    q1 = p.sum(dim=(1, 2, 3))
    p12 = p.sum(dim=(2, 3))
    partner_mass = sum(float(p12[a, toy.partner_v[a]]) for a in range(8))
    assert partner_mass == pytest.approx(cfg.partner_prob + (1 - cfg.partner_prob) / 8)
    p14 = p.sum(dim=(1, 2))
    assert float(torch.diagonal(p14).sum()) == pytest.approx(cfg.repeat_prob + (1 - cfg.repeat_prob) / 8)
    assert torch.allclose(q1, toy.pi_v)


def test_all_sequences_index_the_joint_row_major_and_snap_finds_codewords():
    seqs = all_sequences(3, 2)
    assert seqs.tolist()[:4] == [[0, 0], [0, 1], [0, 2], [1, 0]]
    toy = build_toy(ArToyConfig())
    tokens = torch.tensor([[3, 1, 7, 0]])
    x = toy.codebook_vd[tokens] + 0.05
    assert snap(x, toy.codebook_vd).tolist() == tokens.tolist()


def test_analytic_score_by_hand_for_two_codewords():
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    x, t = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    # symmetric: equal weights, mu = 0, score = -(x - 0.5 * 0) / 0.25 = 0
    assert torch.allclose(posterior_weights(x, t, probs, codebook), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert torch.allclose(analytic_score(x, t, probs, codebook), torch.zeros(1, 2, dtype=torch.float64))
    # at x = (0.5, 0): distances^2 to (1 - t) c = (+-0.5, 0) are 0 and 1; w_1 / w_2 = exp(1 / (2 * 0.25)) = e^2
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    w1 = torch.exp(torch.tensor(2.0, dtype=torch.float64)) / (1 + torch.exp(torch.tensor(2.0, dtype=torch.float64)))
    mu = torch.tensor([[2 * w1 - 1, 0.0]], dtype=torch.float64)
    assert torch.allclose(teacher_denoiser(x, t, probs, codebook), mu)
    assert torch.allclose(analytic_score(x, t, probs, codebook), -(x - 0.5 * mu) / 0.25)


def test_analytic_score_is_the_gradient_of_the_smoothed_log_density():
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(16, 8, generator=gen, dtype=torch.float64) * 2, dim=-1)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = torch.stack([(smoothed_log_density(x + h * e, t, probs, codebook)
                       - smoothed_log_density(x - h * e, t, probs, codebook)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=-1)
    assert torch.allclose(analytic_score(x, t, probs, codebook), fd, rtol=1e-5, atol=1e-6)


def test_score_is_stable_at_tiny_noise_and_zero_probabilities():
    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    probs = torch.tensor([[0.0, 1.0, 0.0]])
    mu = teacher_denoiser(torch.tensor([[0.9, 0.0]]), torch.tensor([1e-3]), probs, codebook)
    assert torch.isfinite(mu).all() and torch.allclose(mu, codebook[1:2])
