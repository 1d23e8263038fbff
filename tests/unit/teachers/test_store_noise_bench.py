"""bench/store_noise.py: its closed-form error of a drawn store row is the mean of the rows' real error over draws."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from store_noise import expected_error, realised_error  # noqa: E402


@pytest.mark.parametrize("variant", ["k3/int8+t5", "k2/int4+t6", "k6/sampled", "k3/int8+t5-alloc"])
def test_the_closed_form_is_the_mean_realised_error_over_draw_seeds(variant):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    want = expected_error(torch.softmax(logits, -1), variant)
    runs = torch.stack([realised_error(logits, "u", f"{variant}-d{s}") for s in range(1500)])
    # the mean of 1500 draws: within 6% of the closed form (its standard error here: 1-2.4%), row by row
    torch.testing.assert_close(runs.mean(0), want, rtol=0.06, atol=0)
    assert bool((runs.std(0) > 0).all())  # the rows do differ between seeds


def test_bench_variant_names_with_the_ranked_suffix():
    from store_size import draw_kind, draw_seed, id_code, parse_variant, tail_draws

    name = "k8/int8+t24-alloc-ranked-d1"
    assert (parse_variant(name), tail_draws(name), draw_kind(name), draw_seed(name), id_code(name)) == (
        (8, "int8", None), 24, "allocated", 1, "ranked")
    assert (draw_kind("k8/int8+t16-ranked"), id_code("k8/int8+t16-alloc"), id_code("k16/int8")) == (
        "multinomial", "plain", "plain")
