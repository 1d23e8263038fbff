"""Greedy speculative decoding: exact parity with the target, hand-computed metrics, KV roll-back."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from generate_models import make_llama

from stillroom.generate.sampling import cache_keyword, cache_of

from stillroom.generate.speculative import (
    SpecStats,
    _Decoder,
    autoregressive_generate,
    crop_cache,
    expected_block_efficiency,
    mbsu,
    speculative_generate,
)


def _prompt(seed: int, vocab: int = 64, length: int = 6) -> list[int]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


# ------------------------------------------------------------------ greedy parity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_target_for_every_gamma(target64, draft64, seed):
    prompt = _prompt(seed)
    reference = autoregressive_generate(target64, prompt, max_new_tokens=16).tokens
    total = SpecStats()
    for gamma in range(1, 6):
        result = speculative_generate(target64, draft64, prompt, gamma=gamma, max_new_tokens=16)
        assert result.tokens == reference, f"gamma={gamma}"
        assert result.stats.generated_tokens == 16
        total = total + result.stats
    # The draft must both agree and disagree, or roll-back after rejections was not exercised.
    assert 0 < total.accepted < total.tested


def test_greedy_matches_target_with_an_unrelated_draft(target64):
    other = make_llama(64, layers=1, seed=7)  # independent weights: almost every proposal is rejected
    prompt = _prompt(5)
    reference = autoregressive_generate(target64, prompt, max_new_tokens=20).tokens
    result = speculative_generate(target64, other, prompt, gamma=4, max_new_tokens=20)
    assert result.tokens == reference
    assert result.stats.block_efficiency >= 1.0


def test_autoregressive_matches_transformers_generate(target64):
    prompt = _prompt(3)
    ours = autoregressive_generate(target64, prompt, max_new_tokens=16).tokens
    hf = target64.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert ours == hf[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_assisted_generation(target64, draft64):
    prompt = _prompt(4)
    ours = speculative_generate(target64, draft64, prompt, gamma=3, max_new_tokens=16).tokens
    try:
        hf = target64.generate(
            torch.tensor([prompt]), assistant_model=draft64, do_sample=False, max_new_tokens=16, min_new_tokens=16
        )
    except (TypeError, ValueError, NotImplementedError) as exc:  # pragma: no cover - depends on the installed version
        pytest.skip(f"transformers assisted generation refused the tiny models: {exc}")
    assert ours == hf[0, len(prompt) :].tolist()


def test_draft_equal_to_target_accepts_everything(target64):
    gamma, rounds = 3, 5
    result = speculative_generate(target64, target64, _prompt(0), gamma=gamma, max_new_tokens=rounds * (gamma + 1))
    s = result.stats
    assert (s.target_calls, s.proposed, s.tested, s.accepted) == (rounds, rounds * gamma, rounds * gamma, rounds * gamma)
    assert s.acceptance_rate == 1.0 and s.beta_mean == 1.0
    assert s.block_efficiency == gamma + 1
    assert s.draft_calls == rounds * gamma


# ------------------------------------------------------------------ hand-computed metrics


class DisagreeAt(torch.nn.Module):
    """A draft that copies the target's greedy choice except for chosen new-token indices.

    At new-token index i in ``wrong`` it raises a different token to the top, so the
    greedy proposal there is rejected. ``prompt_len`` converts absolute positions to
    new-token indices: the logits at absolute position a predict new token a + 1 - P.
    """

    def __init__(self, target: torch.nn.Module, prompt_len: int, wrong: set[int]):
        super().__init__()
        self.inner, self.prompt_len, self.wrong = target, prompt_len, wrong

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, **kw):
        past = cache.get_seq_length() if cache is not None else 0
        out = self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                         **{cache_keyword(self.inner): cache})
        logits = out.logits.clone()
        kept = logits.shape[1]
        last = past + input_ids.shape[1] - 1
        for j in range(kept):
            new_index = last - (kept - 1 - j) + 1 - self.prompt_len
            if new_index in self.wrong:
                row = logits[0, j]
                row[(int(row.argmax()) + 1) % row.numel()] = row.max() + 10.0
        return SimpleNamespace(logits=logits, cache=cache_of(out))


def test_acceptance_metrics_match_a_hand_computed_schedule(target64):
    # 12 new tokens, gamma 3, the draft is wrong at new-token indices 1 and 6:
    # round 1 proposes 0,1,2: 0 accepted, 1 rejected -> emits 2 tokens (tested 2, accepted 1)
    # round 2 proposes 2,3,4: all accepted + bonus 5  -> emits 4 tokens (tested 3, accepted 3)
    # round 3 proposes 6,7,8: 6 rejected              -> emits 1 token  (tested 1, accepted 0)
    # round 4 proposes 7,8,9: all accepted + bonus 10 -> emits 4 tokens (tested 3, accepted 3)
    # round 5: one token left, no proposal            -> emits 1 token  (target only)
    prompt = _prompt(2)
    draft = DisagreeAt(target64, len(prompt), {1, 6}).eval()
    result = speculative_generate(target64, draft, prompt, gamma=3, max_new_tokens=12)
    s = result.stats
    assert result.tokens == autoregressive_generate(target64, prompt, max_new_tokens=12).tokens
    assert s.target_calls == 5
    assert s.draft_calls == 12
    assert s.proposed == 12
    assert s.tested == 9
    assert s.accepted == 7
    assert s.generated_tokens == 12
    assert s.acceptance_rate == pytest.approx(7 / 9)
    assert s.beta_mean == pytest.approx(7 / 9)  # greedy: beta is argmax agreement at tested contexts
    assert s.accepted_per_proposed == pytest.approx(7 / 12)
    assert s.block_efficiency == pytest.approx(12 / 5)


def test_eos_stops_generation_inclusive(target64, draft64):
    prompt = _prompt(1)
    reference = autoregressive_generate(target64, prompt, max_new_tokens=20).tokens
    eos = reference[7]
    cut = reference[: reference.index(eos) + 1]
    assert autoregressive_generate(target64, prompt, max_new_tokens=20, eos_token_id=eos).tokens == cut
    for gamma in (1, 3, 5):
        result = speculative_generate(target64, draft64, prompt, gamma=gamma, max_new_tokens=20, eos_token_id=[eos])
        assert result.tokens == cut
        assert result.stats.generated_tokens == len(cut)


def test_zero_new_tokens_and_bad_arguments(target64, draft64):
    assert speculative_generate(target64, draft64, [1, 2], gamma=3, max_new_tokens=0).tokens == []
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target64, draft64, [1, 2], gamma=-1, max_new_tokens=3)
    with pytest.raises(ValueError, match="draft model is required"):
        speculative_generate(target64, None, [1, 2], gamma=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        speculative_generate(target64, draft64, [], gamma=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="sampling_temperature"):
        speculative_generate(target64, draft64, [1], gamma=2, max_new_tokens=3, greedy=False, sampling_temperature=0)


def test_model_modes_are_restored(target64, draft64):
    draft64.train()
    try:
        speculative_generate(target64, draft64, [1, 2, 3], gamma=2, max_new_tokens=3)
        assert draft64.training and not target64.training
    finally:
        draft64.eval()


# ------------------------------------------------------------------ KV-cache roll-back


@pytest.mark.parametrize("rejected", [1, 2, 4])
def test_cache_rollback_matches_a_fresh_forward(target64, rejected):
    sequence = _prompt(9, length=8)
    junk = _prompt(10, length=rejected)
    decoder = _Decoder(target64)
    with torch.inference_mode():
        decoder.logits(sequence + junk, keep=rejected + 1)  # verification pass over proposals, then reject them all
        decoder.truncate(len(sequence))
        assert decoder.cache.get_seq_length() == len(sequence)
        after = decoder.logits(sequence + [5, 9], keep=2)
        fresh = target64(input_ids=torch.tensor([sequence + [5, 9]]), use_cache=True)
    torch.testing.assert_close(after, fresh.logits[0, -2:], rtol=1e-5, atol=1e-5)
    for layer_kept, layer_fresh in zip(decoder.cache.layers, cache_of(fresh).layers):
        torch.testing.assert_close(layer_kept.keys, layer_fresh.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer_kept.values, layer_fresh.values, rtol=1e-5, atol=1e-5)


def test_crop_cache_is_a_noop_when_not_longer(target64):
    with torch.inference_mode():
        out = target64(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = cache_of(out)
    crop_cache(cache, 5)
    crop_cache(cache, 3)
    assert cache.get_seq_length() == 3
    crop_cache(cache, 1)
    assert cache.get_seq_length() == 1


class PaddedDraft(torch.nn.Module):
    """The target itself, with 8 extra vocabulary (padding) rows whose logits are huge."""

    def __init__(self, target: torch.nn.Module):
        super().__init__()
        self.inner = target
        self.head = SimpleNamespace(weight=torch.zeros(target.config.vocab_size + 8, 1))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, **kw):
        out = self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                         **{cache_keyword(self.inner): cache})
        pad = torch.full((*out.logits.shape[:2], 8), 1e4)
        return SimpleNamespace(logits=torch.cat([out.logits, pad], dim=-1), cache=cache_of(out))


def test_padded_vocab_rows_are_cut_to_the_shared_width(target64):
    prompt = _prompt(6)
    result = speculative_generate(target64, PaddedDraft(target64).eval(), prompt, gamma=2, max_new_tokens=9)
    assert result.tokens == autoregressive_generate(target64, prompt, max_new_tokens=9).tokens
    assert result.stats.acceptance_rate == 1.0  # padding rows were never proposed


# ------------------------------------------------------------------ formulas


def test_expected_block_efficiency_by_hand():
    assert expected_block_efficiency(0.0, 5) == 1.0
    assert expected_block_efficiency(1.0, 3) == 4.0
    assert expected_block_efficiency(0.5, 1) == pytest.approx(1.5)  # 1 + 0.5
    assert expected_block_efficiency(0.5, 3) == pytest.approx(1.875)  # 1 + .5 + .25 + .125
    assert expected_block_efficiency(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert expected_block_efficiency(0.7, 0) == 1.0
    assert expected_block_efficiency(1 - 1e-12, 4) == pytest.approx(5.0, rel=1e-6)  # continuous at alpha -> 1
    with pytest.raises(ValueError):
        expected_block_efficiency(1.2, 3)
    with pytest.raises(ValueError):
        expected_block_efficiency(0.5, -1)


def test_mbsu_by_hand():
    assert mbsu(2.4, 3, n_draft=115, n_target=7000) == pytest.approx(2.4 / (1 + 3 * 115 / 7000))
    assert mbsu(4.0, 3, n_draft=1, n_target=1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mbsu(2.0, 3, n_draft=1, n_target=0)


def test_stats_add_and_serialise():
    a = SpecStats(target_calls=2, draft_calls=6, proposed=6, tested=4, accepted=3, generated_tokens=5, beta_sum=3.5)
    b = SpecStats(target_calls=1, generated_tokens=1)
    total = a + b
    assert total.block_efficiency == 2.0 and total.acceptance_rate == 0.75
    d = total.to_dict()
    assert d["block_efficiency"] == 2.0 and d["beta_mean"] == pytest.approx(3.5 / 4)
    assert math.isnan(SpecStats().acceptance_rate)
