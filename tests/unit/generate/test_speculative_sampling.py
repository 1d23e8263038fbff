"""Speculative *sampling* is lossless: its outputs are distributed exactly as the target's own samples.

The statistical tests use :class:`TableLM`, a language model whose next-token logits are a
lookup on (position mod 5, previous two tokens). It runs the same code path as an HF model
(KV "cache" with ``get_seq_length`` / negative ``crop``, ``logits_to_keep``) but costs
microseconds per call, so thousands of generations fit in a unit test, and its exact
distribution over short continuations can be enumerated. Its cache holds the token ids it
has seen and the logits depend on them, so a missed roll-back after a rejection changes
the output distribution and fails the test. One smaller test runs real tiny Llamas.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from generate_models import drop_layers, make_llama

from stillroom.generate.distributions import warp_to_probs
from stillroom.generate.speculative import autoregressive_generate, speculative_generate


class TokenCache:
    """The ids a TableLM has consumed (stands in for a DynamicCache)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def get_seq_length(self) -> int:
        return len(self.ids)

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove <= 0, "transformers 5.x crop takes a negative count"
        if tokens_to_remove < 0:
            self.ids = self.ids[:tokens_to_remove]


class TableLM(torch.nn.Module):
    """logits(next | prefix) = table[len(prefix) % 5, prefix[-2], prefix[-1]]."""

    def __init__(self, table_pabv: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table_pabv, requires_grad=False)
        self.head = SimpleNamespace(weight=torch.zeros(table_pabv.shape[-1], 1))

    def get_output_embeddings(self):
        return self.head

    def next_logits(self, prefix: list[int]) -> torch.Tensor:
        prev2 = prefix[-2] if len(prefix) >= 2 else 0
        return self.table[len(prefix) % 5, prev2, prefix[-1]]

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, **kw):
        cache = cache if cache is not None else TokenCache()
        start = cache.get_seq_length()
        cache.ids = cache.ids + input_ids[0].tolist()
        rows = [self.next_logits(cache.ids[: j + 1]) for j in range(start, len(cache.ids))]
        logits = torch.stack(rows)[None]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=cache)


def table_pair(vocab: int = 16, noise: float = 1.0, seed: int = 0) -> tuple[TableLM, TableLM]:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(5, vocab, vocab, vocab, generator=gen) * 2.0
    draft_table = table + noise * torch.randn(table.shape, generator=gen)
    return TableLM(table).eval(), TableLM(draft_table).eval()


def exact_joint(model, prompt: list[int], n: int, temp: float, top_p: float, vocab: int) -> dict[tuple, float]:
    """P(first n new tokens) under sampling from warp_to_probs(model logits), by enumeration."""
    out: dict[tuple, float] = {}
    for seq in itertools.product(range(vocab), repeat=n):
        prob, prefix = 1.0, list(prompt)
        for tok in seq:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prefix]), use_cache=False).logits[0, -1]
            prob *= float(warp_to_probs(logits[None], temp, top_p)[0, tok])
            prefix.append(tok)
            if prob == 0.0:
                break
        out[seq] = prob
    return out


