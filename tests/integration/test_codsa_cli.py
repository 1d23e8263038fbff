"""CoDSA through the real CLI, the shipped recipe made tiny: `stillroom run` refuses to start before the transfer
set exists, `stillroom codsa-data` writes it (the volume all to the four down-sampled classes), the run trains on
real + synthetic images and reports balanced and minority-class accuracy, and a set made for other settings is
refused before step 0."""

import json

from cli_helpers import stillroom

TINY = ["classifier.teacher.steps=30", "codsa.volume=40", "train.steps=8", "train.warmup_steps=1",
        "train.micro_batch_size=32", "train.log_every=1"]


def test_codsa_data_then_run_on_real_and_synthetic_images(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["codsa_digits", f"output_dir={out}", f"cache_dir={cache}", *TINY]

    early = stillroom("run", *args, check=False)
    assert early.returncode == 1 and "no CoDSA transfer set" in early.stderr and "codsa-data" in early.stderr
    assert not (out / "codsa_digits" / "metrics.jsonl").exists()

    made = stillroom("codsa-data", *args)
    folder = out / "codsa_digits-codsa"
    assert f"transfer set: {folder}" in made.stdout and "codsa.add_to_training=true" in made.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["policy"] == "to_balance" and manifest["images"] == 40
    assert manifest["allocation"] == [0, 0, 0, 10, 0, 10, 0, 0, 10, 10]  # 10-image classes first, equally
    assert [manifest["real_per_class"][c] for c in (3, 5, 8, 9)] == [10, 10, 10, 10]

    stillroom("run", *args)
    run_dir = out / "codsa_digits"
    report = json.loads((run_dir / "report.json").read_text())
    for row in ("student_after", "baseline", "teacher"):
        assert 0.0 <= report[row]["minority_accuracy"] <= 1.0 and len(report[row]["per_class_accuracy"]) == 10
        assert 0.0 <= report[row]["balanced_accuracy"] <= 1.0
    md = (run_dir / "report.md").read_text()
    assert "balanced acc" in md and "minority acc" in md and "+ 40 synthetic training images" in md
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8

    other = stillroom("run", *args, "name=uniform", f"codsa.out={folder}", "codsa.policy=uniform", check=False)
    assert other.returncode == 1 and "codsa.policy: set 'to_balance', run 'uniform'" in other.stderr
    assert not (out / "uniform" / "metrics.jsonl").exists()
