"""FineTuneBench-style knowledge injection through the CLI: write a suite, fine-tune on it, score every model."""

from __future__ import annotations

import json

from cli_helpers import stillroom


def test_knowledge_suite_scores_every_model_of_a_run(tmp_path, recipe_factory):
    suite = tmp_path / "suite"
    stillroom("knowledge-data", str(suite), "--new-people", "3", "--known-people", "3", "--companies", "2",
              "--cities", "4", "--countries", "2")
    recipe = recipe_factory(
        method="sft", baseline=True,
        data={"sources": [{"path": str(suite / "train.jsonl")}], "seq_len": 32, "heldout_fraction": 0.2,
              "heldout_max": 4},
        loss={"terms": [{"name": "ce"}]}, eval={"knowledge": str(suite), "generations": 0, "heldout_sequences": 4,
                                                "batch_size": 4, "speed_tokens": 64})
    stillroom("run", str(recipe), "train.steps=2")
    run_dir = tmp_path / "runs" / "tiny"
    rows = json.loads((run_dir / "report.json").read_text())["models"]
    for name in ("teacher", "student_before", "student_after", "baseline"):
        assert {"knowledge_trained", "knowledge_paraphrase", "knowledge_implication", "knowledge_known"} <= set(rows[name])
    scored = json.loads((run_dir / "knowledge.json").read_text())["models"]
    assert set(scored) == {"teacher", "student_before", "student_after", "baseline"}
    after = scored["student_after"]
    assert (after["new/trained"]["n"], after["update/trained"]["n"], after["known/trained"]["n"]) == (3 * 2, 2, 3 * 2)
    assert "| student_after |" in (run_dir / "knowledge.md").read_text()


def test_a_missing_suite_stops_the_run_before_it_starts(tmp_path, recipe_factory):
    recipe = recipe_factory(eval={"knowledge": str(tmp_path / "nowhere")})
    proc = stillroom("run", str(recipe), check=False)
    assert proc.returncode != 0 and "eval.knowledge" in proc.stderr and "knowledge-data" in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "run.json").exists()
