"""MEAL V2 through the real CLI: the shipped recipe, tiny, twice: from a random student with the official
discriminator, then refining that run's student (``classifier.student_path``) with the adversarial one."""

import json

from cli_helpers import stillroom

TINY = ["classifier.teachers.0.steps=20", "classifier.teachers.1.steps=20", "train.steps=6", "train.warmup_steps=1",
        "train.micro_batch_size=16"]


def test_meal_v2_recipe_reports_the_ensemble_and_refines_a_saved_student(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = stillroom("run", "meal_v2_digits", f"output_dir={out}", f"cache_dir={cache}", *TINY)
    run_dir = out / "meal_v2_digits"
    report = json.loads((run_dir / "report.json").read_text())
    assert 0.0 < report["teacher"]["accuracy"] <= 1.0 and report["student_after"]["steps"] == 6
    md = (run_dir / "report.md").read_text()
    assert "teacher: ensemble of 2 (mean_prob): mlp [256, 256]" in md and "cnn [16, 32]" in md
    assert md.count("held-out accuracy") >= 2 and "teachers[1]: held-out accuracy" in md
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"loss/soft_ce", "loss/discriminator"} <= set(rows[0])
    assert len(list((cache / "classifiers").iterdir())) == 2 and "teacher: training cnn" in proc.stdout

    student = run_dir / "student"
    proc = stillroom("run", "meal_v2_digits", f"output_dir={out}", f"cache_dir={cache}", "name=refine",
                     "baseline=false", f"classifier.student_path={student}",
                     "meal_v2.discriminator=adversarial", *TINY)
    assert "teacher: training" not in proc.stdout  # both members come from the cache
    refine = out / "refine"
    before = json.loads((refine / "report.json").read_text())["student_before"]["accuracy"]
    assert before == report["student_after"]["accuracy"]  # it started from the saved student
    rows = [json.loads(line) for line in (refine / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/fool_discriminator", "discriminator/loss"} <= set(rows[0])
    assert f"loaded from {student}" in (refine / "report.md").read_text()
