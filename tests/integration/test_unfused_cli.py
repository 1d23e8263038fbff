"""UNFUSED through the real CLI, tiny: stage 1-3 (`unfused_digits`: SimCLR teacher, pseudo-labels, multi-exit
self-distillation), then stage 4 (`unfused_finetune_digits`) from that run's saved student (the caches are tested in
tests/unit/domains/test_pseudo_labels.py)."""

import json

from cli_helpers import stillroom

TINY = ["unfused.ssl.steps=6", "unfused.ssl.batch_size=32", "unfused.clusters=8", "classifier.teacher.steps=10",
        "train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=16"]


def test_unfused_stages_chain_and_the_student_fine_tunes_as_a_plain_classifier(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = stillroom("run", "unfused_digits", f"output_dir={out}", f"cache_dir={cache}", *TINY)
    assert "unfused: training the SimCLR teacher" in proc.stdout and "8 pseudo-classes" in proc.stdout
    run_dir = out / "unfused_digits"
    record = json.loads((run_dir / "unfused.json").read_text())
    assert record["clusters"] == 8 and 0.0 < record["diagnostics"]["purity"] <= 1.0
    assert 0.0 <= record["diagnostics"]["nmi"] <= 1.0 and "SimCLR-lite" in record["teacher"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"loss/unfused_ce", "loss/unfused_kl", "loss/unfused_cos"} <= set(rows[0])
    config = json.loads((run_dir / "student" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["arch"]["hidden"] == [128, 96, 64]

    stillroom("run", "unfused_finetune_digits", f"output_dir={out}", f"cache_dir={cache}",
              f"classifier.student_path={run_dir / 'student'}", "train.steps=4", "train.warmup_steps=1",
              "classifier.teacher.steps=10")
    fine = json.loads((out / "unfused_finetune_digits" / "report.json").read_text())
    assert fine["student_after"]["steps"] == 4 and 0.0 < fine["student_after"]["accuracy"] <= 1.0
    assert f"loaded from {run_dir / 'student'}" in (out / "unfused_finetune_digits" / "report.md").read_text()
    bad = stillroom("run", "unfused_digits", f"output_dir={out}", "name=bad", "loss.terms=[{name: forward_kl}]",
                    check=False)
    assert bad.returncode != 0 and "loss.terms" in bad.stderr + bad.stdout
