"""The shared verdict rule of the reproductions (bench/repro/verdict.py), and that the stored results
and the generated pages were decided by it.

(Lives beside the draft experiment's tests, the other bench code under test.)
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.repro.verdict import (  # noqa: E402
    best_of,
    beyond_spread,
    paired,
    parts_table,
    verdict_fields,
    within_tolerance,
)

RESULTS = ROOT / "bench" / "results"
REPRO = ["step_by_step", "self_data", "redi", "miniplm", "ddk", "conditional"]


def test_a_difference_inside_the_seed_spread_is_not_held():
    # DDK's mean-ratio part: uniform - DDK per seed; right direction on average, inside the spread
    part = beyond_spread("mean ratio", [0.059, 0.017, -0.034])
    assert part.mean == pytest.approx(0.014, abs=1e-3) and part.sd == pytest.approx(0.0466, abs=1e-3)
    assert part.held is False
    assert beyond_spread("max ratio", [1.993, 1.631, 1.123]).held is True


def test_the_bar_is_mean_minus_margin_over_std():
    assert beyond_spread("x", [2.0, 4.0]).held is True  # mean 3, std 1.41
    assert beyond_spread("x", [0.0, 4.0]).held is False  # mean 2, std 2.83
    assert beyond_spread("x", [1.0, 1.0, 1.0]).held is True  # no spread: any positive mean holds
    assert beyond_spread("x", [0.0, 0.0, 0.0]).held is False  # zero is not > zero
    assert beyond_spread("+10%", [12.0, 12.0], margin=10.0).held is True
    assert beyond_spread("+10%", [16.0, 13.0, 20.0], margin=10.0).held is True  # 16.3 - 10 > 3.5
    assert beyond_spread("+10%", [14.0, 9.0, 19.0], margin=10.0).held is False  # 14 - 10 < 5
    # a tolerance: "no more than 0.05 worse" holds for a small loss with a small spread
    assert beyond_spread("tol", [-0.03, -0.02, -0.025], margin=-0.05).held is True
    assert beyond_spread("tol", [-0.03, -0.02, -0.025]).held is False


def test_one_seed_has_no_spread_to_exceed():
    part = beyond_spread("x", [5.0])
    assert part.held is False and len(part.diffs) == 1


def test_similarity_needs_the_mean_well_inside_the_tolerance():
    assert within_tolerance("gap", [-0.0021, 0.0028, 0.0147], tolerance=0.05).held is True
    assert within_tolerance("gap", [0.04, 0.05, 0.045], tolerance=0.05).held is False  # 0.05 - 0.045 < 0.005
    assert within_tolerance("gap", [-0.03, 0.03, 0.0], tolerance=0.05).held is True
    assert within_tolerance("gap", [-0.06, 0.06, 0.0], tolerance=0.05).held is False  # spread too wide
    with pytest.raises(ValueError, match="tolerance"):
        within_tolerance("gap", [0.0, 0.0], tolerance=0.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one per seed"):
        paired([1.0, 2.0], [1.0])
    assert paired([3.0, 5.0], [1.0, 1.0]) == [2.0, 4.0]
    with pytest.raises(ValueError, match="NaN"):
        beyond_spread("x", [1.0, float("nan")])
    assert beyond_spread("ratio", [float("inf"), 2.0]).held is False


def test_best_of_says_how_many_it_picked_from():
    parts = [beyond_spread("a", [1.0, 1.2]), beyond_spread("b", [0.0, 1.0]), beyond_spread("c", [-1.0, -2.0])]
    held, text = best_of(parts)
    assert held is True and "best-of-3" in text and "1 of 3 did (a)" in text
    fields = verdict_fields(parts, best_of_note=text)
    assert fields["held"] is True and fields["verdict_text"] == text
    held, text = best_of(parts[1:])
    assert held is False and "0 of 2 did" in text


def test_verdict_fields_require_every_required_part():
    a, b = beyond_spread("a", [1.0, 1.1]), beyond_spread("b", [0.0, 1.0])
    assert verdict_fields([a, b])["held"] is False
    fields = verdict_fields([a, b], ["a"])
    assert fields["held"] is True and [p["required"] for p in fields["parts"]] == [True, False]
    assert "not beyond the seed spread: b" == verdict_fields([a, b])["verdict_text"]
    with pytest.raises(ValueError, match="not among the parts"):
        verdict_fields([a], ["z"])
    assert "| b | +0.000, +1.000 | +0.500 ± 0.707 (n=2) | mean > std | no |" in parts_table([a, b])


def _stored() -> dict[str, dict]:
    out = {m: json.loads((RESULTS / f"repro_{m}.json").read_text()) for m in REPRO}
    out["draft_tiny"] = json.loads((RESULTS / "draft_tiny.json").read_text())
    return out


@pytest.mark.parametrize("method", [*REPRO, "draft_tiny"])
def test_stored_verdicts_follow_the_rule_from_their_own_per_seed_numbers(method):
    stored = _stored()[method]
    module = importlib.import_module("bench.draft_tiny" if method == "draft_tiny" else f"bench.repro.{method}")
    again = module.resummarize(stored)
    assert again["held"] == stored["held"] and again["parts"] == stored["parts"]
    assert again["analysis"] == stored["analysis"] and again["table_md"] == stored["table_md"]
    for part in stored["parts"]:  # each stored part agrees with the rule applied to its stored differences
        rule = within_tolerance if part["kind"] == "within" else beyond_spread
        kw = {"tolerance": part["margin"]} if part["kind"] == "within" else {"margin": part["margin"]}
        assert rule(part["name"], part["diffs"], **kw).held == part["held"], part["name"]


def test_generated_pages_show_the_stored_verdicts():
    from bench.reproductions_doc import verdict_md

    overview = (ROOT / "docs" / "REPRODUCTIONS.md").read_text()
    assert "Verdict rule" in overview
    for method, stored in _stored().items():
        block = verdict_md(stored)
        assert block.replace("](../REPRODUCTIONS.md#", "](#") in overview, method
        assert stored["analysis"] in overview, method
        page = (ROOT / "docs" / "reproductions" / f"{method}.md").read_text()
        assert block in page and stored["analysis"] in page, f"docs/reproductions/{method}.md is stale"
