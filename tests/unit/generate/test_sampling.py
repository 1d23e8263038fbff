"""Batched continuation sampling and the shared logit-warping rule."""

from __future__ import annotations

import pytest
import torch

from stillroom.generate.distributions import sample_from, warp_to_probs
from stillroom.generate.sampling import sample_continuations
from stillroom.generate.speculative import autoregressive_generate

PROMPTS = [[5, 9, 2, 33, 7], [11, 4], [60, 1, 2, 3, 4, 5, 6, 7]]


def test_warp_temperature_and_nucleus_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(warp_to_probs(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top_p 0.8: 0.5 alone < 0.8, 0.5 + 0.3 reaches it -> keep {0, 1}
    torch.testing.assert_close(warp_to_probs(logits, top_p=0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p 0.81 needs the third token too
    torch.testing.assert_close(warp_to_probs(logits, top_p=0.81), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    # top_p tiny keeps the most probable token only
    torch.testing.assert_close(warp_to_probs(logits, top_p=1e-6), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # temperature 0.5 squares the probabilities (then renormalises)
    sq = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(warp_to_probs(logits, sampling_temperature=0.5), (sq / sq.sum())[None])
    # -inf logits (banned tokens) get probability 0
    banned = torch.tensor([[0.0, float("-inf"), 0.0]])
    torch.testing.assert_close(warp_to_probs(banned, top_p=0.9), torch.tensor([[0.5, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="top_p"):
        warp_to_probs(logits, top_p=0.0)
    with pytest.raises(ValueError, match="sampling_temperature"):
        warp_to_probs(logits, sampling_temperature=0.0)


def test_sample_from_frequencies_and_zero_mass():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    ids = sample_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert freq[1] == 0
    # 4 standard deviations of a frequency estimate from 20000 draws is at most 4 * 0.5 / sqrt(20000) = 0.014
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.014, rtol=0)
    # unnormalised rows work too
    assert sample_from(torch.tensor([[0.0, 0.0, 5.0]])).item() == 2


def test_greedy_batch_matches_each_prompt_alone_and_transformers(target64):
    batched = sample_continuations(target64, None, PROMPTS, max_new_tokens=10, greedy=True, eos_token_id=None, pad_token_id=0)
    for prompt, got in zip(PROMPTS, batched):
        alone = autoregressive_generate(target64, prompt, max_new_tokens=10).tokens
        assert got == alone
    hf = target64.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert batched[0] == hf[0, len(PROMPTS[0]) :].tolist()


def test_sampling_is_deterministic_under_a_seeded_generator(target64):
    def run(seed):
        return sample_continuations(
            target64, None, PROMPTS, max_new_tokens=8, sampling_temperature=0.8, top_p=0.9,
            eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    assert all(len(c) == 8 for c in first)


def test_sampled_batch_row_equals_the_same_row_alone_with_one_prompt(target64):
    # With one prompt, sample_continuations and autoregressive_generate draw in the same order.
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours = sample_continuations(target64, None, [PROMPTS[0]], max_new_tokens=8, eos_token_id=None, pad_token_id=0, generator=gen_a)
    ref = autoregressive_generate(target64, PROMPTS[0], max_new_tokens=8, greedy=False, generator=gen_b).tokens
    assert ours[0] == ref


def test_eos_cut_is_inclusive_and_per_row(target64):
    free = sample_continuations(target64, None, PROMPTS, max_new_tokens=12, greedy=True, eos_token_id=None, pad_token_id=0)
    eos = free[0][4]
    cut = sample_continuations(target64, None, PROMPTS, max_new_tokens=12, greedy=True, eos_token_id=eos, pad_token_id=0)
    for full, got in zip(free, cut):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert got == expected
    assert cut[0][-1] == eos


def test_edge_cases(target64):
    assert sample_continuations(target64, None, [], max_new_tokens=3, eos_token_id=None) == []
    assert sample_continuations(target64, None, [[1, 2]], max_new_tokens=0, eos_token_id=None) == [[]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample_continuations(target64, None, [[1], []], max_new_tokens=2, eos_token_id=None)
    with pytest.raises(ValueError, match="top_p"):
        sample_continuations(target64, None, [[1]], max_new_tokens=2, top_p=1.5, eos_token_id=None)


def test_training_mode_is_restored(target64):
    target64.train()
    try:
        sample_continuations(target64, None, [[1, 2]], max_new_tokens=2, eos_token_id=None, pad_token_id=0)
        assert target64.training
    finally:
        target64.eval()
