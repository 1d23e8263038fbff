"""LELP through the real CLI: the shipped recipe, tiny: a 2-class (parity) digits task, a student with 2 x 4
outputs evaluated as 2 classes, lelp.json's subclass diagnostics, and `stillroom eval` reloading the saved
student (its config.json records the grouping) to the same metrics."""

import json

import pytest

from cli_helpers import stillroom

TINY = ["classifier.teacher.steps=30", "train.steps=8", "train.warmup_steps=1", "train.micro_batch_size=32",
        "lelp.alpha=0.5"]


def test_lelp_recipe_distils_subclasses_and_reloads_the_grouped_student(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["lelp_digits", f"output_dir={out}", f"cache_dir={cache}", *TINY]
    proc = stillroom("run", *args)
    run_dir = out / "lelp_digits"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student_after"]["confusion_matrix"] and len(report["student_after"]["confusion_matrix"]) == 2
    assert 0.0 < report["student_after"]["accuracy"] <= 1.0 and "top1_agreement" in report["baseline"]
    md = (run_dir / "report.md").read_text()
    assert "classes grouped (parity) into 2: even = 0, 2, 4, 6, 8" in md and "4 outputs per class" in md
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"loss/forward_kl", "loss/class_ce"} <= set(rows[0])
    lelp = json.loads((run_dir / "lelp.json").read_text())
    assert 0.0 <= lelp["nmi_teacher_subclass_fine_label"] <= 1.0 and lelp["subclasses"] == 4
    assert len(lelp["pca_variance_per_class"]) == 2 and "lelp: built 4 subclasses" in proc.stdout
    saved = json.loads((run_dir / "student" / "config.json").read_text())
    assert saved["num_classes"] == 8 and saved["outputs_per_class"] == 4 and saved["classes"] == ["even", "odd"]
    baseline = json.loads((run_dir / "baseline" / "student" / "config.json").read_text())
    assert baseline["outputs_per_class"] == 4  # the CE baseline is the same 8-output student, trained on classes

    (run_dir / "report.json").unlink()
    proc = stillroom("eval", *args)
    after = json.loads((run_dir / "report.json").read_text())
    for key in ("student_after", "baseline"):
        for metric in ("accuracy", "top1_agreement", "ece", "heldout_ce"):
            assert after[key][metric] == pytest.approx(report[key][metric], abs=1e-6), (key, metric)
