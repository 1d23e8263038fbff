"""EAGLE's feature-level draft head: its shapes and cached forward, its folder, the named errors, and drafting in
the lossless speculative decoder (greedy equals the target token for token; an oracle head that predicts the
target's own features gets every proposal accepted, which pins the alignment of features, embeddings and
positions; sampling keeps the target's distribution)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from generate_models import make_llama
from test_speculative_sampling import Z_9999, chi2_quantile, chi_square

from stillroom.generate.distributions import warp_to_probs
from stillroom.generate.eagle_draft import EagleDraft, eagle_draft_from
from stillroom.generate.eagle_head import (
    CONFIG_FILE, WEIGHTS_FILE, EagleHead, HeadMismatch, build_head, load_head, save_head, text_body,
)
from stillroom.generate.spec_eval import run_spec_eval
from stillroom.generate.speculative import autoregressive_generate, speculative_generate


@pytest.fixture(scope="module")
def target():
    return make_llama(64, layers=2, seed=0).eval()


def test_head_shapes_and_cached_forward_match_the_full_forward(target):
    head = build_head(target, seed=1)
    assert isinstance(head.layers[0].input_layernorm, torch.nn.Identity)  # EAGLE: no norm on fc's output
    assert head.fc.in_features == 64 and head.fc.out_features == 32
    f_btd, e_btd = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    full = head(f_btd, e_btd)
    assert full.shape == (2, 7, 32)
    cache = head.new_cache()  # the drafting path: a prefix, then one row at a time, on a KV cache
    parts = [head(f_btd[:, :4], e_btd[:, :4], cache=cache, start=0)]
    parts += [head(f_btd[:, i:i + 1], e_btd[:, i:i + 1], cache=cache, start=i) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # causal: a later row does not change an earlier one
    f2 = f_btd.clone()
    f2[:, 5:] += 1.0
    torch.testing.assert_close(head(f2, e_btd)[:, :5], full[:, :5])
    assert not torch.allclose(head(f2, e_btd)[:, 5:], full[:, 5:])
    # seeded, and the caller's random state is left alone
    state = torch.get_rng_state()
    assert torch.equal(build_head(target, seed=1).fc.weight, head.fc.weight)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_load_round_trip(target, tmp_path):
    head = build_head(target, seed=2, name="tiny")
    save_head(head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = load_head(tmp_path / "head", target)
    assert loaded.config == head.config and loaded.config.target == "tiny"
    f_btd, e_btd = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    torch.testing.assert_close(loaded(f_btd, e_btd), head(f_btd, e_btd), atol=0, rtol=0)
    save_head(build_head(target, seed=3), tmp_path / "head")  # overwriting replaces the folder whole
    assert not torch.equal(load_head(tmp_path / "head").fc.weight, head.fc.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_named_errors(target, tmp_path):
    head = build_head(target)
    save_head(head, tmp_path / "head")
    wider = make_llama(64, layers=2, seed=0, hidden=48)
    with pytest.raises(HeadMismatch, match="width 32 but the target's hidden size is 48"):
        load_head(tmp_path / "head", wider)
    other_vocab = make_llama(80, layers=2, seed=0)
    with pytest.raises(HeadMismatch, match="vocabulary of 64 logits but the target has 80"):
        EagleDraft(head, other_vocab)
    with pytest.raises(FileNotFoundError, match="not an EAGLE head folder"):
        load_head(tmp_path)
    with pytest.raises(TypeError, match="no decoder stack"):
        text_body(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="built for another target"):
        speculative_generate(make_llama(64, layers=2, seed=5), EagleDraft(head, target), [1, 2], gamma=2,
                             max_new_tokens=4)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_output_equals_the_targets(target, gamma):
    draft = EagleDraft(build_head(target, seed=4), target)
    for seed in range(3):
        prompt = torch.randint(1, 64, (1 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = autoregressive_generate(target, prompt, max_new_tokens=14).tokens
        got = speculative_generate(target, draft, prompt, gamma=gamma, max_new_tokens=14)
        assert got.tokens == want
        assert got.stats.generated_tokens == 14 and got.stats.draft_calls == got.stats.proposed


class OracleHead(EagleHead):
    """Predicts the target's true feature f_{t+1} for each row (from a full forward of the final sequence), and
    checks that its inputs are the target's f_t and the embedding of token t + 1: every proposal is then the
    target's greedy token, and any misalignment of features, embeddings or positions fails."""

    def setup(self, target, sequence):
        with torch.no_grad():
            out = target(input_ids=torch.tensor([sequence]), output_hidden_states=True)
        self.feat_td, self.emb_td = out.hidden_states[-1][0], out.hidden_states[0][0]
        self.rows_seen = 0

    def forward(self, features_btd, embeds_btd, *, cache=None, start=0):
        t = features_btd.shape[1]
        torch.testing.assert_close(embeds_btd[0], self.emb_td[start + 1:start + 1 + t], atol=1e-5, rtol=1e-5)
        real = features_btd[0, : max(0, min(t, len(self.feat_td)))]
        torch.testing.assert_close(real, self.feat_td[start:start + len(real)], atol=1e-4, rtol=1e-4)
        self.rows_seen += t
        return self.feat_td[start + 1:start + 1 + t][None]


