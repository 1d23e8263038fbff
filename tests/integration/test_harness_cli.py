"""lm-evaluation-harness tasks and model cards through the real CLI: a tiny run scores a local JSONL task on every
model and writes a card into each saved student; bad task settings stop the run before it starts."""

from __future__ import annotations

import json

import yaml
from cli_helpers import stillroom
from harness_helpers import needs_lm_eval, write_mc_task

QUICK = {"generations": 0, "heldout_sequences": 4, "batch_size": 4, "speed_tokens": 64}


def _front_matter(card: str) -> dict:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card[:200]
    return yaml.safe_load(head)


@needs_lm_eval
def test_a_run_scores_a_local_task_on_every_model(tmp_path, recipe_factory):
    tasks = write_mc_task(tmp_path / "tasks", [0, 1, 2, 0, 1, 2])
    lm_eval = {"tasks": ["toy_mc"], "include_path": str(tasks), "batch_size": 3}
    recipe = recipe_factory(baseline=True, eval={**QUICK, "lm_eval": lm_eval})
    stillroom("run", str(recipe), "train.steps=2")
    run_dir = tmp_path / "runs" / "tiny"
    rows = json.loads((run_dir / "report.json").read_text())["models"]
    for name in ("teacher", "student_before", "student_after", "baseline"):
        acc = rows[name]["lm_eval_toy_mc_acc"]
        assert 0 <= acc <= 1 and acc * 6 == round(acc * 6), (name, acc)  # a share of the 6 documents
    assert "lm_eval_toy_mc_acc" in (run_dir / "report.md").read_text()
    card = (run_dir / "student" / "README.md").read_text()
    assert "lm_eval_toy_mc_acc" in card  # the card's table is the report's


@needs_lm_eval
def test_a_wrong_folder_or_task_stops_the_run_before_it_starts(tmp_path, recipe_factory):
    recipe = recipe_factory(eval={**QUICK, "lm_eval": {"tasks": ["toy_mc"], "include_path": str(tmp_path / "nowhere")}})
    proc = stillroom("run", str(recipe), check=False)
    assert proc.returncode != 0 and "eval.lm_eval.include_path" in proc.stderr and "nowhere" in proc.stderr
    tasks = write_mc_task(tmp_path / "tasks", [0, 1])
    recipe = recipe_factory(eval={**QUICK, "lm_eval": {"tasks": ["toy_mcx"], "include_path": str(tasks)}})
    proc = stillroom("run", str(recipe), check=False)
    assert proc.returncode != 0 and "eval.lm_eval.tasks" in proc.stderr and "'toy_mcx'" in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "run.json").exists()


def test_every_saved_student_carries_a_model_card(tmp_path, recipe_factory, tiny_teacher_dir):
    recipe = recipe_factory(baseline=True, eval=QUICK)
    stillroom("run", str(recipe), "train.steps=2")
    run_dir = tmp_path / "runs" / "tiny"
    after = json.loads((run_dir / "report.json").read_text())["models"]["student_after"]
    for folder in (run_dir / "student", run_dir / "baseline" / "student"):
        card = (folder / "README.md").read_text()
        meta = _front_matter(card)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert {"distillation", "stillroom"} <= set(meta["tags"]) and "license" not in meta
        assert "base_model" not in meta  # a local teacher folder is no hub model
        assert str(tiny_teacher_dir) in card and "- steps: 2 " in card
        assert f"| student (after) | {after['heldout_ce']:.4f} |" in card  # the report's row, CE first
        assert "| teacher |" in card and "| baseline (CE only) |" in card
    assert "forward_kl" in (run_dir / "student" / "README.md").read_text()
    assert "row `baseline (CE only)`" in (run_dir / "baseline" / "student" / "README.md").read_text()
