"""DHO through the real CLI: the shipped recipe, tiny. The semi-supervised split, the searched mixture written into
the saved student (whose config.json records it) and into dho.json, each head's held-out numbers, the baseline on
the labelled images alone, and `stillroom eval` reloading the dual-head student to the same metrics."""

import json

import pytest

from cli_helpers import stillroom

TINY = ["classifier.teacher.steps=30", "train.steps=8", "train.warmup_steps=1", "train.micro_batch_size=16",
        "dho.gradient_cosine_every=2", "dho.alpha_grid=[0.0,0.5,1.0]", "dho.beta_grid=[0.5,1.0]"]


def test_dho_recipe_searches_the_mixture_and_reloads_the_dual_head_student(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["dho_digits", f"output_dir={out}", f"cache_dir={cache}", *TINY]
    proc = stillroom("run", *args)
    run_dir = out / "dho_digits"
    assert "50 labelled / " in proc.stdout and "chosen on 100 validation images" in proc.stdout
    dho = json.loads((run_dir / "dho.json").read_text())
    assert dho["labelled_images"] == 50 and dho["validation_images"] == 100 and len(dho["search_grid"]) == 6
    assert dho["grad_cos_measurements"] == 4 and -1.0 <= dho["grad_cos_mean"] <= 1.0
    saved = json.loads((run_dir / "student" / "config.json").read_text())
    assert saved["num_classes"] == 20 and saved["classes"][:2] == ["ce:0", "ce:1"]
    assert (saved["dual_head"]["alpha"], saved["dual_head"]["beta"]) == (dho["search"]["alpha"], dho["search"]["beta"])
    report = json.loads((run_dir / "report.json").read_text())
    mixed = dho["heldout"]["mixture"]
    assert report["student_after"]["accuracy"] == pytest.approx(mixed["accuracy"], abs=1e-6)
    assert report["student_after"]["ece"] == pytest.approx(mixed["ece"], abs=1e-6)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"loss/ce_head", "loss/kd_head"} <= set(rows[0])
    assert "semi-supervised: 50 labelled" in (run_dir / "report.md").read_text()
    base_rows = (run_dir / "baseline" / "metrics.jsonl").read_text().splitlines()
    assert len(base_rows) == 8 and json.loads(base_rows[0])["targets"] == 16

    (run_dir / "report.json").unlink()
    stillroom("eval", *args)
    after = json.loads((run_dir / "report.json").read_text())
    for key in ("student_after", "baseline"):
        for metric in ("accuracy", "ece", "heldout_ce", "top1_agreement"):
            assert after[key][metric] == pytest.approx(report[key][metric], abs=1e-6), (key, metric)
