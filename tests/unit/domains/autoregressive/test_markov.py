"""The markov_modes generator: exact likelihoods, its sampler, the bigram embedding and the data splits."""

import itertools

import pytest
import torch

from stillroom.config.autoregressive import AutoregressiveConfig, MarkovModesConfig
from stillroom.domains.autoregressive.data import build_splits, collate_sequences
from stillroom.domains.autoregressive.markov import bigram_embedding, build_markov, pairwise_diversity

TINY = MarkovModesConfig(conditions=2, mode_weights=[0.6, 0.4], vocab=3, length=3, seed=1)


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


@pytest.mark.parametrize("cond", [0, 1, 2])  # 2: the null condition
def test_probabilities_of_all_sequences_sum_to_one(cond):
    chains = build_markov(TINY)
    seqs = all_sequences(3, 3)
    total = chains.log_likelihood(seqs, torch.full((len(seqs),), cond)).exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-12)


def test_likelihood_is_the_mode_mixture_by_hand():
    chains = build_markov(TINY)
    y = torch.tensor([[2, 0, 1]])
    by_hand = sum(chains.log_weight_m[m].exp() * chains.log_init_cmv[1, m, 2].exp()
                  * chains.log_trans_cmvv[1, m, 2, 0].exp() * chains.log_trans_cmvv[1, m, 0, 1].exp()
                  for m in range(2))
    assert float(chains.log_likelihood(y, torch.tensor([1])).exp()) == pytest.approx(float(by_hand), rel=1e-12)
    null = 0.5 * (chains.log_likelihood(y, torch.tensor([0])).exp() + chains.log_likelihood(y, torch.tensor([1])).exp())
    assert float(chains.log_likelihood(y, torch.tensor([2])).exp()) == pytest.approx(float(null), rel=1e-12)


def test_sampler_frequencies_match_the_exact_probabilities():
    chains = build_markov(TINY)
    n = 40000
    tokens = chains.sample(torch.ones(n, dtype=torch.long), torch.Generator().manual_seed(0))
    index = tokens[:, 0] * 9 + tokens[:, 1] * 3 + tokens[:, 2]
    freq = torch.bincount(index, minlength=27).double() / n
    exact = chains.log_likelihood(all_sequences(3, 3), torch.ones(27, dtype=torch.long)).exp()
    assert float((freq - exact).abs().sum() / 2) < 0.03  # TV of 40k samples over 27 outcomes


def test_training_examples_drop_the_condition_at_the_configured_rate():
    chains = build_markov(MarkovModesConfig(null_fraction=0.25))
    tokens, cond = chains.training_examples(8000, torch.Generator().manual_seed(0))
    assert tokens.shape == (8000, 12) and int(tokens.max()) < 16
    assert float((cond == chains.null_index).double().mean()) == pytest.approx(0.25, abs=0.02)
    assert set(cond.tolist()) == set(range(6))


def test_modes_are_recovered_from_their_samples():
    chains = build_markov(MarkovModesConfig(sharpness=6.0))
    cond = torch.zeros(400, dtype=torch.long)
    tokens = chains.sample(cond, torch.Generator().manual_seed(0))
    hits = torch.bincount(chains.best_mode(tokens, cond), minlength=4).double() / 400
    assert torch.allclose(hits, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=0.07)


def test_bigram_embedding_and_diversity():
    a = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [2, 2, 2, 2]])
    emb = bigram_embedding(a, 3)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0) and float(emb[0] @ emb[2]) == 0.0
    # pairs: (0,1) 0, (0,2) 1, (1,2) 1 -> mean 2/3
    assert pairwise_diversity(a[None], 3) == pytest.approx(2 / 3)


def test_markov_splits_carry_conditions_into_batches():
    sec = AutoregressiveConfig(dataset="markov_modes", train_sequences=64)
    splits = build_splits(sec)
    batch = collate_sequences(splits.train[:5])
    assert batch.tokens.shape == (5, 12) and batch.cond.shape == (5,)
    assert splits.fingerprint() != build_splits(AutoregressiveConfig(dataset="markov_modes", train_sequences=64,
                                                                     data_seed=1)).fingerprint()


def test_mode_weights_must_sum_to_one():
    with pytest.raises(ValueError, match="mode_weights"):
        MarkovModesConfig(mode_weights=[0.5, 0.4])