def test_an_oracle_head_gets_every_proposal_accepted(target):
    prompt, n_new, gamma = [5, 9, 2, 33], 13, 3
    want = autoregressive_generate(target, prompt, max_new_tokens=n_new).tokens
    head = OracleHead(build_head(target).config)
    head.setup(target, prompt + want)
    result = speculative_generate(target, EagleDraft(head, target), prompt, gamma=gamma, max_new_tokens=n_new)
    assert result.tokens == want
    s = result.stats
    assert s.accepted == s.tested == s.proposed > 0
    # round 1: the target's own first token; then rounds of gamma proposals + the bonus token (4 tokens each)
    assert s.target_calls == 1 + 3 and s.proposed == 3 * gamma and s.block_efficiency == n_new / 4


def test_sampling_keeps_the_targets_distribution():
    """The first drafted token (the second new one) under sampling follows the target's conditional distribution;
    the head (random, so its q differs from p) has proposals rejected, exercising the residual draw."""
    vocab, prompt, n_runs = 8, [3, 7, 1], 400
    target = make_llama(vocab, layers=2, seed=11).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(12.0)
    draft = EagleDraft(build_head(target, seed=3), target)
    cells: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        p1 = warp_to_probs(target(input_ids=torch.tensor([prompt])).logits[0, -1:])[0]
        for a in range(vocab):
            p2 = warp_to_probs(target(input_ids=torch.tensor([prompt + [a]])).logits[0, -1:])[0]
            cells.update({(a, b): float(p1[a] * p2[b]) for b in range(vocab)})
    gen = torch.Generator().manual_seed(0)
    counts: Counter = Counter()
    tested = accepted = 0
    for _ in range(n_runs):
        result = speculative_generate(target, draft, prompt, gamma=1, max_new_tokens=3, greedy=False, generator=gen)
        counts[tuple(result.tokens[:2])] += 1
        tested, accepted = tested + result.stats.tested, accepted + result.stats.accepted
    assert tested == n_runs and 0 < accepted < tested
    stat, df = chi_square(counts, cells, n_runs)
    assert stat < chi2_quantile(df, Z_9999)


def test_spec_eval_measures_a_head_draft(tmp_path):
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer(320)
    target = make_llama(len(tok), layers=2, seed=0).eval()
    save_head(build_head(target, seed=6), tmp_path / "head")
    draft = eagle_draft_from(tmp_path / "head", target)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    report = run_spec_eval(target, draft, tok, prompts, [2], max_new_tokens=6, modes=["greedy"],
                           out_dir=tmp_path / "out", warmup=False)
    row = report["results"][0]
    assert row["matches_target_greedy"] is True and row["generated_tokens"] == 12
    assert report["draft"]["params"] == sum(p.numel() for p in draft.head.parameters())
