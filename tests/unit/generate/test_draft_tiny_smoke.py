"""Fast checks of bench/draft_tiny.py: the measurement on tiny random models and the verdict rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import bench.draft_tiny as draft_tiny  # noqa: E402  (in-repo: a broken import must fail, not skip)


def _tiny(layers: int, seed: int):
    from bench.repro.common import tiny_llama

    return tiny_llama(16, layers=layers, hidden=16, heads=2, seed=seed, max_positions=64)


def test_spec_measure_is_lossless_and_counts_consistently():
    torch.set_num_threads(1)
    from stillroom.generate.speculative import autoregressive_generate

    target, draft = _tiny(2, 0), _tiny(1, 1)
    sizes = draft_tiny.Sizes(eval_prompts=2, eval_tokens=8)
    prompts = [[3, 4, 5], [6, 7]]
    ref = [autoregressive_generate(target, p, max_new_tokens=8, greedy=True).tokens for p in prompts]
    out = draft_tiny.spec_measure(target, draft, prompts, (1, 3), ref, sizes, seed=0)
    assert set(out) == {"greedy@1", "greedy@3", "sampling@1", "sampling@3"}
    for key, row in out.items():
        assert 1.0 <= row["tau"] <= int(key.split("@")[1]) + 1
        assert 0.0 <= row["alpha"] <= 1.0 and 0.0 <= row["beta"] <= 1.0
        if key.startswith("greedy"):
            assert row["lossless"] is True
            assert row["alpha"] == pytest.approx(row["beta"])  # greedy: acceptance is argmax agreement
    # the draft identical to the target accepts everything
    same = draft_tiny.spec_measure(target, target, prompts, (3,), ref, sizes, seed=0)
    assert same["greedy@3"]["alpha"] == 1.0
    assert same["sampling@3"]["beta"] == pytest.approx(1.0, abs=1e-5)


def _fake_seed(seed: int, tau: dict[str, float]) -> dict:
    def spec(t):
        return {f"{m}@{g}": {"alpha": 0.8, "beta": 0.79, "tau": t, "e_tau": t + 0.1, "tested": 10, "lossless": True}
                for m in ("greedy", "sampling") for g in (3, 5)}

    phase = {m: {"kl": 0.2, "spec": spec(tau.get(m, 3.0))} for m in draft_tiny.METHODS}
    return {"seed": seed, "short_steps": 40, "full": phase, "short": phase}


@pytest.mark.parametrize(("best", "held"), [(3.31, True), (3.29, False)])
def test_verdict_rule_is_ten_percent_over_ce_at_largest_gamma(best, held):
    per_seed = [_fake_seed(s, {"ce": 3.0, "tvd": best}) for s in range(3)]  # no spread across seeds
    out = draft_tiny.summarize(per_seed, draft_tiny.Sizes())
    assert out["held"] is held
    assert out["verdict"]["sampling"]["best"] == "tvd"
    assert "| tvd |" in out["table_md"] and "α̂ check" in out["table_md"]


def test_a_mean_over_the_bar_inside_the_seed_spread_does_not_hold():
    # tvd: +25%, +15%, +5% vs CE: mean +15% clears +10% on the mean, but std 10% > 15% - 10%
    per_seed = [_fake_seed(s, {"ce": 3.0, "tvd": t}) for s, t in enumerate((3.75, 3.45, 3.15))]
    out = draft_tiny.summarize(per_seed, draft_tiny.Sizes())
    assert out["verdict"]["sampling"]["ratio"] == pytest.approx(1.15)
    assert out["held"] is False
    assert "best-of-8" in out["verdict_text"] and "0 of 8 did" in out["verdict_text"]
    tvd = [p for p in out["parts"] if p["name"].startswith("tvd, sampling")]
    assert len(tvd) == 1 and tvd[0]["mean"] == pytest.approx(15.0) and tvd[0]["sd"] == pytest.approx(10.0)


def test_a_best_of_pass_names_the_variant_and_the_pick():
    per_seed = [_fake_seed(s, {"ce": 3.0, "tvd": t}) for s, t in enumerate((3.6, 3.55, 3.65))]
    out = draft_tiny.summarize(per_seed, draft_tiny.Sizes())
    assert out["held"] is True
    assert "best-of-8" in out["verdict_text"] and "2 of 8 did" in out["verdict_text"]  # tvd in both modes
    assert out["verdict"]["greedy"]["held_by"] == ["tvd"] and "Verdict: held, a best-of-8" in out["analysis"]
