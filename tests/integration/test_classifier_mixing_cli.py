"""CutMix on the classifier recipe through the real CLI: a tiny run trains on mixed batches (its losses differ
from the unmixed run's on the same views) and reports; a store-fed run with mixing is refused before training."""

import json
import math

from cli_helpers import run_losses, stillroom

SHORT = ["classifier.teacher.steps=20", "train.steps=6", "train.warmup_steps=2", "eval.before=false",
         "baseline=false", "classifier.augment.enabled=true"]


def test_cutmix_run_trains_on_mixed_batches_and_store_is_refused(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["classifier_digits", f"output_dir={out}", f"cache_dir={cache}", *SHORT]
    stillroom("run", *args, "name=mixed", "classifier.augment.mix=cutmix")
    stillroom("run", *args, "name=plain")
    mixed, plain = run_losses(out / "mixed"), run_losses(out / "plain")
    assert len(mixed) == len(plain) == 6 and all(math.isfinite(x) for x in mixed)
    assert mixed != plain  # the same crops, mixed: other images and targets
    report = json.loads((out / "mixed" / "report.json").read_text())
    assert 0.0 <= report["student_after"]["accuracy"] <= 1.0
    proc = stillroom("run", *args, "name=stored", "classifier.augment.mix=cutmix", "classifier.teacher_source=store",
                     check=False)
    assert proc.returncode != 0 and "cannot use a soft-label store" in proc.stderr
    assert "classifier.augment.mix: none" in proc.stderr and not (out / "stored" / "metrics.jsonl").exists()