def chi_square(counts: Counter, expected_p: dict[tuple, float], n: int) -> tuple[float, int]:
    """Pearson chi-square over cells with expected count >= 5; the other cells are pooled into one bin
    (kept only if the pool itself reaches 5). Returns (statistic, degrees of freedom)."""
    stat, bins, pool_obs, pool_exp = 0.0, 0, 0.0, 0.0
    for cell, p in expected_p.items():
        e, o = n * p, counts.get(cell, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            bins += 1
        else:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
    if pool_exp >= 5:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        bins += 1
    unexpected = sum(o for cell, o in counts.items() if expected_p.get(cell, 0.0) == 0.0)
    assert unexpected == 0, f"{unexpected} samples fell on outcomes of probability 0"
    return stat, bins - 1


def chi2_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z
    (z = 3.719 is the 0.9999 quantile; relative error < 1% for df >= 10)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# Threshold: the 0.9999 quantile. The runs are seeded, so each test is deterministic; the
# quantile says a correct sampler would fail for fewer than 1 in 10^4 seeds, while the
# power checks below show the same N makes a wrong sampler (draft's distribution) fail by a
# wide margin.
Z_9999 = 3.719


@pytest.mark.parametrize(
    "gamma, temp, top_p, n_runs",
    [
        (2, 1.0, 1.0, 800),  # two proposals per round: rejection at the 1st or 2nd position, or bonus
        (1, 1.5, 0.9, 600),  # temperature and nucleus applied to p and q alike
    ],
)
def test_speculative_sampling_matches_the_target_distribution(gamma, temp, top_p, n_runs):
    vocab, prompt = 16, [3, 7]
    target, draft = table_pair(vocab)
    p_joint = exact_joint(target, prompt, 2, temp, top_p, vocab)
    q_joint = exact_joint(draft, prompt, 2, temp, top_p, vocab)
    assert sum(p_joint.values()) == pytest.approx(1.0, abs=1e-5)

    gen = torch.Generator().manual_seed(1234)
    counts: Counter = Counter()
    accepted = tested = 0
    for _ in range(n_runs):
        result = speculative_generate(
            target, draft, prompt, gamma=gamma, max_new_tokens=3, greedy=False,
            sampling_temperature=temp, top_p=top_p, generator=gen,
        )
        counts[tuple(result.tokens[:2])] += 1
        accepted, tested = accepted + result.stats.accepted, tested + result.stats.tested
    # Both branches of the rule must be exercised for the test to mean anything.
    assert 0.2 < accepted / tested < 0.9

    stat, df = chi_square(counts, p_joint, n_runs)
    limit = chi2_quantile(df, Z_9999)
    assert stat < limit, f"chi2={stat:.1f} >= {limit:.1f} (df={df}): speculative samples do not follow the target"

    # Power: the expected chi-square if the output followed the draft instead (no correction) is
    # about df + N * sum (q - p)^2 / p over the same bins; it must exceed the limit by far.
    noncentral = n_runs * sum((q_joint[c] - p) ** 2 / p for c, p in p_joint.items() if n_runs * p >= 5)
    assert df + noncentral > 3 * limit


def test_target_sampling_baseline_matches_the_same_distribution():
    vocab, prompt, n_runs = 16, [3, 7], 800
    target, _ = table_pair(vocab)
    p_joint = exact_joint(target, prompt, 2, 1.0, 1.0, vocab)
    gen = torch.Generator().manual_seed(99)
    counts = Counter(
        tuple(autoregressive_generate(target, prompt, max_new_tokens=2, greedy=False, generator=gen).tokens)
        for _ in range(n_runs)
    )
    stat, df = chi_square(counts, p_joint, n_runs)
    assert stat < chi2_quantile(df, Z_9999)


def test_sampling_is_reproducible_with_a_seeded_generator():
    target, draft = table_pair(16)
    runs = [
        speculative_generate(
            target, draft, [1, 2], gamma=3, max_new_tokens=12, greedy=False, generator=torch.Generator().manual_seed(5)
        ).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_llama_speculative_sampling_first_token_distribution():
    """Real tiny Llamas (vocab 16, KV caches): the first new token follows the target.

    The head is scaled up so the random model's distribution is far from uniform and the
    1-layer draft disagrees with it (total variation ~0.3): a sampler that returned the
    draft's distribution would fail the chi-square test by a wide margin.
    """
    vocab, prompt, n_runs = 16, [3, 7, 1], 200
    target = make_llama(vocab, layers=2, seed=11)
    with torch.no_grad():
        target.lm_head.weight.mul_(30.0)
    draft = drop_layers(target, 1)
    with torch.inference_mode():
        p_v = warp_to_probs(target(input_ids=torch.tensor([prompt])).logits[0, -1:])[0]
        q_v = warp_to_probs(draft(input_ids=torch.tensor([prompt])).logits[0, -1:])[0]
    p_cells = {(v,): float(p_v[v]) for v in range(vocab)}
    gen = torch.Generator().manual_seed(3)
    counts: Counter = Counter()
    for _ in range(n_runs):
        result = speculative_generate(target, draft, prompt, gamma=1, max_new_tokens=2, greedy=False, generator=gen)
        counts[tuple(result.tokens[:1])] += 1
    stat, df = chi_square(counts, p_cells, n_runs)
    assert stat < chi2_quantile(df, Z_9999)
    cells = [(v,) for v in range(vocab) if n_runs * p_cells[(v,)] >= 5]
    noncentral = n_runs * sum((float(q_v[c[0]]) - p_cells[c]) ** 2 / p_cells[c] for c in cells)
    assert df + noncentral > 2 * chi2_quantile(df, Z_9999)
