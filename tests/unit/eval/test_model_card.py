"""The model card of a saved student: hub front matter, the report's table, the run's settings."""

from __future__ import annotations

import yaml

from stillroom.config.schema import RunConfig
from stillroom.eval.model_card import front_matter, metrics_table, model_card, write_model_cards

REPORT_MD = """# stillroom run `x` (kd)

_created now_

## Metrics

| model | CE (nats/tok) |
|---|---:|
| teacher | 3.0000 |
| student (after) | 3.5000 |

## Versus the teacher

| model | Δ heldout_ce |
"""


def _cfg(**teacher_model) -> RunConfig:
    return RunConfig.model_validate({"name": "card", "teacher": {"model": teacher_model},
                                     "loss": {"terms": [{"name": "forward_kl", "weight": 0.5}, {"name": "ce"}]}})


def test_base_model_is_the_teachers_hub_id_where_it_has_one(tmp_path):
    assert front_matter(_cfg(builtin="smollm2-135m-instruct"))["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front_matter(_cfg(path="EleutherAI/pythia-70m"))["base_model"] == "EleutherAI/pythia-70m"
    assert "base_model" not in front_matter(_cfg(path=str(tmp_path)))  # a local folder
    assert "base_model" not in front_matter(_cfg(gguf=str(tmp_path / "m.gguf")))
    assert "base_model" not in front_matter(_cfg(path="EleutherAI/pythia-70m"), baseline=True)  # no teacher in it


def test_the_card_holds_the_reports_table_and_the_settings():
    card = model_card(_cfg(path="EleutherAI/pythia-70m"), REPORT_MD)
    head, _, body = card.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(head)
    assert meta == {"library_name": "transformers", "tags": ["distillation", "stillroom"],
                    "pipeline_tag": "text-generation", "base_model": "EleutherAI/pythia-70m"}
    assert "| student (after) | 3.5000 |" in body and "Δ heldout_ce" not in body  # the metrics section only
    assert "forward_kl × 0.5, ce × 1" in body and "`EleutherAI/pythia-70m`" in body and "stillroom run" in body


def test_metrics_table_of_a_report_without_one_is_empty():
    assert metrics_table("# title\n\nno metrics here\n") == []
    assert metrics_table(REPORT_MD)[0] == "| model | CE (nats/tok) |" and len(metrics_table(REPORT_MD)) == 4


def test_cards_go_only_into_saved_model_folders(tmp_path):
    saved, empty = tmp_path / "student", tmp_path / "baseline"
    saved.mkdir()
    empty.mkdir()
    (saved / "config.json").write_text("{}")
    written = write_model_cards(_cfg(path=str(tmp_path)), REPORT_MD, {"student_after": saved, "baseline": empty})
    assert written == [saved / "README.md"] and not (empty / "README.md").exists()
    assert [p.name for p in saved.iterdir() if p.name.endswith(".tmp")] == []  # written atomically, no leftovers


def test_a_cross_entropy_run_lists_no_teacher_terms():
    cfg = _cfg(path="EleutherAI/pythia-70m")
    cfg.method = "sft"
    card = model_card(cfg, REPORT_MD)
    assert "- loss terms: ce\n" in card and "forward_kl" not in card and "cross-entropy only" in card
